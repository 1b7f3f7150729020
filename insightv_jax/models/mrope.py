"""Multimodal rotary positions (M-RoPE) of Qwen2-VL and Qwen2.5-VL.

Every token gets three position ids -- time, row, column. A text token's three
are equal and count up by one per token. The tokens of an image or video
(one per merged 2x2 unit) start where the text stands: row and column are
the unit's place in its grid plus that start, time is the frame index plus it
(Qwen2.5-VL spaces video frames `tokens_per_second * seconds per frame`
apart). Text after an item continues at start + max(rows, columns), the
rule of transformers 5.x.

`get_rope_index` computes them on the host (NumPy; they depend on image sizes
and prompt layout, never on values inside jit). The decoder rotates with
`mrope_cos_sin`: frequency j of the head takes its angle from the time, row
or column id according to `mrope_section`, in `rope.apply_rope`'s layout.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from insightv_jax.models.rope import apply_rope

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_types(input_ids, image_token_id: int, video_token_id: int) -> np.ndarray:
    """(B, T) token types: 0 text, 1 image placeholder, 2 video placeholder
    (Hugging Face's `mm_token_type_ids`)."""
    ids = np.asarray(input_ids)
    return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT))


def _vision_positions(start: int, grid, merge: int, interval) -> np.ndarray:
    """(3, t*h*w) ids of one item's merged tokens (time, row, column), row-major."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    # float32 then truncation, as transformers computes it (the processor's
    # float32 seconds times an integer rate, then `.long()`).
    times = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(times, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def get_rope_index(
    mm_token_type_ids,
    *,
    spatial_merge_size: int,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    tokens_per_second: float | None = None,
    second_per_grid_ts=None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids (3, B, T) and `rope_deltas` (B, 1), int64.

    `mm_token_type_ids` (B, T): 0 text, 1 image, 2 video (`mm_token_types`).
    Items are taken in order across the batch: images from `image_grid_thw`
    (n, 3), videos from `video_grid_thw` (v, 3), in patches before merging.
    `attention_mask` (B, T): padding (0) is skipped and keeps position 0.
    `tokens_per_second`: None for Qwen2-VL (video frames one apart); Qwen2.5-VL's
    value spaces frame f at int(f * tokens_per_second * second_per_grid_ts[v])
    (1 second per grid when `second_per_grid_ts` is None).

    `rope_deltas[b]` is max position + 1 - real tokens: decoding continues
    row b at (tokens so far) + delta. A run of placeholders longer than one
    item takes the next items until it is covered; a run that ends inside an
    item, or items left over or missing, are errors (ValueError).
    """
    types = np.asarray(mm_token_type_ids)
    B, T = types.shape
    mask = (
        np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    )
    grids = {
        IMAGE: iter(
            np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else ()
        ),
        VIDEO: iter(
            np.asarray(video_grid_thw).reshape(-1, 3) if video_grid_thw is not None else ()
        ),
    }
    n_videos = 0 if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3).shape[0]
    seconds = np.ones(n_videos) if second_per_grid_ts is None else np.asarray(second_per_grid_ts)
    seconds = iter(seconds.reshape(-1).tolist())
    merge = spatial_merge_size
    positions = np.zeros((3, B, T), np.int64)
    deltas = np.zeros((B, 1), np.int64)
    for b in range(B):
        row = types[b][mask[b]]
        pieces, pos = [], 0
        for kind, run in itertools.groupby(row.tolist()):
            n = len(list(run))
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
                pos += n
                continue
            name = "image" if kind == IMAGE else "video"
            while n > 0:
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(f"row {b}: more {name} placeholders than {name} grids")
                size = int(np.prod(grid)) // merge**2
                if size > n:
                    raise ValueError(
                        f"row {b}: a run of {name} placeholders ends inside a {name} "
                        f"of {size} tokens (grid {grid.tolist()})"
                    )
                interval = 1.0
                if kind == VIDEO and tokens_per_second is not None:
                    interval = np.float32(tokens_per_second) * np.float32(next(seconds))
                pieces.append(_vision_positions(pos, grid, merge, interval))
                pos += max(int(grid[1]), int(grid[2])) // merge
                n -= size
        if pieces:
            ids = np.concatenate(pieces, axis=1)
            positions[:, b, mask[b]] = ids
            deltas[b, 0] = ids.max() + 1 - ids.shape[1]
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        if next(grids[kind], None) is not None:
            raise ValueError(f"more {name} grids than {name} placeholders in the batch")
    return positions, deltas


def mrope_cos_sin(
    position_ids: jax.Array, inv_freq: np.ndarray, mrope_section
) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B, T, 1, H/2) fp32 of M-RoPE at `position_ids` (3, B, T).

    `mrope_section` splits the H/2 frequencies into consecutive groups (summing
    to H/2); group g takes its positions from axis g % 3 (time, row, column).
    The result drops into `rope.apply_rope` like `rope.rope_cos_sin`'s."""
    section = [int(s) for s in mrope_section]
    if sum(section) != len(inv_freq):
        raise ValueError(f"mrope_section {section} does not sum to {len(inv_freq)} frequencies")
    axis = np.repeat(np.arange(len(section)) % 3, section)  # (H/2,) position axis per frequency
    chosen = jnp.moveaxis(jnp.asarray(position_ids)[axis], 0, -1)  # (B, T, H/2)
    angles = chosen.astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_multimodal_rope(
    x: jax.Array, position_ids: jax.Array, inv_freq: np.ndarray, mrope_section
) -> jax.Array:
    """Rotate x (B, T, heads, H) by M-RoPE at `position_ids` (3, B, T)
    (Hugging Face's multimodal rotary embedding with `mrope_section`)."""
    return apply_rope(x, mrope_cos_sin(position_ids, inv_freq, mrope_section))
