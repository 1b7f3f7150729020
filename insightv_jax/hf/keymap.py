"""Key maps between our parameter tree and Hugging Face safetensors keys.

Each `ParamMap` names one of our parameters (a path into the NNX state), the HF
key it comes from (with `{i}` for stacked layers, which index into our leading
`layers` axis), and the two layout transforms. torch Linear weights are
(out, in); our kernels are (in, out) with heads split out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from insightv_jax.config import DecoderConfig

Transform = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


@dataclasses.dataclass(frozen=True)
class ParamMap:
    path: tuple[str, ...]
    hf_key: str  # contains "{i}" when `stacked`
    to_ours: Transform = _identity
    to_hf: Transform = _identity
    stacked: bool = False


def _heads_in(n: int, h: int) -> tuple[Transform, Transform]:
    """HF (n*h, d) projection weight <-> ours (d, n, h)."""
    return (
        lambda w: w.reshape(n, h, -1).transpose(2, 0, 1),
        lambda w: w.transpose(1, 2, 0).reshape(n * h, -1),
    )


def _heads_out(n: int, h: int) -> tuple[Transform, Transform]:
    """HF (d, n*h) output weight <-> ours (n, h, d)."""
    return (
        lambda w: w.reshape(-1, n, h).transpose(1, 2, 0),
        lambda w: w.transpose(2, 0, 1).reshape(-1, n * h),
    )


def _heads_bias(n: int, h: int) -> tuple[Transform, Transform]:
    """HF (n*h,) bias <-> ours (n, h)."""
    return (lambda b: b.reshape(n, h), lambda b: b.reshape(n * h))


def decoder_keymap(cfg: DecoderConfig, prefix: str = "model.", head_key: str = "lm_head.weight"):
    """The Llama/Qwen2 decoder map; `prefix` is the HF prefix of the base model
    (`model.` for `*ForCausalLM`, `model.language_model.` inside LLaVA)."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    layer = f"{prefix}layers.{{i}}."
    maps = [
        ParamMap(("embed",), f"{prefix}embed_tokens.weight"),
        ParamMap(("norm", "weight"), f"{prefix}norm.weight"),
    ]
    if not cfg.tie_embeddings:
        maps.append(ParamMap(("lm_head",), head_key, _transpose, _transpose))

    def add(path, key, fwd_bwd=(_identity, _identity)):
        maps.append(ParamMap(("layers", *path), layer + key, *fwd_bwd, stacked=True))

    add(("input_norm", "weight"), "input_layernorm.weight")
    add(("post_attn_norm", "weight"), "post_attention_layernorm.weight")
    add(("attn", "q_proj"), "self_attn.q_proj.weight", _heads_in(N, H))
    add(("attn", "k_proj"), "self_attn.k_proj.weight", _heads_in(K, H))
    add(("attn", "v_proj"), "self_attn.v_proj.weight", _heads_in(K, H))
    add(("attn", "o_proj"), "self_attn.o_proj.weight", _heads_out(N, H))
    if cfg.qkv_bias:
        add(("attn", "q_bias"), "self_attn.q_proj.bias", _heads_bias(N, H))
        add(("attn", "k_bias"), "self_attn.k_proj.bias", _heads_bias(K, H))
        add(("attn", "v_bias"), "self_attn.v_proj.bias", _heads_bias(K, H))
    if cfg.o_bias:
        add(("attn", "o_bias"), "self_attn.o_proj.bias")
    add(("mlp", "gate_proj"), "mlp.gate_proj.weight", (_transpose, _transpose))
    add(("mlp", "up_proj"), "mlp.up_proj.weight", (_transpose, _transpose))
    add(("mlp", "down_proj"), "mlp.down_proj.weight", (_transpose, _transpose))
    return maps


# HF keys that carry no learned weight and are safe to ignore on import.
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
