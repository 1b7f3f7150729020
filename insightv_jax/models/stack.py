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
