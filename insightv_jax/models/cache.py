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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from insightv_jax.config import DecoderConfig


@struct.dataclass
class KVCache:
    # per layer (B, K, S, H): heads before slots, so attention reads a layer's
    # cache without transposing it (see attention.py, heads_major)
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # (B,) int32: filled slots per row

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
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    def repeat_rows(self, n: int) -> KVCache:
        """Each row copied n times (row b -> rows b*n .. b*n+n-1): N samples of a
        prompt share one prefill."""
        return KVCache(
            k=tuple(jnp.repeat(k, n, axis=0) for k in self.k),
            v=tuple(jnp.repeat(v, n, axis=0) for v in self.v),
            lengths=jnp.repeat(self.lengths, n, axis=0),
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
