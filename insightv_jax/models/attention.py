"""Scaled dot-product attention behind one function, with several backends.

Masks are built from *positions*, never from array offsets: a query at position
p may see a key at position <= p (causal) whose slot is valid and, with segment
ids, whose segment is the query's. The same rule covers training batches,
left/right padding, packed rows and a KV cache whose slots are partly filled,
so no backend needs `is_causal` (top-left aligned in JAX when query and key
lengths differ).

Segment ids (packing): `q_segment_ids` (B, T) and `kv_segment_ids` (B, S) are
per-token int ids; a query sees only keys with its own id, and id 0 is
padding: a key with id 0 is never seen (as if `kv_valid` were False) and a
query with id 0 is padding, its output undefined but finite. A row holding
several records gives each its own id (1, 2, ...) and positions that restart
at 0 per record; attention then equals running each record alone.

Implementations (`attention(..., backend=...)`), each a concrete choice:
  xla_grouped      two batched matmuls with (batch, kv head) leading.
  xla_dot_product  `jax.nn.dot_product_attention` with a boolean mask (XLA).
  blockwise        pure JAX, online softmax over key blocks inside a map over
                   query blocks: never materialises the full attention matrix.
  cudnn            cuDNN fused (flash) attention on GPUs, bf16/fp16, padding as
                   sequence lengths; what it cannot express falls back (`_cudnn`).
  splash           TPU splash attention (Pallas), causal/padding/segment masks,
                   GQA without repeating K/V, run per shard under a mesh.
  splash_interpret the splash kernel run by the Pallas interpreter (any
                   platform): how tests check it on CPU. Never resolved.

A config names a backend (`auto`, `xla`, `cudnn`, `splash`, `blockwise`);
`resolve` turns it, the platform and the compute dtype into one of these,
once, where the model is built (see `models.factory`), so model code never asks
which platform it runs on.

cuDNN and splash read their masks from array *indices*: they assume what every
uncached forward here gives them, positions that increase with the index
within a segment (padding and packed rows included), and that the T queries are
the last T of the S keys. The cached path (`heads_major`) gives each row its own
offset into the cache, which neither kernel can express: it runs on the XLA
grouped path (or blockwise) whatever the backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from insightv_jax.parallel import logical_to_spec

_NEG = -1e30  # finite "minus infinity": keeps fully masked rows NaN-free

BACKENDS = ("auto", "xla", "cudnn", "splash", "blockwise")
IMPLEMENTATIONS = (
    "xla_grouped", "xla_dot_product", "blockwise", "cudnn", "splash", "splash_interpret",
)  # fmt: skip
_HALF = ("bfloat16", "float16")  # the compute dtypes cuDNN's fused attention takes


def resolve(backend: str, platform: str, dtype: str = "float32") -> str:
    """The implementation of config backend `backend` on `platform` (a JAX
    platform name: cpu, gpu, tpu) for compute dtype `dtype`.

    `auto` is `splash` on TPUs, `cudnn` on GPUs when the compute dtype is bf16
    or fp16, else `xla`. `xla` is two batched matmuls on CPU: with (batch, kv
    head) leading both products XLA:CPU transposes q, k and v once instead of
    the scores (faster forward + backward than `jax.nn.dot_product_attention`
    there); elsewhere `jax.nn.dot_product_attention`. `splash` needs a TPU;
    `cudnn` a GPU and a bf16/fp16 compute dtype. `blockwise` runs anywhere."""
    half = jnp.dtype(dtype).name in _HALF
    if backend == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and half:
            return "cudnn"
        backend = "xla"
    if backend == "xla":
        return "xla_grouped" if platform == "cpu" else "xla_dot_product"
    if backend == "splash" and platform != "tpu":
        raise ValueError(
            f"attention backend 'splash' needs a TPU (running on {platform}); "
            "use 'auto', 'xla' or 'blockwise'"
        )
    if backend == "cudnn" and platform != "gpu":
        raise ValueError(
            f"attention backend 'cudnn' needs a GPU (running on {platform}); "
            "use 'auto', 'xla' or 'blockwise'"
        )
    if backend == "cudnn" and not half:
        raise ValueError(
            f"attention backend 'cudnn' needs a bf16 or fp16 compute dtype (got {dtype}); "
            "use 'auto' or 'xla'"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} ({', '.join(BACKENDS)})")
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
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Attention of q (B, T, N, H) over k, v (B, S, K, H), N a multiple of K.

    `q_positions` (B, T) and `kv_positions` (B, S) are token positions;
    `kv_valid` (B, S) marks real keys (False for padding and empty cache slots).
    `q_segment_ids` (B, T) and `kv_segment_ids` (B, S) pack several records in
    a row (see the module docstring; 0 = padding); for self-attention (T == S)
    `q_segment_ids` alone serves the keys too. Returns (B, T, N, H) in q's
    dtype. Query rows with no visible key are undefined (they belong to
    padding) but finite. `backend` is one of `IMPLEMENTATIONS` (see `resolve`);
    `block_size` is blockwise's block and splash's largest.

    `heads_major`: k and v come as (B, K, S, H), the KV cache's layout, in which
    the score and value products need no transpose of the (long) key axis.
    """
    S = k.shape[2] if heads_major else k.shape[1]
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids, q.shape[1], S)
    if heads_major:
        if backend != "blockwise":
            # A cache gives each row its own offset: index-masked kernels
            # (cudnn, splash) cannot express it, so the cache runs on XLA.
            mask = visibility_mask(q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg)
            return _xla_heads_major(q, k, v, mask)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    if backend == "xla_grouped":
        mask = visibility_mask(q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg)
        return _xla_heads_major(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
    if backend == "xla_dot_product":
        mask = visibility_mask(q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    if backend == "cudnn":
        return _cudnn(
            q, k, v, q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg, block_size
        )
    if backend == "blockwise":
        return _blockwise(
            q, k, v, q_positions, kv_positions, kv_valid, causal, block_size, q_seg, kv_seg
        )
    if backend in ("splash", "splash_interpret"):
        return _splash(
            q, k, v, q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg, block_size,
            interpret=backend == "splash_interpret",
        )  # fmt: skip
    raise ValueError(f"unknown attention implementation {backend!r} ({', '.join(IMPLEMENTATIONS)})")


def _segments(q_seg, kv_seg, T: int, S: int):
    """(query ids, key ids), both None or both given (the key ids defaulting
    to the query ids in self-attention)."""
    if q_seg is None and kv_seg is None:
        return None, None
    if q_seg is None:
        raise ValueError("kv_segment_ids need q_segment_ids")
    if kv_seg is None:
        if T != S:
            raise ValueError(
                f"q_segment_ids alone serve the keys only when T == S (got T={T}, S={S}); "
                "pass kv_segment_ids"
            )
        kv_seg = q_seg
    return q_seg, kv_seg


def visibility_mask(
    q_positions, kv_positions, kv_valid, causal: bool, q_segment_ids=None, kv_segment_ids=None
) -> jax.Array:
    """Boolean (B, T, S): which keys each query may attend to (valid keys at
    positions <= the query's if causal, in the query's segment if segment ids
    are given; a key with segment id 0 is padding)."""
    mask = kv_valid[:, None, :]
    if kv_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same & (kv_segment_ids != 0)[:, None, :]
    if causal:
        mask = mask & (kv_positions[:, None, :] <= q_positions[:, :, None])
    return mask


def _xla_heads_major(q, k, v, mask):
    """q (B, T, N, H) over k, v (B, K, S, H) under `mask` (B, T, S): (B, K) lead
    both products, so the cache is read in place (decode is bound by reading it)."""
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("bkqh,bksh->bkqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / float(H) ** 0.5)
    mask = jnp.broadcast_to(mask[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _blockwise(q, k, v, q_positions, kv_positions, kv_valid, causal, block_size, q_seg, kv_seg):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    segmented = kv_seg is not None
    if not segmented:  # one segment: the arithmetic below stays the same
        q_seg = jnp.zeros((B, T), jnp.int32)
        kv_seg = jnp.zeros((B, S), jnp.int32)
    else:
        kv_valid = kv_valid & (kv_seg != 0)
    bq, bk = min(block_size, T), min(block_size, S)
    nq, nk = -(-T // bq), -(-S // bk)
    pad_q, pad_k = nq * bq - T, nk * bk - S
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        q_positions = jnp.pad(q_positions, ((0, 0), (0, pad_q)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pad_q)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        kv_positions = jnp.pad(kv_positions, ((0, 0), (0, pad_k)))
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad_k)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad_k)))
    scale = H**-0.5
    # (nq, B, bq, K, G, H) query blocks; (nk, B, bk, K, H) key/value blocks.
    qb = q.reshape(B, nq, bq, K, G, H).transpose(1, 0, 2, 3, 4, 5)
    qpb = q_positions.reshape(B, nq, bq).transpose(1, 0, 2)
    qsb = q_seg.reshape(B, nq, bq).transpose(1, 0, 2)
    kb = k.reshape(B, nk, bk, K, H).transpose(1, 0, 2, 3, 4)
    vb = v.reshape(B, nk, bk, K, H).transpose(1, 0, 2, 3, 4)
    kpb = kv_positions.reshape(B, nk, bk).transpose(1, 0, 2)
    kvb = kv_valid.reshape(B, nk, bk).transpose(1, 0, 2)
    ksb = kv_seg.reshape(B, nk, bk).transpose(1, 0, 2)

    def one_query_block(args):
        q_blk, qp_blk, qs_blk = args  # (B, bq, K, G, H), (B, bq), (B, bq)
        q32 = q_blk.astype(jnp.float32) * scale

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def update(carry, kv):
            m, denom, acc = carry
            k_blk, v_blk, kp_blk, valid_blk, ks_blk = kv
            mask = valid_blk[:, None, :]  # (B, bq, bk)
            if segmented:
                mask = mask & (ks_blk[:, None, :] == qs_blk[:, :, None])
            if causal:
                mask = mask & (kp_blk[:, None, :] <= qp_blk[:, :, None])
            mask = mask[:, None, None]
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
            _, _, kp_blk, valid_blk, ks_blk = kv
            # Skip key blocks no query of this block can see (causal upper
            # triangle; packed rows: blocks whose segment ranges do not meet).
            visible = valid_blk.any()
            if causal:
                visible = visible & (kp_blk.min() <= qp_blk.max())
            if segmented:
                big = jnp.iinfo(ks_blk.dtype).max
                lo = jnp.where(valid_blk, ks_blk, big).min()
                hi = jnp.where(valid_blk, ks_blk, -big).max()
                visible = visible & (lo <= qs_blk.max()) & (hi >= qs_blk.min())
            carry = jax.lax.cond(visible, update, lambda c, _: c, carry, kv)
            return carry, None

        init = (
            jnp.full((B, K, G, bq), _NEG, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, H), jnp.float32),
        )
        (_, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, kpb, kvb, ksb))
        out = acc / jnp.maximum(denom, 1e-30)[..., None]  # (B, K, G, bq, H)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H)

    out = jax.lax.map(one_query_block, (qb, qpb, qsb))  # (nq, B, bq, N, H)
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, nq * bq, N, H)[:, :T]
    return out.astype(q.dtype)


def _cudnn(q, k, v, q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg, block_size):
    """cuDNN fused attention (`jax.nn.dot_product_attention(implementation=
    "cudnn")`) where it applies: self-attention (T == S) without segment ids,
    bf16/fp16 inputs, a head dim that is a multiple of 8 up to 128 (cuDNN's
    limit before Hopper), and each row's valid keys a prefix (right padding),
    which cuDNN takes as sequence lengths.

    Everything else runs `blockwise`, which handles any mask and, like cuDNN,
    never holds a (T, S) score matrix: packed rows (segment ids, which are long
    by design), unequal query and key lengths, other dtypes or head dims, and
    a batch with a row whose padding is not at its end. That last one is a run
    time fact, so it is a `lax.cond`; both branches' buffers are planned, which
    is why the fallback is blockwise rather than XLA's full score matrix."""
    B, T, N, H = q.shape
    S = k.shape[1]
    fallback = functools.partial(
        _blockwise, q, k, v, q_positions, kv_positions, kv_valid, causal, block_size, q_seg, kv_seg
    )
    if kv_seg is not None or T != S or jnp.dtype(q.dtype).name not in _HALF or H % 8 or H > 128:
        return fallback()
    counts = kv_valid.sum(-1, dtype=jnp.int32)
    right_padded = jnp.all(kv_valid == (jnp.arange(S, dtype=jnp.int32) < counts[:, None]))
    # An all-padding row (count 0) is given one key so that it stays finite.
    lengths = jnp.maximum(counts, 1)

    def fused():
        return jax.nn.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            is_causal=causal,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            implementation="cudnn",
        )

    return jax.lax.cond(right_padded, fused, fallback)


# ------------------------------------------------------------------ splash


def _splash(
    q, k, v, q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg, block_size, interpret
):
    """TPU splash attention: causal or full masks, padding and packing as
    segment ids, GQA through the multi-query kernel (one call per KV head, its
    G query heads together: K and V are never repeated), T queries that are
    the last T of S keys (a causal mask offset by S - T: cached prefill). Under
    a mesh it runs per shard (`_per_shard`). More queries than keys (T > S)
    is no layout this model makes; it runs on XLA. `interpret` runs the Pallas
    interpreter (any platform)."""
    B, T, N, H = q.shape
    S = k.shape[1]
    if T > S:
        mask = visibility_mask(q_positions, kv_positions, kv_valid, causal, q_seg, kv_seg)
        return _xla_heads_major(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
    if kv_seg is None:
        # Padding is a second segment: real tokens (id 1) never see padding (id 0).
        kv_ids = kv_valid.astype(jnp.int32)
        q_ids = kv_ids[:, S - T :]
    else:
        kv_ids = jnp.where(kv_valid, kv_seg, 0).astype(jnp.int32)
        q_ids = q_seg.astype(jnp.int32)
    run = functools.partial(
        _splash_local, causal=causal, block_size=block_size, interpret=interpret
    )
    return _per_shard(run, q, k, v, q_ids, kv_ids)


def _splash_block(n: int, block_size: int) -> int:
    """Splash's block for a sequence of n: the largest multiple of 128 (the
    kernel's lane width) up to `block_size` that divides n rounded up to 128,
    so a sequence is never padded past that (577 vision tokens: 640, not 1024)."""
    n128 = -(-n // 128) * 128
    for b in range(min(block_size, n128) // 128 * 128, 128, -128):
        if n128 % b == 0:
            return b
    return 128


def _splash_local(q, k, v, q_ids, kv_ids, *, causal, block_size, interpret):
    """Splash on one device's arrays: q (B, T, N, H), k and v (B, S, K, H),
    segment ids (B, T) and (B, S). Both lengths are padded up to their block
    with id 0 and the padded queries dropped again; the kernel keeps a query
    row that sees no key finite (forward and backward)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk = _splash_block(T, block_size), _splash_block(S, block_size)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    if Tp > T:
        q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
        q_ids = jnp.pad(q_ids, ((0, 0), (0, Tp - T)))
    if Sp > S:
        k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        kv_ids = jnp.pad(kv_ids, ((0, 0), (0, Sp - S)))
    # Query i is key S - T + i: the offset survives padding both at the end.
    one = sm.CausalMask((Tp, Sp), offset=S - T) if causal else sm.FullMask((Tp, Sp))
    kernel = sk.make_splash_mqa_single_device(
        mask=sm.MultiHeadMask([one] * G),
        block_sizes=sk.BlockSizes(
            block_q=bq,
            block_kv=bk,
            block_q_dkv=bq,
            block_kv_dkv=bk,
            block_q_dq=bq,
            block_kv_dq=bk,
        ),
        interpret=interpret,
    )
    # The kernel takes unscaled logits; scaling q is the cheapest place.
    q = (q * (H**-0.5)).astype(q.dtype)
    qg = q.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, Tp, H)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, Sp, H)

    def row(qr, kr, vr, qi, ki):
        ids = sk.SegmentIds(q=qi, kv=ki)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(row)(qg, kh, vh, q_ids, kv_ids)  # (B, K, G, Tp, H)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T].astype(q.dtype)


def _per_shard(fn, q, k, v, q_ids, kv_ids):
    """`fn(q, k, v, q_ids, kv_ids)` on each device's shard under the current
    mesh (as is outside one): a Pallas kernel is opaque to XLA's partitioner,
    which would gather its inputs onto every device. Batch and heads are split
    by their logical axes (`act_batch`, `act_heads` / `act_kv_heads`), the
    sequence never (splash cannot split its keys); heads stay whole unless
    query and KV heads split alike, so each shard keeps its query groups.
    Axes already manual (inside an enclosing shard_map) are left alone."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q, k, v, q_ids, kv_ids)
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    if not free:
        return fn(q, k, v, q_ids, kv_ids)
    q_spec = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh)
    kv_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh)

    def keep(entry):  # a spec entry without manual axes
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if a in free)
        return axes[0] if len(axes) == 1 else (axes or None)

    batch = keep(q_spec[0])
    heads = keep(q_spec[2]) if q_spec[2] == kv_spec[2] else None
    qs, kvs = P(batch, None, heads, None), P(batch, None, heads, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(qs, kvs, kvs, P(batch, None), P(batch, None)),
        out_specs=qs,
        axis_names=set(free),
        check_vma=False,
    )(q, k, v, q_ids, kv_ids)
