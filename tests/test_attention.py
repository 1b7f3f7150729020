"""The attention backends agree; the blockwise path handles padding, GQA and
ragged block edges; packed rows (segment ids) equal their records run alone on
every backend; splash (Pallas interpreter) equals XLA for causal, padding,
segment, GQA, unequal-length and sharded inputs; cuDNN equals XLA on a GPU; a
model runs unchanged on every backend."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.models import attention as attn
from insightv_jax.models.factory import construct


def _inputs(B=2, T=37, N=4, K=2, H=8, lengths=(37, 20), seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.arange(T)[None] < jnp.array(lengths)[:, None]
    return q, k, v, pos, valid, lengths


@pytest.mark.parametrize("block", [8, 16, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_equals_xla(block, causal):
    q, k, v, pos, valid, lengths = _inputs()
    a = attn.attention(q, k, v, pos, pos, valid, causal=causal)
    b = attn.attention(
        q, k, v, pos, pos, valid, causal=causal, backend="blockwise", block_size=block
    )
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(b[row, :n]), np.asarray(a[row, :n]), atol=2e-6)


def test_xla_matches_naive_softmax():
    q, k, v, pos, valid, _ = _inputs(N=2, K=2)
    mask = attn.visibility_mask(pos, pos, valid, True)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(mask[:, None], s, -jnp.inf)
    ref = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)
    out = attn.attention(q, k, v, pos, pos, valid)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-5)


def test_blockwise_gradients_match_xla():
    q, k, v, pos, valid, _ = _inputs(T=24, lengths=(24, 24))

    def loss(backend, q, k, v):
        return (attn.attention(q, k, v, pos, pos, valid, backend=backend, block_size=8) ** 2).sum()

    ga = jax.grad(lambda *a: loss("xla_grouped", *a), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *a: loss("blockwise", *a), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=5e-5)


def _packed(records, T, N=4, K=2, H=8, seed=1):
    """One row holding `records` (their lengths) back to back, then padding to
    T: (q, k, v, positions restarting per record, segment ids 1.. with 0 for
    padding)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (1, T, N, H))
    k = jax.random.normal(ks[1], (1, T, K, H))
    v = jax.random.normal(ks[2], (1, T, K, H))
    seg = np.zeros((1, T), np.int32)
    pos = np.zeros((1, T), np.int32)
    start = 0
    for i, n in enumerate(records):
        seg[0, start : start + n] = i + 1
        pos[0, start : start + n] = np.arange(n)
        start += n
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize(
    "backend,heads_major",
    [
        ("xla_grouped", False),
        ("xla_dot_product", False),
        ("blockwise", False),
        ("xla_grouped", True),  # the cache layout
        ("cudnn", False),  # off a GPU a packed row takes cuDNN's fallback (blockwise)
    ],
)
def test_packed_row_equals_its_records_alone(backend, heads_major):
    """A row of three records (segment ids, positions restarting at 0) gives
    each record the attention it gets alone. Padding is segment 0 with
    kv_valid all True: the ids alone must hide it."""
    records, T = (13, 17, 6), 40
    q, k, v, pos, seg = _packed(records, T)
    valid = jnp.ones((1, T), bool)

    @jax.jit
    def run(q, k, v, pos, valid, seg=None):
        if heads_major:
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        return attn.attention(
            q, k, v, pos, pos, valid, backend=backend, block_size=8, heads_major=heads_major,
            q_segment_ids=seg,
        )  # fmt: skip

    packed = run(q, k, v, pos, valid, seg)
    start = 0
    for n in records:
        sl = slice(start, start + n)
        alone = run(q[:, sl], k[:, sl], v[:, sl], pos[:, sl], valid[:, sl])
        np.testing.assert_allclose(np.asarray(packed[:, sl]), np.asarray(alone), atol=2e-6)
        start += n


def test_segment_ids_need_both_sides_when_lengths_differ():
    q, k, v = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 8, 2, 8)), jnp.zeros((1, 8, 2, 8))
    pos, valid = jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        attn.attention(q, k, v, pos[:, :4], pos, valid, q_segment_ids=pos[:, :4])


# Splash through the Pallas interpreter: its blocks are multiples of 128, so
# the shapes are the smallest that still have two blocks somewhere.


def _splash_case(B=2, T=128, S=128, N=4, K=2, H=128, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, S, K, H))
    v = jax.random.normal(ks[2], (B, S, K, H))
    kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    return q, k, v, kv_pos[:, S - T :], kv_pos


def _both(q, k, v, q_pos, kv_pos, valid, **kw):
    ref = attn.attention(q, k, v, q_pos, kv_pos, valid, **kw)
    out = attn.attention(q, k, v, q_pos, kv_pos, valid, backend="splash_interpret", **kw)
    return np.asarray(out), np.asarray(ref)


# GQA and MQA (K and V never repeated); the vision tower's full mask
@pytest.mark.parametrize("causal,N,K", [(True, 4, 2), (True, 2, 1), (False, 4, 2)])
def test_splash_padding_equals_xla(causal, N, K):
    q, k, v, pos, _ = _splash_case(N=N, K=K)
    lengths = (128, 100)
    valid = jnp.arange(128)[None] < jnp.array(lengths)[:, None]
    out, ref = _both(q, k, v, pos, pos, valid, causal=causal)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(out[row, :n], ref[row, :n], atol=1e-5)
    assert np.isfinite(out).all()  # padding rows too


def test_splash_packed_rows_equal_xla():
    """Segment ids: two rows packed differently (record edges inside and
    across splash's 128-token blocks), padding as segment 0."""
    T = 256
    q, k, v, _, _ = _splash_case(T=T, S=T)
    seg = np.zeros((2, T), np.int32)
    pos = np.zeros((2, T), np.int32)
    for row, records in enumerate([(100, 90, 50), (200, 40)]):
        start = 0
        for i, n in enumerate(records):
            seg[row, start : start + n] = i + 1
            pos[row, start : start + n] = np.arange(n)
            start += n
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    valid = jnp.ones((2, T), bool)
    out, ref = _both(q, k, v, pos, pos, valid, q_segment_ids=seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)


def test_splash_queries_after_a_prefix_equal_xla():
    """T = 128 queries that are the last of S = 256 keys (a prefill after a
    cached prefix), with one row left-padded."""
    q, k, v, q_pos, kv_pos = _splash_case(T=128, S=256)
    valid = jnp.ones((2, 256), bool).at[1, :40].set(False)
    out, ref = _both(q, k, v, q_pos, kv_pos, valid)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_splash_gradients_equal_xla():
    T = 256
    q, k, v, pos, _ = _splash_case(T=T, S=T, N=2, K=1)
    seg = jnp.broadcast_to(jnp.where(jnp.arange(T) < 150, 1, 2), (2, T))
    pos = jnp.where(seg == 1, jnp.arange(T), jnp.arange(T) - 150)
    valid = jnp.arange(T)[None] < jnp.array([[T], [220]])

    def loss(backend, q, k, v):
        out = attn.attention(q, k, v, pos, pos, valid, backend=backend, q_segment_ids=seg)
        return (jnp.where(valid[..., None, None], out, 0.0) ** 2).sum()

    grads = [
        jax.grad(functools.partial(loss, b), argnums=(0, 1, 2))(q, k, v)
        for b in ("xla_grouped", "splash_interpret")
    ]
    for ref, out in zip(*grads):
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)


def test_splash_sharded_on_a_mesh_equals_xla(eight_devices):
    """Under a data 2 × fsdp 2 × tensor 2 mesh the kernel runs per shard
    (shard_map): each device gets one row and one KV head with its two query
    heads."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from insightv_jax.config import MeshConfig
    from insightv_jax.parallel import make_mesh

    B, T = 4, 128
    q, k, v, pos, _ = _splash_case(B=B, T=T, S=T)
    seg = jnp.asarray(np.repeat([[1] * 60 + [2] * 50 + [0] * 18], B, 0), jnp.int32)
    pos = jnp.where(seg == 2, pos - 60, pos)
    valid = jnp.ones((B, T), bool)
    ref = attn.attention(q, k, v, pos, pos, valid, q_segment_ids=seg)

    mesh = make_mesh(MeshConfig(2, 2, 2), eight_devices)
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    pos, valid, seg = (jax.device_put(x, rows) for x in (pos, valid, seg))

    def f(q, k, v, pos, valid, seg):
        return attn.attention(
            q, k, v, pos, pos, valid, backend="splash_interpret", q_segment_ids=seg
        )

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, pos, valid, seg))
        out = jax.jit(f)(q, k, v, pos, valid, seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)


def test_splash_and_cudnn_refuse_other_platforms():
    with pytest.raises(ValueError, match="needs a TPU"):
        attn.resolve("splash", "cpu")
    with pytest.raises(ValueError, match="needs a GPU"):
        attn.resolve("cudnn", "tpu")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        attn.resolve("cudnn", "gpu", "float32")


def test_cudnn_fallbacks_equal_xla_off_a_gpu():
    """What cuDNN cannot express never reaches it: fp32 inputs run blockwise,
    so this runs on a CPU too (packed rows: see the packed-row test)."""
    q, k, v, pos, valid, lengths = _inputs()
    out = attn.attention(q, k, v, pos, pos, valid, backend="cudnn", block_size=16)
    ref = attn.attention(q, k, v, pos, pos, valid)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(out[row, :n]), np.asarray(ref[row, :n]), atol=2e-6)


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="cuDNN fused attention needs a GPU (run with JAX_PLATFORMS=cuda)",
)
def test_cudnn_equals_xla_in_bf16_on_gpu():
    """cuDNN in bf16 against XLA on the same bf16 inputs: outputs within 2e-2
    (bf16 keeps 8 bits of mantissa; cuDNN rounds the probabilities to bf16
    before the value product), gradients within 5 % of their largest entry.
    Right padding goes to cuDNN (its custom call is in the program); a
    left-padded row takes the run-time fallback."""
    B, T, N, K, H = 2, 256, 8, 2, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    right = jnp.arange(T)[None] < jnp.array([[T], [170]])
    left = jnp.ones((B, T), bool).at[1, :50].set(False)

    def f(backend, valid, q, k, v):
        return attn.attention(q, k, v, pos, pos, valid, backend=backend)

    hlo = jax.jit(functools.partial(f, "cudnn", right)).lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower()
    for valid in (right, left):
        out = f("cudnn", valid, q, k, v).astype(jnp.float32)
        ref = f("xla_dot_product", valid, q, k, v).astype(jnp.float32)
        real = np.asarray(valid)
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-2)

        def loss(backend, q, k, v, valid=valid):
            out = f(backend, valid, q, k, v).astype(jnp.float32)
            return (jnp.where(valid[..., None, None], out, 0.0) ** 2).sum()

        grads = [
            jax.grad(functools.partial(loss, b), argnums=(0, 1, 2))(q, k, v)
            for b in ("xla_dot_product", "cudnn")
        ]
        for g_ref, g_out in zip(*grads):
            g_ref, g_out = np.asarray(g_ref, np.float32), np.asarray(g_out, np.float32)
            np.testing.assert_allclose(g_out, g_ref, atol=0.05 * np.abs(g_ref).max())


def test_model_same_logits_on_blockwise_backend():
    base = DecoderConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        attention_block_size=8,
    )
    ids = np.random.RandomState(0).randint(0, 61, (2, 29))
    a = construct(ModelConfig(decoder=base), seed=3)(ids)
    b = construct(ModelConfig(decoder=dataclasses.replace(base, attention="blockwise")), seed=3)(
        ids
    )
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_remat_policies_give_same_gradients():
    from flax import nnx

    base = DecoderConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
    )
    ids = np.random.RandomState(0).randint(0, 61, (2, 9))
    grads = []
    for remat in ("none", "full", "dots"):
        model = construct(ModelConfig(decoder=dataclasses.replace(base, remat=remat)), seed=1)
        g = nnx.grad(lambda m: m(ids).mean())(model)
        grads.append(np.asarray(g["layers"]["mlp"]["up_proj"][...]))
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-7)
    np.testing.assert_allclose(grads[2], grads[0], atol=1e-7)


def test_decoder_on_splash_equals_xla():
    """A whole decoder (GQA, a padded row) with splash as its kernel, as a TPU
    build gets it, gives XLA's logits on real tokens."""
    from flax import nnx

    from insightv_jax.models.decoder import Decoder

    cfg = DecoderConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    ids = np.random.RandomState(0).randint(0, 61, (2, 20))
    mask = np.arange(20)[None] < np.array([[20], [13]])
    logits = []
    for impl in ("xla_grouped", "splash_interpret"):
        with nnx.use_eager_sharding(False):  # as models.factory builds
            model = Decoder(cfg, attention_impl=impl, rngs=nnx.Rngs(0))
        logits.append(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    np.testing.assert_allclose(np.asarray(logits[1])[mask], np.asarray(logits[0])[mask], atol=1e-5)
