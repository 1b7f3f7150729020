"""Parameters with logical axis names, and the one dense contraction every
projection uses.

`dense` flattens the token axes (batch, sequence, ...) into one before the
matmul. XLA:CPU runs a 2-D (tokens, features) matmul and its weight gradient
without layout copies, while a 3-D einsum such as `btd,df->btf` contracts two
axes in the weight gradient and gets transposed copies of its operands.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # HF's default initializer_range


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float = INIT_STD) -> nnx.Param:
    """A normal(0, std) parameter tagged with logical axis names."""
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes)


def zeros(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes)


def dense(x: jax.Array, w: jax.Array, axes: int = 1, out_dtype=None) -> jax.Array:
    """Contract the last `axes` axes of `x` with the first `axes` axes of `w`:
    x (..., *In) @ w (*In, *Out) -> (..., *Out), as one 2-D matmul. `out_dtype`
    (e.g. fp32 for bf16 operands) is the product's dtype, accumulated in it."""
    lead, k = x.shape[: x.ndim - axes], math.prod(x.shape[x.ndim - axes :])
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(lead + w.shape[axes:])
