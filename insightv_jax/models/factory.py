"""Models from configs: abstract (no memory), random-initialised, or sharded.

Modules are always built with Flax's eager sharding off; shardings come from
each parameter's logical axis names through `parallel.state_shardings`, so one
code path serves 1 CPU and a pod.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from insightv_jax.config import ModelConfig
from insightv_jax.models.decoder import Decoder
from insightv_jax.parallel import state_shardings


def construct(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
    """Build the model named by `cfg.kind` with random weights (unsharded)."""
    with nnx.use_eager_sharding(False):
        if cfg.kind == "causal_lm":
            return Decoder(cfg.decoder, rngs=nnx.Rngs(seed))
        if cfg.kind in ("llava", "llava_next"):
            from insightv_jax.models.llava import LlavaModel

            return LlavaModel(cfg, rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown model kind {cfg.kind!r}")


def abstract_model(cfg: ModelConfig, mesh: Mesh):
    """(graphdef, abstract state with ShapeDtypeStructs carrying shardings)."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: construct(cfg))
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
        return nnx.split(construct(cfg, seed))[1]

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def model_state(model: nnx.Module) -> nnx.State:
    """The parameter state of a model."""
    return nnx.state(model, nnx.Param)
