"""LLaVA-NeXT "anyres" geometry on the host (Python ints and floats): which tile
grid an image gets and how many image tokens it becomes. Pure arithmetic, shared
by the data pipeline (expanding `<image>`, packing tiles) and the model; float
semantics identical to Hugging Face. The traced version of the same rules, used
inside jit, is `models.anyres.feature_index`.
"""

from __future__ import annotations

from insightv_jax.config import ModelConfig


def tokens_per_tile(cfg: ModelConfig) -> int:
    """Feature vectors one tile yields after the feature strategy (CLS dropped or kept)."""
    n = cfg.vision.patches_per_side**2
    if cfg.vision.family == "clip" and cfg.llava.feature_strategy == "full":
        n += 1
    if cfg.vision.family == "siglip" and cfg.llava.feature_strategy == "default":
        n -= 1  # Hugging Face drops the first token even without a class token
    return n


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) canvas for an image: most effective pixels, then least waste."""
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        dw, dh = int(width * scale), int(height * scale)
        eff = min(dw * dh, width * height)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def max_tiles(cfg: ModelConfig) -> int:
    """Tiles per image in the padded layout: base view + the largest grid."""
    if cfg.kind != "llava_next":
        return 1
    t = cfg.vision.image_size
    return 1 + max((h // t) * (w // t) for h, w in cfg.llava.image_grid_pinpoints)


def num_tiles(image_size: tuple[int, int], cfg: ModelConfig) -> int:
    """Tiles an image of (height, width) uses (base view included)."""
    if cfg.kind != "llava_next":
        return 1
    h, w = best_resolution(*image_size, cfg.llava.image_grid_pinpoints)
    t = cfg.vision.image_size
    return 1 + (h // t) * (w // t)


def unpadded_grid(image_size: tuple[int, int], cfg: ModelConfig) -> tuple[int, int]:
    """(rows, cols) of the feature map left after `spatial_unpad`."""
    height, width = image_size
    t, side = cfg.vision.image_size, cfg.vision.patches_per_side
    bh, bw = best_resolution(height, width, cfg.llava.image_grid_pinpoints)
    rows, cols = (bh // t) * side, (bw // t) * side
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


def num_image_tokens(image_size: tuple[int, int], cfg: ModelConfig) -> int:
    """How many image-token ids `<image>` expands to for an image of (height, width)."""
    base = tokens_per_tile(cfg)
    if cfg.kind != "llava_next":
        return base
    rows, cols = unpadded_grid(image_size, cfg)
    return base + rows * (cols + 1)


def max_image_tokens(cfg: ModelConfig) -> int:
    """An upper bound of `num_image_tokens` over all image sizes (static feature slots)."""
    base = tokens_per_tile(cfg)
    if cfg.kind != "llava_next":
        return base
    t, side = cfg.vision.image_size, cfg.vision.patches_per_side
    grid = max((h // t * side) * (w // t * side + 1) for h, w in cfg.llava.image_grid_pinpoints)
    return base + grid
