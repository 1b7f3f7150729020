"""Growing a model's vocabulary (e.g. for the think tokens): new embedding and
LM-head rows are the mean of the existing rows."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from insightv_jax.config import ModelConfig
from insightv_jax.models.factory import construct


def grow_vocab(model: nnx.Module, cfg: ModelConfig, new_size: int):
    """Return (model, cfg) with `decoder.vocab_size == new_size` (never shrinks)."""
    old = cfg.decoder.vocab_size
    if new_size <= old:
        return model, cfg
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dec = state["decoder"] if cfg.is_vlm else state
    extra = new_size - old
    emb = dec["embed"]
    dec["embed"] = jnp.concatenate([emb, jnp.repeat(emb.mean(0, keepdims=True), extra, 0)], 0)
    if "lm_head" in dec:
        head = dec["lm_head"]
        mean = jnp.repeat(head.mean(1, keepdims=True), extra, 1)
        dec["lm_head"] = jnp.concatenate([head, mean], 1)
    new_cfg = dataclasses.replace(
        cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=new_size)
    )
    abstract = nnx.eval_shape(lambda: construct(new_cfg))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, state)
    return nnx.merge(graphdef, params, rest), new_cfg
