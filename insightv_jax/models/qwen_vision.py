"""Qwen2-VL and Qwen2.5-VL vision towers in Flax NNX.

Images and videos arrive as Hugging Face's image processor packs them: every
item's patches flattened into one sequence, `pixel_values` (L, C*T*p*p), with
`grid_thw` (n, 3) giving each item's (time, height, width) in patches. The
processor orders each frame's patches by 2x2 merge unit (the four patches of
one unit are consecutive), so the merger at the end only reshapes.

Read top to bottom:
  host side (NumPy, from `grid_thw`): `vision_layout` builds everything that
  depends on the image sizes -- rotary (row, column) ids, which patches may
  attend to each other, and (Qwen2.5-VL) the window order -- as arrays of a
  fixed length, so one compiled program serves every batch padded to that
  length (`pad_patches`);
  device side: the patch embedding (HF's Conv3d with kernel = stride, i.e. a
  matmul over the flattened patch), pre-norm blocks with 2-D rotary attention
  restricted to a segment (an image frame, or a window of one), and the 2x2
  `PatchMerger` into the language model's width.

Qwen2-VL: LayerNorm, fc1/fc2 MLP (quick-GELU), every block over whole frames.
Qwen2.5-VL: RMSNorm, SwiGLU MLP with biases; patches are reordered window by
window before the blocks (windows of `window_size` pixels, smaller at the
right and bottom edges), blocks in `fullatt_block_indexes` attend to whole
frames and the others within windows, and the merged tokens are put back in
image order after the merger.

The tower runs on a batch of such sequences, one per sample (B, L, ...):
each sample's images are packed and padded to the same L, so that images
shard with their samples over the data axes; the host builds one layout
per sample and stacks them.

Shapes: B samples, L patches (padded), D width, N heads, H head dim, F MLP
width, O the merger's output width (the language model's).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insightv_jax.config.qwen_vision import QwenVisionConfig
from insightv_jax.models.attention import attention
from insightv_jax.models.decoder import RMSNorm
from insightv_jax.models.linear import dense, param, zeros
from insightv_jax.models.rope import apply_rope
from insightv_jax.models.stack import REMAT_POLICIES, stack_layers
from insightv_jax.models.vision import ACTIVATIONS as _VIT_ACTIVATIONS
from insightv_jax.models.vision import LayerNorm
from insightv_jax.parallel import constrain_sharding

ACTIVATIONS = {**_VIT_ACTIVATIONS, "silu": jax.nn.silu}
_NEG = -1e30  # finite "minus infinity", as in models.attention
_ROWS = ("act_batch", "act_length")  # the leading (B, L) axes of the tower's activations

# ------------------------------------------------------------------ host side


class VisionLayout(NamedTuple):
    """What the tower needs to know about a packed batch besides its pixels,
    all of length L (or L / merge unit), built on the host by `vision_layout`.

    `order`: processing slot j holds input patch order[j] (the window order;
    the identity for Qwen2-VL). `positions` (L, 2): each slot's (row, column)
    rotary ids. `full_segments` / `window_segments` (L,): a slot attends to the
    slots of its own segment -- its frame, or its window of that frame.
    `restore` (L / merge unit,): output token i is merged token restore[i]
    (image order again). Padding slots form one segment of their own.
    The tower takes one layout per sample, stacked (a leading B axis)."""

    order: np.ndarray
    positions: np.ndarray
    full_segments: np.ndarray
    window_segments: np.ndarray
    restore: np.ndarray


def _grids(grid_thw, merge: int) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (grid < 1).any() or (grid[:, 1:] % merge).any():
        raise ValueError(
            f"grid_thw {grid.tolist()}: sizes must be positive and heights and widths "
            f"multiples of spatial_merge_size={merge}"
        )
    return grid


def num_patches(grid_thw) -> int:
    """Patches of a packed batch (the rows of its `pixel_values`)."""
    return int(np.prod(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3), axis=1).sum())


def merged_tokens(grid_thw, spatial_merge_size: int) -> np.ndarray:
    """Output tokens per item (n,): where to split the tower's output."""
    grid = _grids(grid_thw, spatial_merge_size)
    return grid.prod(axis=1) // spatial_merge_size**2


def _item_units(t: int, h: int, w: int, window: int | None):
    """One item's merge units (t x h x w of them) in processing order, each
    unit's window (None: no windows, one per frame) and its frame."""
    ti, r, c = (
        a.ravel() for a in np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    )
    if window is None:
        return np.arange(t * h * w), ti, ti
    # Windows tile each frame row-major from the top-left corner, so those on
    # the bottom and right edges are cut short; inside a window units stay
    # row-major. lexsort's last key is the primary one.
    order = np.lexsort((c % window, r % window, c // window, r // window, ti))
    per_row = -(-w // window)
    per_frame = -(-h // window) * per_row
    win = ti * per_frame + (r // window) * per_row + c // window
    return order, win[order], ti[order]


def vision_layout(grid_thw, cfg: QwenVisionConfig, num_slots: int | None = None) -> VisionLayout:
    """The `VisionLayout` of items of `grid_thw` (n, 3) packed in order, padded
    to `num_slots` patches (default: no padding; a multiple of the merge unit).

    Rotary ids are each patch's (row, column) in its frame; videos repeat them
    per frame. Attention never crosses frames: Hugging Face's `cu_seqlens`
    has one segment per frame of every item."""
    m = cfg.spatial_merge_size
    unit = cfg.merge_unit
    grid = _grids(grid_thw, m)
    window = cfg.window_units if cfg.windowed else None
    orders, rows, cols, frames, windows = [], [], [], [], []
    unit_base = frame_base = window_base = 0
    for t, h, w in grid.tolist():
        order, win, frame = _item_units(t, h // m, w // m, window)
        # Row/column of every patch of one frame in the processor's order:
        # unit (R, C) then (i, j) inside it -> patch (R*m + i, C*m + j).
        R, C, i, j = np.meshgrid(
            np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij"
        )
        frame_rows, frame_cols = (R * m + i).reshape(-1, unit), (C * m + j).reshape(-1, unit)
        units_per_frame = (h // m) * (w // m)
        in_frame = order % units_per_frame
        rows.append(frame_rows[in_frame])
        cols.append(frame_cols[in_frame])
        orders.append(order + unit_base)
        frames.append(frame + frame_base)
        windows.append(win + window_base)
        unit_base += t * units_per_frame
        frame_base += t
        window_base += int(win.max()) + 1
    n_units = unit_base
    slots = n_units * unit if num_slots is None else num_slots
    if slots < n_units * unit or slots % unit:
        raise ValueError(
            f"num_slots={slots} must be a multiple of {unit} and hold the "
            f"{n_units * unit} patches of grid_thw"
        )
    pad_units = slots // unit - n_units
    unit_order = np.concatenate([*orders, np.arange(n_units, n_units + pad_units)])
    pad_seg = np.full(pad_units, max(frame_base, window_base), np.int64)

    def per_patch(x):  # a value per unit -> per patch (the unit's patches are consecutive)
        return np.repeat(x, unit).astype(np.int32)

    patch_order = (unit_order[:, None] * unit + np.arange(unit)).reshape(-1)
    positions = np.stack(
        [
            np.concatenate([*(r.reshape(-1) for r in rows), np.zeros(pad_units * unit, np.int64)]),
            np.concatenate([*(c.reshape(-1) for c in cols), np.zeros(pad_units * unit, np.int64)]),
        ],
        axis=-1,
    )
    return VisionLayout(
        order=patch_order.astype(np.int32),
        positions=positions.astype(np.int32),
        full_segments=per_patch(np.concatenate([*frames, pad_seg])),
        window_segments=per_patch(np.concatenate([*windows, pad_seg])),
        restore=np.argsort(unit_order).astype(np.int32),
    )


def pad_patches(pixel_values: np.ndarray, num_slots: int) -> np.ndarray:
    """`pixel_values` (L, C*T*p*p) padded with zero rows to `num_slots` rows."""
    pixel_values = np.asarray(pixel_values)
    extra = num_slots - pixel_values.shape[0]
    if extra < 0:
        raise ValueError(f"{pixel_values.shape[0]} patches do not fit in num_slots={num_slots}")
    return np.pad(pixel_values, ((0, extra), (0, 0)))


# ---------------------------------------------------------------- the modules


def vision_rope(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B, L, 1, H/2) fp32 of the 2-D rotary embedding at (row,
    column) ids `positions` (B, L, 2): the first H/4 angles come from the row,
    the next H/4 from the column, both over the same H/4 frequencies. Applied
    with `rope.apply_rope` (the half-split layout Hugging Face uses here too)."""
    quarter = head_dim // 2
    inv = 1.0 / (theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    angles = angles.reshape(*positions.shape[:2], -1)  # (B, L, [row freqs, column freqs])
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """Bidirectional attention of packed tokens q, k, v (B, L, N, H), a token
    seeing exactly the tokens of its own segment (`segments` (B, L)): Hugging
    Face's `cu_seqlens` as a block-diagonal mask, with static shapes. Scores
    and softmax in fp32; every token sees itself, so no row is empty."""
    H = q.shape[-1]
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * H**-0.5
    same = segments[:, None, :, None] == segments[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(same, scores, _NEG), axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)


def _gather_rows(x: jax.Array, index) -> jax.Array:
    """x (B, L, ...) with row j of sample b taken from row index[b, j]."""
    index = jnp.asarray(index)
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


class QwenVisionAttention(nnx.Module):
    """Multi-head self-attention with biases on q, k, v and the output,
    rotated by the 2-D rotary embedding, restricted to a segment (a frame or a
    window of one). `attention_impl` (`attention.resolve` of the config's
    `attention`): the XLA implementations take the block-diagonal mask of
    `segment_attention`; the others (blockwise, splash, cudnn's fallback) the
    segments as `models.attention` segment ids, never holding (L, L) scores."""

    def __init__(self, cfg: QwenVisionConfig, *, attention_impl: str, rngs: nnx.Rngs):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.attention_impl = attention_impl
        for name in ("q", "k", "v"):
            w = param(rngs, (D, N, H), ("vision_embed", "vision_heads", "head_dim"), pd)
            setattr(self, f"{name}_proj", w)
            setattr(self, f"{name}_bias", zeros((N, H), ("vision_heads", "head_dim"), pd))
        self.o_proj = param(rngs, (N, H, D), ("vision_heads", "head_dim", "vision_embed"), pd)
        self.o_bias = zeros((D,), ("vision_embed",), pd)

    def __call__(self, x, rope, segments):
        dt = jnp.dtype(self.cfg.dtype)

        def project(name):
            w, b = getattr(self, f"{name}_proj"), getattr(self, f"{name}_bias")
            return dense(x, w[...].astype(dt)) + b[...].astype(dt)

        q, k = apply_rope(project("q"), rope), apply_rope(project("k"), rope)
        if self.attention_impl.startswith("xla"):
            out = segment_attention(q, k, project("v"), segments)
        else:
            B, L = segments.shape
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
            out = attention(
                q, k, project("v"), positions, positions, jnp.ones((B, L), bool),
                causal=False, backend=self.attention_impl,
                block_size=self.cfg.attention_block_size,
                q_segment_ids=segments + 1,  # attention's id 0 is padding; ours start at 0
            )  # fmt: skip
        return dense(out, self.o_proj[...].astype(dt), axes=2) + self.o_bias[...].astype(dt)


class QwenVisionMLP(nnx.Module):
    """Qwen2-VL: fc2(act(fc1(x))). Qwen2.5-VL: down(act(gate(x)) * up(x)).
    Every projection has a bias."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.gated = cfg.family == "qwen2_5_vl"
        ins = ("gate", "up") if self.gated else ("fc1",)
        for name in ins:
            setattr(self, f"{name}_proj", param(rngs, (D, F), ("vision_embed", "vision_mlp"), pd))
            setattr(self, f"{name}_bias", zeros((F,), ("vision_mlp",), pd))
        out = "down" if self.gated else "fc2"
        setattr(self, f"{out}_proj", param(rngs, (F, D), ("vision_mlp", "vision_embed"), pd))
        setattr(self, f"{out}_bias", zeros((D,), ("vision_embed",), pd))

    def _linear(self, x, name):
        dt = jnp.dtype(self.cfg.dtype)
        w, b = getattr(self, f"{name}_proj"), getattr(self, f"{name}_bias")
        return dense(x, w[...].astype(dt)) + b[...].astype(dt)

    def __call__(self, x):
        act = ACTIVATIONS[self.cfg.hidden_act]
        if self.gated:
            h = act(self._linear(x, "gate")) * self._linear(x, "up")
            return self._linear(constrain_sharding(h, *_ROWS, "vision_mlp"), "down")
        h = act(self._linear(x, "fc1"))
        return self._linear(constrain_sharding(h, *_ROWS, "vision_mlp"), "fc2")


def _norm(cfg: QwenVisionConfig, dim: int):
    pd = jnp.dtype(cfg.param_dtype)
    if cfg.family == "qwen2_5_vl":
        return RMSNorm(dim, cfg.norm_eps, pd)
    return LayerNorm(dim, cfg.norm_eps, pd)


class QwenVisionBlock(nnx.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, cfg: QwenVisionConfig, *, attention_impl: str, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.attn = QwenVisionAttention(cfg, attention_impl=attention_impl, rngs=rngs)
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.mlp = QwenVisionMLP(cfg, rngs=rngs)

    def __call__(self, x, rope, segments):
        x = x + self.attn(self.norm1(x), rope, segments)
        x = x + self.mlp(self.norm2(x))
        return constrain_sharding(x, *_ROWS, "act_embed")


class PatchMerger(nnx.Module):
    """norm, then each merge unit's patches (consecutive) concatenated and
    projected by a GELU MLP into the language model's width."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        D, Dout = cfg.hidden_size * cfg.merge_unit, cfg.out_hidden_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.norm = _norm(cfg, cfg.hidden_size)
        self.fc1 = param(rngs, (D, D), ("vision_embed", "mlp"), pd)
        self.fc1_bias = zeros((D,), ("mlp",), pd)
        self.fc2 = param(rngs, (D, Dout), ("mlp", "embed"), pd)
        self.fc2_bias = zeros((Dout,), ("embed",), pd)

    def __call__(self, x):
        """(B, L, D) patches -> (B, L / merge unit, O) tokens."""
        dt = jnp.dtype(self.cfg.dtype)
        B, L, _ = x.shape
        x = self.norm(x).reshape(B, L // self.cfg.merge_unit, -1)
        h = jax.nn.gelu(dense(x, self.fc1[...].astype(dt)) + self.fc1_bias[...].astype(dt), False)
        return dense(h, self.fc2[...].astype(dt)) + self.fc2_bias[...].astype(dt)


class QwenVisionTower(nnx.Module):
    """The whole tower: patch embedding, blocks, merger.

    `tower(pixel_values, layout)` takes each sample's packed patches
    (B, L, C*T*p*p) and their layouts (`vision_layout` of each sample,
    stacked) and returns (B, L / merge unit, O) tokens in image order; rows
    past a sample's real patches belong to padding."""

    def __init__(self, cfg: QwenVisionConfig, *, attention_impl: str, rngs: nnx.Rngs):
        cfg.validate()
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.patch_embed = param(
            rngs, (cfg.patch_dim, cfg.hidden_size), ("patch", "vision_embed"), pd
        )
        self.blocks = stack_layers(
            lambda r: QwenVisionBlock(cfg, attention_impl=attention_impl, rngs=r), cfg.depth, rngs
        )
        self.merger = PatchMerger(cfg, rngs=rngs)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """(B, L, C*T*p*p) -> (B, L, D): Hugging Face's Conv3d, whose kernel
        equals its stride, is one matmul over each flattened patch."""
        dt = jnp.dtype(self.cfg.dtype)
        x = dense(pixel_values.astype(dt), self.patch_embed[...].astype(dt))
        return constrain_sharding(x, *_ROWS, "act_embed")

    def _block_segments(self, layout: VisionLayout) -> jax.Array:
        """(depth, B, L): the segment ids each block attends within."""
        cfg = self.cfg
        full = np.array(
            [not cfg.windowed or i in cfg.fullatt_block_indexes for i in range(cfg.depth)]
        )
        return jnp.where(
            full[:, None, None],
            jnp.asarray(layout.full_segments)[None],
            jnp.asarray(layout.window_segments)[None],
        )

    def _run_blocks(self, x, rope, segments, collect: bool):
        """Blocks in order over x (B, L, D), block i within segments[i]: a
        scan over the stack (one compiled body), or unrolled with
        `scan_layers` off. Returns (x, each block's output (depth, B, L, D)
        or None)."""
        cfg = self.cfg
        graphdef, state = nnx.split(self.blocks)

        def body(h, xs):
            layer_state, seg = xs
            h = nnx.merge(graphdef, layer_state)(h, rope, seg)
            return h, (h if collect else None)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        if cfg.scan_layers:
            return jax.lax.scan(body, x, (state, segments))
        outs = []
        for i in range(cfg.depth):
            x, _ = body(x, jax.tree.map(functools.partial(lambda i, a: a[i], i), (state, segments)))
            outs.append(x)
        return x, (jnp.stack(outs) if collect else None)

    def _forward(self, pixel_values, layout: VisionLayout, collect: bool):
        cfg = self.cfg
        x = self.embed(pixel_values)
        if cfg.windowed:
            x = _gather_rows(x, layout.order)
        rope = vision_rope(jnp.asarray(layout.positions), cfg.head_dim, cfg.rope_theta)
        x, per_layer = self._run_blocks(x, rope, self._block_segments(layout), collect)
        out = self.merger(x)
        if cfg.windowed:
            out = _gather_rows(out, layout.restore)
        return out, per_layer

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """Merged tokens (B, L / merge unit, O) in image order (see the class)."""
        return self._forward(pixel_values, layout, collect=False)[0]

    def hidden_and_layer_outputs(
        self, pixel_values: jax.Array, layout: VisionLayout
    ) -> tuple[jax.Array, jax.Array]:
        """`__call__`'s tokens, and every block's output stacked
        (depth, B, L, D) in processing order (Qwen2.5-VL: window order, as
        Hugging Face's `hidden_states`)."""
        return self._forward(pixel_values, layout, collect=True)
