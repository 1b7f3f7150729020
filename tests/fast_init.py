"""Random models for tests without XLA compiles: `construct`'s per-shape random draws
(threefry) compile for seconds on CPU, the same draws in NumPy take milliseconds."""

import jax
import numpy as np
from flax import nnx

from insightv_jax.models.factory import construct
from insightv_jax.models.linear import INIT_STD


def _value(path: tuple[str, ...], shape, dtype, rng: np.random.Generator) -> np.ndarray:
    """`construct`'s initialisation by name: norm scales 1, biases 0, the rest
    normal(0, INIT_STD)."""
    name = path[-1]
    if "bias" in name:
        return np.zeros(shape, dtype)
    if name == "weight" and any("norm" in p or p.startswith("ln") for p in path[:-1]):
        return np.ones(shape, dtype)
    return (INIT_STD * rng.standard_normal(shape, np.float32)).astype(dtype)


def numpy_params(cfg, seed: int = 0) -> dict:
    """A pure dict of parameters for the model `cfg`, initialised like `construct`."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: construct(cfg, seed)), nnx.Param))
    rng = np.random.default_rng(seed)

    def fill(tree, path=()):
        if isinstance(tree, dict):
            return {k: fill(v, (*path, str(k))) for k, v in sorted(tree.items())}
        return _value(path, tree.shape, tree.dtype, rng)

    return fill(abstract)


def numpy_model(cfg, seed: int = 0):
    """`construct(cfg, seed)`'s model with `numpy_params` as its weights."""
    model = nnx.eval_shape(lambda: construct(cfg, seed))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.device_put(numpy_params(cfg, seed)))
    return nnx.merge(graphdef, state)
