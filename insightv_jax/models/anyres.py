"""LLaVA-NeXT "anyres" geometry inside jit: where each image token comes from.

The host version of the same rules (`best_resolution`, `num_image_tokens`: what
the tokenizer uses to expand `<image>`) is `insightv_jax.vision_grid`; here
`feature_index` computes, inside jit from `image_sizes` and with static shapes,
the same results with exact integer arithmetic.

Feature order of one image (as Hugging Face packs it): the base view's h*w
features, then the tile grid reassembled into a (gh*h, gw*w) map, padding rows
or columns removed for the original aspect ratio (`spatial_unpad`), read row
by row with the learned `image_newline` after every row.
"""

from __future__ import annotations

import jax.numpy as jnp

from insightv_jax.config import ModelConfig
from insightv_jax.vision_grid import max_image_tokens, tokens_per_tile


def _best_resolution_traced(height, width, pinpoints):
    """Integer version of `best_resolution` for int32 arrays of any shape."""
    best_h = jnp.zeros_like(height)
    best_w = jnp.zeros_like(width)
    best_eff = jnp.zeros_like(height)
    best_waste = jnp.full_like(height, jnp.iinfo(jnp.int32).max)
    for ph, pw in pinpoints:
        by_width = pw * height <= ph * width  # pw/W <= ph/H: width is the limiting side
        dw = jnp.where(by_width, pw, (width * ph) // height)
        dh = jnp.where(by_width, (height * pw) // width, ph)
        eff = jnp.minimum(dw * dh, width * height)
        waste = pw * ph - eff
        better = (eff > best_eff) | ((eff == best_eff) & (waste < best_waste))
        best_h = jnp.where(better, ph, best_h)
        best_w = jnp.where(better, pw, best_w)
        best_eff = jnp.where(better, eff, best_eff)
        best_waste = jnp.where(better, waste, best_waste)
    return best_h, best_w


def feature_index(image_sizes: jnp.ndarray, cfg: ModelConfig, tiles: int):
    """Where each image-feature slot reads from, computed inside jit.

    `image_sizes` (..., 2) int (height, width; 0 = no image). The per-image
    feature table is the projected tile features flattened (tiles * per_tile
    rows, tile-major) followed by one `image_newline` row. Returns
    (index (..., F_max) int32 into that table, count (...,) int32 of valid slots).
    """
    per_tile = tokens_per_tile(cfg)
    f_max = max_image_tokens(cfg)
    j = jnp.arange(f_max, dtype=jnp.int32)
    height = image_sizes[..., 0].astype(jnp.int32)
    width = image_sizes[..., 1].astype(jnp.int32)
    present = (height > 0) & (width > 0)
    if cfg.kind != "llava_next":
        index = jnp.broadcast_to(j, (*height.shape, f_max))
        return index, jnp.where(present, per_tile, 0).astype(jnp.int32)

    height, width = jnp.maximum(height, 1), jnp.maximum(width, 1)
    t, side = cfg.vision.image_size, cfg.vision.patches_per_side
    bh, bw = _best_resolution_traced(height, width, cfg.llava.image_grid_pinpoints)
    gh, gw = bh // t, bw // t
    rows, cols = gh * side, gw * side
    # spatial_unpad with exact integers: int(round(H * cols / W, 7)) == H * cols // W.
    wide = width * rows > cols * height
    pad_r = jnp.where(wide, (rows - (height * cols) // width) // 2, 0)
    pad_c = jnp.where(wide, 0, (cols - (width * rows) // height) // 2)
    kept_rows, kept_cols = rows - 2 * pad_r, cols - 2 * pad_c
    count = jnp.where(present, per_tile + kept_rows * (kept_cols + 1), 0)

    e = lambda a: a[..., None]  # noqa: E731 - broadcast per-image scalars over slots
    g = j - per_tile
    row = g // (e(kept_cols) + 1)
    col = g % (e(kept_cols) + 1)
    R, C = row + e(pad_r), col + e(pad_c)
    tile = 1 + (R // side) * e(gw) + C // side
    grid_src = tile * per_tile + (R % side) * side + C % side
    newline = tiles * per_tile
    src = jnp.where(col == e(kept_cols), newline, grid_src)
    src = jnp.where(j < per_tile, j, src)
    src = jnp.where(j < e(count), src, 0)
    return src.astype(jnp.int32), count.astype(jnp.int32)
