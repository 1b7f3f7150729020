"""The observer through which every family solves its question.

Each perception read or arithmetic step goes through an `Observer`, which records
the claim it makes (claims.py grammar). The truth observer gives the right answer
and the gold claims; an observer told to corrupt its k-th operation makes one
plausible mistake there (miscount by one, wrong cell, wrong hop, misread bar,
arithmetic slip) and every later step uses the wrong value, so the error
propagates to the answer as it would in a real chain.
"""

from __future__ import annotations

import random

from insightv_jax.data.synthetic.claims import DIRECTIONS, Claim
from insightv_jax.data.synthetic.scenes import ChartScene, GridScene


class Observer:
    """Reads a scene and records `(claim, free)`; `free` claims may be reordered."""

    def __init__(self, scene, corrupt_at: int | None = None, rng: random.Random | None = None):
        self.scene = scene
        self.corrupt_at = corrupt_at
        self.rng = rng or random.Random(0)
        self.claims: list[tuple[Claim, bool]] = []
        self.ops = 0  # corruptible operations so far
        self.corrupted = False
        self.corrupted_kind: str | None = None  # the claim kind of the corrupted operation

    def _hit(self, kind: str) -> bool:
        hit = self.ops == self.corrupt_at
        self.ops += 1
        self.corrupted |= hit
        if hit:
            self.corrupted_kind = kind
        return hit

    def _off_by_one(self, n: int, lo: int = 0, hi: int | None = None) -> int:
        up = n + 1 if hi is None or n + 1 <= hi else None
        down = n - 1 if n - 1 >= lo else None
        choices = [x for x in (up, down) if x is not None]
        return self.rng.choice(choices)

    # ---------------------------------------------------------------- grid
    def count(self, colour: str | None, shape: str | None) -> int:
        n = self.scene.count(colour, shape)
        if self._hit("count"):
            n = self._off_by_one(n)
        self.claims.append((("count", colour, shape, n), True))
        return n

    def _neighbours(self, r: int, c: int) -> list[tuple[int, int]]:
        g: GridScene = self.scene
        return [(r + dr, c + dc) for dr, dc in DIRECTIONS.values() if g.inside(r + dr, c + dc)]

    def cell(self, r: int, c: int) -> tuple[str, str] | None:
        g: GridScene = self.scene
        content = g.at(r, c) if g.inside(r, c) else None
        if self._hit("cell"):
            wrong = [g.at(*rc) for rc in self._neighbours(r, c) if g.at(*rc) not in (None, content)]
            if wrong:  # read the neighbouring cell by mistake
                content = self.rng.choice(wrong)
            else:
                colour = self.rng.choice(
                    [x for x in ("red", "blue", "green") if content is None or x != content[0]]
                )
                content = (colour, content[1] if content else "square")
        self.claims.append((("cell", r, c, *(content or (None, None))), False))
        return content

    def find(self, colour: str, shape: str) -> tuple[int, int]:
        """Where the (unique) `colour shape` is."""
        r, c = self.scene.find(colour, shape)[0]
        if self._hit("cell"):
            r, c = self.rng.choice(self._neighbours(r, c))
        self.claims.append((("cell", r, c, colour, shape), False))
        return r, c

    def hop(self, direction: str, r: int, c: int) -> tuple[int, int]:
        dr, dc = DIRECTIONS[direction]
        r2, c2 = r + dr, c + dc
        if self._hit("hop"):
            others = [rc for rc in self._neighbours(r, c) if rc != (r2, c2)]
            if others:
                r2, c2 = self.rng.choice(others)
        self.claims.append((("hop", direction, r, c, r2, c2), False))
        return r2, c2

    # ---------------------------------------------------------------- chart
    def bar(self, label: str) -> int:
        ch: ChartScene = self.scene
        v = ch.value(label)
        if self._hit("bar"):
            v = self._off_by_one(v, lo=1, hi=ch.max_value)
        self.claims.append((("bar", label, v), True))
        return v

    def extreme(self, which: str, readings: dict[str, int]) -> str:
        order = sorted(readings, key=lambda k: readings[k], reverse=which == "tallest")
        label = order[0]
        if self._hit("extreme") and len(order) > 1:
            label = order[1]
        self.claims.append((("extreme", which, label), False))
        return label

    # ---------------------------------------------------------------- arithmetic
    def add(self, a: int, b: int) -> int:
        s = a + b
        if self._hit("arith"):
            s = self._off_by_one(s)
        self.claims.append((("arith", a, "+", b, s), False))
        return s

    def sub(self, a: int, b: int) -> int:
        d = a - b
        if self._hit("arith"):
            d = self._off_by_one(d)
        self.claims.append((("arith", a, "-", b, d), False))
        return d

    def compare(self, a: int, b: int) -> str:
        op = ">" if a > b else "<" if a < b else "="
        self.claims.append((("cmp", a, op, b), False))
        return op
