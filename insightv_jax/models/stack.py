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
    per_layer: Any = None,
    remat: str = "none",
    collect: bool = False,
):
    """Run stacked `layers` over `x`: x = layer_i(x, *args) for i in order.

    Returns (x, per-layer outputs stacked on axis 0, or None unless `collect`).
    With `per_layer` (a pytree with a leading layers axis, e.g. a KV cache),
    layer i is called as `layer_i(x, *args, per_layer[i])` and must return
    `(x, new_per_layer_i)`; the stacked new values come back as a third result.
    """
    if isinstance(layers, nnx.List):  # unstacked (a decoding view): a Python loop
        return _loop_layers(layers, x, *args, per_layer=per_layer, collect=collect)
    graphdef, state = nnx.split(layers)

    def body(h, xs):
        layer_state, extra = xs
        layer = nnx.merge(graphdef, layer_state)
        if per_layer is None:
            h, out = layer(h, *args), None
        else:
            h, out = layer(h, *args, extra)
        return h, (h if collect else None, out)

    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r} ({', '.join(REMAT_POLICIES)})")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    h, (collected, outs) = jax.lax.scan(body, x, (state, per_layer))
    return (h, collected) if per_layer is None else (h, collected, outs)


def _loop_layers(layers, x, *args, per_layer=None, collect=False):
    hs, outs = [], []
    for i, layer in enumerate(layers):
        if per_layer is None:
            x = layer(x, *args)
        else:
            x, out = layer(x, *args, jax.tree.map(lambda a, i=i: a[i], per_layer))
            outs.append(out)
        hs.append(x)
    collected = jax.numpy.stack(hs) if collect else None
    if per_layer is None:
        return x, collected
    return x, collected, jax.tree.map(lambda *a: jax.numpy.stack(a), *outs)


def unstack_layers(layers: nnx.Module, num_layers: int) -> nnx.List:
    """The stacked `layers` as `num_layers` separate modules (each parameter
    sliced once, its leading `layers` axis name dropped)."""
    graphdef, state = nnx.split(layers)
    out = []
    for i in range(num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
        for _, var in nnx.iter_graph(layer):
            if isinstance(var, nnx.Variable):
                _drop_layers_axis(var)
        out.append(layer)
    return nnx.List(out)


def _drop_layers_axis(var: nnx.Variable) -> None:
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if isinstance(names, tuple) and names and names[0] == "layers":
            var.set_metadata(key, names[1:])


def layer_modules(layers: nnx.Module, num_layers: int) -> list[nnx.Module]:
    """Layer i as a module, for code that visits layers in Python order:
    unstacked layers as they are, stacked ones by slicing (inside `jit` XLA
    then copies each slice; `unstack_layers` once avoids that)."""
    if isinstance(layers, nnx.List):
        return list(layers)
    graphdef, state = nnx.split(layers)
    return [
        nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(num_layers)
    ]
