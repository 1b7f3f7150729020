"""Scaled dot-product attention behind one function, with three backends.

Masks are built from *positions*, never from array offsets: a query at position
p may see a key at position <= p (causal) whose slot is valid. The same rule
covers training batches, left/right padding and a KV cache whose slots are
partly filled, so no backend needs `is_causal` (top-left aligned in JAX when
query and key lengths differ).

Implementations (`attention(..., backend=...)`), each a concrete choice:
  xla_grouped      two batched matmuls with (batch, kv head) leading.
  xla_dot_product  `jax.nn.dot_product_attention` (cuDNN on GPU where it applies).
  blockwise        pure JAX, online softmax over key blocks inside a map over
                   query blocks: never materialises the full attention matrix.
  splash           TPU splash attention (Pallas) for training/prefill without a cache.

A config names a backend (`xla`, `blockwise`, `splash`); `resolve` turns it
and the platform into one of these, once, where the model is built (see
`models.factory`), so model code never asks which platform it runs on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity": keeps fully masked rows NaN-free

IMPLEMENTATIONS = ("xla_grouped", "xla_dot_product", "blockwise", "splash")


def resolve(backend: str, platform: str) -> str:
    """The implementation of config backend `backend` on `platform` (a JAX
    platform name: cpu, gpu, tpu).

    `xla` is two batched matmuls on CPU: with (batch, kv head) leading both
    products XLA:CPU transposes q, k and v once instead of the scores (faster
    forward + backward than `jax.nn.dot_product_attention` there); elsewhere
    `jax.nn.dot_product_attention`. `splash` needs a TPU."""
    if backend == "xla":
        return "xla_grouped" if platform == "cpu" else "xla_dot_product"
    if backend == "splash" and platform != "tpu":
        raise ValueError(
            f"attention backend 'splash' needs a TPU (running on {platform}); "
            "use 'xla' or 'blockwise'"
        )
    if backend not in ("blockwise", "splash"):
        raise ValueError(f"unknown attention backend {backend!r} (xla, blockwise, splash)")
    return backend


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    kv_valid: jax.Array,
    *,
    causal: bool = True,
    backend: str = "xla_grouped",
    block_size: int = 512,
    heads_major: bool = False,
) -> jax.Array:
    """Attention of q (B, T, N, H) over k, v (B, S, K, H), N a multiple of K.

    `q_positions` (B, T) and `kv_positions` (B, S) are token positions;
    `kv_valid` (B, S) marks real keys (False for padding and empty cache slots).
    Returns (B, T, N, H) in q's dtype. Query rows with no visible key are
    undefined (they belong to padding) but finite. `backend` is one of
    `IMPLEMENTATIONS` (see `resolve`).

    `heads_major`: k and v come as (B, K, S, H), the KV cache's layout, in which
    the score and value products need no transpose of the (long) key axis.
    """
    if heads_major:
        if backend != "blockwise":
            return _xla_heads_major(q, k, v, q_positions, kv_positions, kv_valid, causal)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    if backend == "xla_grouped":
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        return _xla_heads_major(q, k, v, q_positions, kv_positions, kv_valid, causal)
    if backend == "xla_dot_product":
        mask = visibility_mask(q_positions, kv_positions, kv_valid, causal)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if backend == "blockwise":
        return _blockwise(q, k, v, q_positions, kv_positions, kv_valid, causal, block_size)
    if backend == "splash":
        return _splash(q, k, v, kv_valid, causal, block_size)
    raise ValueError(f"unknown attention implementation {backend!r} ({', '.join(IMPLEMENTATIONS)})")


def visibility_mask(q_positions, kv_positions, kv_valid, causal: bool) -> jax.Array:
    """Boolean (B, T, S): which keys each query may attend to."""
    mask = kv_valid[:, None, :]
    if causal:
        mask = mask & (kv_positions[:, None, :] <= q_positions[:, :, None])
    return mask


def _xla_heads_major(q, k, v, q_positions, kv_positions, kv_valid, causal):
    """q (B, T, N, H) over k, v (B, K, S, H): (B, K) lead both products, so the
    cache is read in place (decode is bound by reading it)."""
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("bkqh,bksh->bkqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / float(H) ** 0.5)
    mask = visibility_mask(q_positions, kv_positions, kv_valid, causal)  # (B, T, S)
    mask = jnp.broadcast_to(mask[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _blockwise(q, k, v, q_positions, kv_positions, kv_valid, causal, block_size):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk = min(block_size, T), min(block_size, S)
    nq, nk = -(-T // bq), -(-S // bk)
    pad_q, pad_k = nq * bq - T, nk * bk - S
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        q_positions = jnp.pad(q_positions, ((0, 0), (0, pad_q)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        kv_positions = jnp.pad(kv_positions, ((0, 0), (0, pad_k)))
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad_k)))
    scale = H**-0.5
    # (nq, B, bq, K, G, H) query blocks; (nk, B, bk, K, H) key/value blocks.
    qb = q.reshape(B, nq, bq, K, G, H).transpose(1, 0, 2, 3, 4, 5)
    qpb = q_positions.reshape(B, nq, bq).transpose(1, 0, 2)
    kb = k.reshape(B, nk, bk, K, H).transpose(1, 0, 2, 3, 4)
    vb = v.reshape(B, nk, bk, K, H).transpose(1, 0, 2, 3, 4)
    kpb = kv_positions.reshape(B, nk, bk).transpose(1, 0, 2)
    kvb = kv_valid.reshape(B, nk, bk).transpose(1, 0, 2)

    def one_query_block(args):
        q_blk, qp_blk = args  # (B, bq, K, G, H), (B, bq)
        q32 = q_blk.astype(jnp.float32) * scale

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def update(carry, kv):
            m, denom, acc = carry
            k_blk, v_blk, kp_blk, valid_blk = kv
            mask = valid_blk[:, None, None, None, :]
            if causal:
                mask = mask & (kp_blk[:, None, None, None, :] <= qp_blk[:, None, None, :, None])
            s = jnp.einsum("bqkgh,bskh->bkgqs", q32, k_blk.astype(jnp.float32))
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            denom_new = denom * corr + p.sum(-1)
            acc_new = acc * corr[..., None] + jnp.einsum(
                "bkgqs,bskh->bkgqh", p, v_blk.astype(jnp.float32)
            )
            return m_new, denom_new, acc_new

        def step(carry, kv):
            _, _, kp_blk, valid_blk = kv
            # Skip key blocks no query of this block can see (causal upper triangle).
            visible = valid_blk.any()
            if causal:
                visible = visible & (kp_blk.min() <= qp_blk.max())
            carry = jax.lax.cond(visible, update, lambda c, _: c, carry, kv)
            return carry, None

        init = (
            jnp.full((B, K, G, bq), _NEG, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, H), jnp.float32),
        )
        (_, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, kpb, kvb))
        out = acc / jnp.maximum(denom, 1e-30)[..., None]  # (B, K, G, bq, H)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H)

    out = jax.lax.map(one_query_block, (qb, qpb))  # (nq, B, bq, N, H)
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, nq * bq, N, H)[:, :T]
    return out.astype(q.dtype)


def _splash(q, k, v, kv_valid, causal, block_size, interpret: bool = False):
    """TPU splash attention for full (uncached) sequences: T == S, positions
    0..T-1, padding given by `kv_valid`. Heads are not sharded inside the kernel
    (`resolve` chose it, so this runs on a TPU; `interpret` runs the Pallas
    interpreter anywhere)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    B, T, N, H = q.shape
    if k.shape[1] != T:
        raise ValueError("attention backend 'splash' needs equal query and key lengths (no cache)")
    K = k.shape[2]
    block = min(block_size, T)
    one = sm.CausalMask((T, T)) if causal else sm.FullMask((T, T))
    kernel = sk.make_splash_mha_single_device(
        mask=sm.MultiHeadMask([one] * N),
        block_sizes=sk.BlockSizes(
            block_q=block,
            block_kv=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_q_dq=block,
            block_kv_dq=block,
        ),
        interpret=interpret,
    )
    # Padding is a second segment: real tokens (id 1) never see padding (id 0).
    seg = kv_valid.astype(jnp.int32)
    k = jnp.repeat(k, N // K, axis=2)
    v = jnp.repeat(v, N // K, axis=2)
    q = q * (H**-0.5)

    def one(qi, ki, vi, si):
        return kernel(
            qi.swapaxes(0, 1),
            ki.swapaxes(0, 1),
            vi.swapaxes(0, 1),
            segment_ids=sk.SegmentIds(q=si, kv=si),
        ).swapaxes(0, 1)

    return jax.vmap(one)(q, k, v, seg)
