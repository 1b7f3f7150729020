"""Rotary position embeddings (RoPE), Hugging Face's half-split layout.

The rotation of a head vector depends only on its token's position: cos and
sin of position x inverse frequency. `rope_cos_sin` computes them for given
positions; the KV cache keeps them for its slots (slot s holds position s), so
decoding gathers them instead of evaluating sin and cos every token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from insightv_jax.config import DecoderConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies (H/2,), with Llama-3.1 or linear scaling if configured."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv / scaling.factor).astype(np.float32)
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles at positions (B, T): each (B, T, 1, H/2) fp32."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # (B, T, H/2)
    return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate x (B, T, heads, H) by (cos, sin), each (B, T, 1, H/2)."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    # HF's x * cos + rotate_half(x) * sin, written per half: the same sums, and
    # XLA fuses this form into one loop (no concatenated input to rotate).
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def decoder_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """A decoder config's inverse frequencies (H/2,)."""
    return rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
