"""Stacked layers: build N identical NNX layers as one module with a leading
`layers` axis, and run them with `lax.scan` (optionally rematerialised).

A pod-size model then compiles one layer body instead of N copies, and the HF
key maps index into the stack (`layers.attn.q_proj[i]` is HF layer i).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    """`num_layers` independent initialisations of `make`, stacked on axis 0.

    Every parameter's logical axes get a leading `layers` name.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs):
        return make(r)

    return create(rngs)


def scan_layers(
    layers: nnx.Module,
    x: jax.Array,
    *args: Any,
    remat: str = "none",
    collect: bool = False,
    scan: bool = True,
):
    """Run `layers` over `x`: x = layer_i(x, *args) for i in order — a `lax.scan`
    over stacked layers, a Python loop (unrolled) over a list of layers (see
    `sample.decode_transform`) or with `scan=False`.

    Scanning compiles one layer body whatever the depth (pod-size models);
    unrolling lets XLA schedule across layers and drops the loop's stacked
    residual buffers, which is faster for the few layers of small models.
    Returns (x, per-layer outputs stacked on axis 0, or None unless `collect`).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r} ({', '.join(REMAT_POLICIES)})")
    if isinstance(layers, nnx.List) or not scan:
        n = len(layers) if isinstance(layers, nnx.List) else _depth(layers)
        hs = []
        for layer in layer_modules(layers, n):
            graphdef, layer_state = nnx.split(layer)
            x, _ = _body(graphdef, args, remat, False)(x, layer_state)
            hs.append(x)
        return x, (jax.numpy.stack(hs) if collect else None)
    graphdef, state = nnx.split(layers)
    return jax.lax.scan(_body(graphdef, args, remat, collect), x, state)


def _body(graphdef: nnx.GraphDef, args: tuple, remat: str, collect: bool):
    """(h, layer state) -> (layer(h, *args), h or None), rematerialised per policy."""

    def body(h, layer_state):
        h = nnx.merge(graphdef, layer_state)(h, *args)
        return h, (h if collect else None)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return body


def _depth(layers: nnx.Module) -> int:
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def layer_modules(layers: nnx.Module, num_layers: int) -> list[nnx.Module]:
    """Layer i as a module, for code that visits layers in Python order: a
    list of layers as it is, stacked ones by slicing (inside `jit` XLA then
    copies each slice; `sample.decode_transform` unstacks once instead)."""
    if isinstance(layers, nnx.List):
        return list(layers)
    graphdef, state = nnx.split(layers)
    return [
        nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(num_layers)
    ]
