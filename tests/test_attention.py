"""The attention backends agree; the blockwise path handles padding, GQA and
ragged block edges; a model runs unchanged on every backend."""

import dataclasses

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


@pytest.mark.slow
def test_splash_kernel_interpreted_equals_xla():
    """TPU splash attention, run through the Pallas interpreter on CPU."""
    q, k, v, pos, valid, lengths = _inputs(T=128, H=128, lengths=(128, 100))
    a = attn.attention(q, k, v, pos, pos, valid)
    c = attn._splash(q, k, v, valid, True, 128, interpret=True)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(c[row, :n]), np.asarray(a[row, :n]), atol=1e-5)


def test_splash_refuses_off_tpu():
    with pytest.raises(ValueError, match="needs a TPU"):
        attn.resolve("splash", "cpu")


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
