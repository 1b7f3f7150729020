"""Render scenes to small RGB PNGs with PIL: 10 px per grid cell / chart column,
so one 10 px vision patch sees one cell (the CPU-scale calibration in docs/design.md).

Drawing uses only integer PIL primitives, so the same scene always gives the
same pixels and (with the same zlib) the same PNG bytes.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from insightv_jax.data.synthetic.scenes import ChartScene, GridScene, Scene

CELL = 10
BACKGROUND = (255, 255, 255)
RGB = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (230, 200, 30),
}
# 3x5 bitmap glyphs for the bar labels (deterministic, no font files).
GLYPHS = {
    "A": ("010", "101", "111", "101", "101"),
    "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"),
    "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"),
}
LABEL_STRIP = 8  # chart rows reserved for the labels
UNIT = 4  # chart pixels per value unit


def _shape(draw: ImageDraw.ImageDraw, x: int, y: int, shape: str, fill) -> None:
    if shape == "square":
        draw.rectangle((x + 1, y + 1, x + 8, y + 8), fill=fill)
    elif shape == "circle":
        draw.ellipse((x + 1, y + 1, x + 8, y + 8), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + 4, y + 1), (x + 5, y + 1), (x + 8, y + 8), (x + 1, y + 8)], fill=fill)
    elif shape == "star":
        pts = [(4, 0), (5, 3), (9, 4), (5, 5), (4, 9), (3, 5), (0, 4), (3, 3)]
        draw.polygon([(x + px, y + py) for px, py in pts], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_grid(scene: GridScene) -> Image.Image:
    side = scene.size * CELL
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for (r, c), (colour, shape) in sorted(scene.cells.items()):
        _shape(draw, (c - 1) * CELL, (r - 1) * CELL, shape, RGB[colour])
    return img


def render_chart(scene: ChartScene) -> Image.Image:
    width = max(len(scene.bars), 1) * CELL
    height = LABEL_STRIP + scene.max_value * UNIT
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    colours = list(RGB.values())
    for i, (label, value) in enumerate(scene.bars):
        x = i * CELL
        for gy, row in enumerate(GLYPHS[label]):
            for gx, bit in enumerate(row):
                if bit == "1":
                    draw.point((x + 4 + gx, 1 + gy), fill=(0, 0, 0))
        top = height - value * UNIT
        draw.rectangle((x + 2, top, x + 7, height - 1), fill=colours[i % len(colours)])
    return img


def render(scene: Scene) -> Image.Image:
    """The scene's image (grid: size*10 px square; chart: 10 px per bar wide)."""
    return render_grid(scene) if isinstance(scene, GridScene) else render_chart(scene)


def png_bytes(img: Image.Image) -> bytes:
    """PNG bytes without metadata (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
