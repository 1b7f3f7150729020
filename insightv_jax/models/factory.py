"""Models from configs: abstract (no memory), random-initialised, or sharded.

Modules are always built with Flax's eager sharding off; shardings come from
each parameter's logical axis names through `parallel.state_shardings`, so one
code path serves 1 CPU and a pod. Kernel choices that depend on the platform
(the attention implementation, `attention.resolve` of the config's backend,
the platform and the compute dtype) are made here, once, and passed to the
modules as concrete choices.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from insightv_jax.config import ModelConfig
from insightv_jax.models import attention
from insightv_jax.models.decoder import Decoder
from insightv_jax.models.interface import CausalLM
from insightv_jax.parallel import platform as current_platform
from insightv_jax.parallel import state_shardings


def _attention(part, platform: str) -> str:
    """The attention implementation of a decoder or vision config on `platform`."""
    return attention.resolve(part.attention, platform, part.dtype)


def attention_impl(part, platform: str | None = None) -> str:
    """The attention implementation of a decoder or vision config (`part`) where
    JAX runs (or on `platform`): for code that builds one part alone."""
    return _attention(part, platform or current_platform())


def construct(cfg: ModelConfig, seed: int = 0, platform: str | None = None) -> CausalLM:
    """Build the model named by `cfg.kind` with random weights (unsharded), its
    kernels chosen for `platform` (cpu, gpu, tpu; default: where JAX runs)."""
    platform = platform or current_platform()
    with nnx.use_eager_sharding(False):
        if cfg.kind == "causal_lm":
            impl = _attention(cfg.decoder, platform)
            return Decoder(cfg.decoder, attention_impl=impl, rngs=nnx.Rngs(seed))
        if cfg.kind in ("llava", "llava_next"):
            from insightv_jax.models.llava import LlavaModel

            return LlavaModel(
                cfg,
                attention_impl=_attention(cfg.decoder, platform),
                vision_attention_impl=_attention(cfg.vision, platform),
                rngs=nnx.Rngs(seed),
            )
        if cfg.is_qwen_vl:
            from insightv_jax.models.qwen_vl import QwenVL

            return QwenVL(
                cfg,
                attention_impl=_attention(cfg.decoder, platform),
                vision_attention_impl=_attention(cfg.qwen_vision, platform),
                rngs=nnx.Rngs(seed),
            )
    raise ValueError(f"unknown model kind {cfg.kind!r}")


def abstract_model(cfg: ModelConfig, mesh: Mesh):
    """(graphdef, abstract state with ShapeDtypeStructs carrying shardings)."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: construct(cfg, platform=current_platform(mesh)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings
    )
    return graphdef, state


def init_model(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> nnx.Module:
    """A randomly initialised model whose parameters are created sharded on `mesh`."""
    graphdef, abstract = abstract_model(cfg, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    @jax.jit
    def make():
        return nnx.split(construct(cfg, seed, current_platform(mesh)))[1]

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_images(cfg: ModelConfig):
    """How the training loader lays out this model's images once a batch's
    rows are padded (the `images` of `data.loader.Collate`): Qwen-VL's
    `qwen_vl.BatchImages`; None for LLaVA's per-sample stacking."""
    if cfg.is_qwen_vl:
        from insightv_jax.models.qwen_vl import BatchImages

        return BatchImages(cfg)
    return None
