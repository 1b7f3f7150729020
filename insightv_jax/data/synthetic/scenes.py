"""Scenes of the synthetic suite: a grid of coloured shapes and a labelled bar chart.

A scene is plain data (JSON-serialisable through `to_dict`/`scene_from_dict`) so
that records carry it and the oracle can check claims against it later.
Rows and columns are 1-based in every text the suite writes.
"""

from __future__ import annotations

import dataclasses
import random

from insightv_jax.errors import DataError

COLOURS = ("red", "blue", "green", "yellow")
SHAPES = ("square", "circle", "triangle", "star")
BAR_LABELS = ("A", "B", "C", "D", "E")


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Difficulty knobs of the generator."""

    grid_size: int = 4  # cells per side; 10 px per cell
    min_objects: int = 4
    max_objects: int = 9
    n_colours: int = 4  # first n of COLOURS
    n_shapes: int = 4  # first n of SHAPES
    max_hops: int = 2  # spatial hops per question (1..max_hops)
    n_bars: int = 4  # bars per chart (<= 5; one 10 px column per bar when n_bars == grid_size)
    max_value: int = 8  # bar values 1..max_value
    # What the counting/comparison families count: "colour" (red shapes), "shape"
    # (squares), "both" (red squares), drawn 2:1:1 among those listed.
    descriptors: tuple[str, ...] = ("colour", "shape", "both")

    def __post_init__(self):
        bad = [d for d in self.descriptors if d not in ("colour", "shape", "both")]
        if bad or not self.descriptors:
            raise ValueError(f"knobs.descriptors={list(self.descriptors)}: use colour, shape, both")

    @property
    def colours(self) -> tuple[str, ...]:
        return COLOURS[: self.n_colours]

    @property
    def shapes(self) -> tuple[str, ...]:
        return SHAPES[: self.n_shapes]


@dataclasses.dataclass(frozen=True)
class GridScene:
    """`cells[(row, col)] = (colour, shape)` for occupied cells (1-based)."""

    size: int
    cells: dict[tuple[int, int], tuple[str, str]]

    kind = "grid"

    def at(self, r: int, c: int) -> tuple[str, str] | None:
        return self.cells.get((r, c))

    def inside(self, r: int, c: int) -> bool:
        return 1 <= r <= self.size and 1 <= c <= self.size

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum(
            (colour is None or col == colour) and (shape is None or sh == shape)
            for col, sh in self.cells.values()
        )

    def find(self, colour: str | None, shape: str | None) -> list[tuple[int, int]]:
        return sorted(
            rc
            for rc, (col, sh) in self.cells.items()
            if (colour is None or col == colour) and (shape is None or sh == shape)
        )

    def to_dict(self) -> dict:
        cells = [[r, c, col, sh] for (r, c), (col, sh) in sorted(self.cells.items())]
        return {"kind": "grid", "size": self.size, "cells": cells}


@dataclasses.dataclass(frozen=True)
class ChartScene:
    """A bar chart: `bars` is [(label, value)] left to right."""

    bars: tuple[tuple[str, int], ...]
    max_value: int

    kind = "chart"

    def value(self, label: str) -> int | None:
        return dict(self.bars).get(label)

    def to_dict(self) -> dict:
        return {"kind": "chart", "max_value": self.max_value, "bars": [list(b) for b in self.bars]}


Scene = GridScene | ChartScene


def scene_from_dict(d: dict) -> Scene:
    """Inverse of `to_dict`; a malformed scene is a one-line DataError."""
    try:
        if d["kind"] == "grid":
            cells = {(int(r), int(c)): (str(col), str(sh)) for r, c, col, sh in d["cells"]}
            return GridScene(int(d["size"]), cells)
        if d["kind"] == "chart":
            bars = tuple((str(lab), int(v)) for lab, v in d["bars"])
            return ChartScene(bars, int(d["max_value"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"scene {str(d)[:60]}: malformed ({type(e).__name__}: {e})") from None
    raise DataError(f"scene kind {d.get('kind')!r} is not grid or chart")


def sample_grid(rng: random.Random, knobs: Knobs) -> GridScene:
    """A random grid with between min_objects and max_objects shapes."""
    n = knobs.grid_size
    k = rng.randint(knobs.min_objects, min(knobs.max_objects, n * n))
    positions = rng.sample([(r, c) for r in range(1, n + 1) for c in range(1, n + 1)], k)
    cells = {rc: (rng.choice(knobs.colours), rng.choice(knobs.shapes)) for rc in positions}
    return GridScene(n, cells)


def sample_chart(rng: random.Random, knobs: Knobs) -> ChartScene:
    """A random bar chart with distinct values (so tallest/shortest are unique)."""
    n = min(knobs.n_bars, len(BAR_LABELS), knobs.max_value)
    values = rng.sample(range(1, knobs.max_value + 1), n)
    return ChartScene(tuple(zip(BAR_LABELS[:n], values)), knobs.max_value)


DEFAULT_KNOBS = Knobs()
