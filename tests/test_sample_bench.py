"""The bytes `bench sample` charges a decode step when it reports MBU."""

import dataclasses

import pytest

from insightv_jax.config import ModelConfig
from insightv_jax.models.factory import construct
from insightv_jax.sample.benchmark import TINY_LM, decode_bytes


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_are_the_weights_a_step_reads_plus_the_whole_cache(tied):
    cfg = dataclasses.replace(TINY_LM, tie_embeddings=tied)
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D  # attn, mlp, norms
    head = D * V  # the LM head, or the tied embeddings read as one; the lookup reads 3 rows
    weights = L * per_layer + D + head
    batch, slots = 3, 48
    kv = 2 * L * batch * K * slots * H
    model = construct(ModelConfig(decoder=cfg))
    assert decode_bytes(model, batch, slots) == 4 * (weights + kv)
