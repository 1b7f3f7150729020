"""A static-shape KV cache for decoding.

Row b's tokens occupy slots 0 .. lengths[b]-1, and slot s holds the token at
position s, so key positions are simply `arange(S)` and a slot is valid iff it
is below the row's length. New tokens of a row are written at its own offset
`lengths[b]`; a right-padded chunk advances each row only by its number of
real tokens, so the next write overwrites the padding. Rows can therefore hold
prompts and dialogue turns of different lengths in one static array.

The cache holds one (B, K, S, H) array per layer, not one stacked array: the
decode loop visits layers in Python order, so each layer reads and writes its
own buffer in place (slicing a layer out of a stacked cache copies it, every
token — at long contexts that copy costs as much as the attention itself).

It also keeps the rotary cos/sin of every slot's position, computed once, so a
decode step gathers its tokens' rotations instead of evaluating sin and cos
(XLA fuses those into every layer's q and k rotation, once per head).

Multimodal rotary positions (M-RoPE, Qwen2-VL) fall behind or run ahead of
the slot index after an image: `rope_deltas[b]` is row b's rotary position of
its next token minus its length (zero for text-only rows and for every other
model). The decoder rotates such rows from positions, not from the table
(`Decoder.forward_cached`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from insightv_jax.config import DecoderConfig
from insightv_jax.models.rope import decoder_inv_freq, rope_cos_sin


@struct.dataclass
class KVCache:
    # per layer (B, K, S, H): heads before slots, so attention reads a layer's
    # cache without transposing it (see attention.py, heads_major)
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # (B,) int32: filled slots per row
    rope_cos: jax.Array  # (S, H/2) fp32: cos of slot s's rotation angles (position s)
    rope_sin: jax.Array  # (S, H/2) fp32
    rope_deltas: jax.Array  # (B,) int32: next rotary position - length (M-RoPE only)

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def empty(cls, cfg: DecoderConfig, batch: int, max_length: int, dtype=None) -> KVCache:
        """A zero cache for `batch` rows of `max_length` slots."""
        shape = (batch, cfg.num_kv_heads, max_length, cfg.resolved_head_dim)
        dtype = jnp.dtype(dtype or cfg.dtype)
        cos, sin = rope_cos_sin(jnp.arange(max_length)[None], decoder_inv_freq(cfg))
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            lengths=jnp.zeros((batch,), jnp.int32),
            rope_cos=cos[0, :, 0],
            rope_sin=sin[0, :, 0],
            rope_deltas=jnp.zeros((batch,), jnp.int32),
        )

    def rope_at(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(cos, sin) at positions (B, T), each (B, T, 1, H/2); positions past the
        last slot (right padding of a chunk) get the last slot's."""
        cos = jnp.take(self.rope_cos, positions, axis=0, mode="clip")
        sin = jnp.take(self.rope_sin, positions, axis=0, mode="clip")
        return cos[:, :, None], sin[:, :, None]

    def repeat_rows(self, n: int) -> KVCache:
        """Each row copied n times (row b -> rows b*n .. b*n+n-1): N samples of a
        prompt share one prefill."""
        return self.replace(
            k=tuple(jnp.repeat(k, n, axis=0) for k in self.k),
            v=tuple(jnp.repeat(v, n, axis=0) for v in self.v),
            lengths=jnp.repeat(self.lengths, n, axis=0),
            rope_deltas=jnp.repeat(self.rope_deltas, n, axis=0),
        )

    def put_rows(self, slots: jax.Array, other: KVCache) -> KVCache:
        """`other`'s rows (len(slots) of them, at most this cache's slots long)
        written over rows `slots`: their first `other.max_length` slots,
        lengths and rotary deltas. Slots past `other.max_length` keep what was
        there, which lies beyond the new lengths and so is never read; the
        rotary table is this cache's (slot s's rotation is the same in both)."""
        S = other.max_length
        return self.replace(
            k=tuple(k.at[slots, :, :S].set(o.astype(k.dtype)) for k, o in zip(self.k, other.k)),
            v=tuple(v.at[slots, :, :S].set(o.astype(v.dtype)) for v, o in zip(self.v, other.v)),
            lengths=self.lengths.at[slots].set(other.lengths),
            rope_deltas=self.rope_deltas.at[slots].set(other.rope_deltas),
        )


def write_rows(cache_kv: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
    """Write new (B, T, K, H) into one layer's cache (B, K, S, H), row b from
    slot offsets[b] on (a scatter XLA performs in place)."""
    B, T, K = new.shape[:3]
    rows = jnp.arange(B)[:, None, None]
    heads = jnp.arange(K)[None, :, None]
    slots = (offsets[:, None] + jnp.arange(T)[None, :])[:, None, :]
    values = new.astype(cache_kv.dtype).transpose(0, 2, 1, 3)  # (B, K, T, H)
    return cache_kv.at[rows, heads, slots].set(values, mode="drop")
