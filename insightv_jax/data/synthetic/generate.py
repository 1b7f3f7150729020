"""Seeded generation of items and of train/val/test splits.

Split seeds are derived from (seed, split name), so splits are disjoint streams;
a canonical key (family + query + scene) is shared across splits while
generating, so no question over the same scene appears twice anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import random

from insightv_jax.data.synthetic.families import DEFAULT_WEIGHTS, FAMILIES
from insightv_jax.data.synthetic.observer import Observer
from insightv_jax.data.synthetic.scenes import (
    DEFAULT_KNOBS,
    Knobs,
    sample_chart,
    sample_grid,
    scene_from_dict,
)
from insightv_jax.errors import DataError

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Item:
    """One (scene, question, answer) of the suite."""

    id: str
    family: str
    scene: dict
    query: dict
    question: str
    answer: str

    def key(self) -> str:
        """Canonical identity of the question over its scene (for de-duplication)."""
        return json.dumps([self.family, self.query, self.scene], sort_keys=True)


def solve(family: str, scene: dict, query: dict, observer: Observer | None = None):
    """Answer value of a query (through `observer`, default the truth)."""
    if family not in FAMILIES:
        raise DataError(f"unknown synthetic family {family!r}")
    sc = scene_from_dict(scene)
    return FAMILIES[family].solve(query, observer or Observer(sc))


def make_item(rng: random.Random, knobs: Knobs, family: str, item_id: str) -> Item:
    """A random item of `family` (resamples scenes until the family has a query)."""
    fam = FAMILIES[family]
    for _ in range(100):
        scene = sample_grid(rng, knobs) if fam.scene == "grid" else sample_chart(rng, knobs)
        query = fam.sample(scene, rng, knobs)
        if query is not None:
            break
    else:
        raise DataError(f"family {family}: no valid query in 100 scenes (check the knobs)")
    answer = str(fam.solve(query, Observer(scene)))
    return Item(item_id, family, scene.to_dict(), query, fam.question(query), answer)


def generate_split(
    split: str,
    n: int,
    seed: int,
    knobs: Knobs = DEFAULT_KNOBS,
    weights: dict[str, float] | None = None,
    seen: set[str] | None = None,
) -> list[Item]:
    """`n` unique items of one split; keys in `seen` are skipped (and added)."""
    weights = weights or DEFAULT_WEIGHTS
    unknown = sorted(set(weights) - set(FAMILIES))
    if unknown:
        raise DataError(f"unknown synthetic families {unknown} (known: {sorted(FAMILIES)})")
    names = sorted(k for k, w in weights.items() if w > 0)
    rng = random.Random(f"insightv-synth/{seed}/{split}")
    seen = set() if seen is None else seen
    items, misses = [], 0
    while len(items) < n:
        family = rng.choices(names, [weights[k] for k in names])[0]
        item = make_item(rng, knobs, family, f"{split}-{len(items):06d}")
        if item.key() in seen:
            misses += 1
            if misses > 100 * (n + 10):
                raise DataError(f"split {split}: cannot find {n} unique items (knobs too small)")
            continue
        seen.add(item.key())
        items.append(item)
    return items


def generate_splits(
    n: int,
    seed: int,
    knobs: Knobs = DEFAULT_KNOBS,
    weights: dict[str, float] | None = None,
    n_eval: int | None = None,
) -> dict[str, list[Item]]:
    """`n` train items and `n_eval` (default `n`) each for val and test; test and
    val are drawn first so train never repeats them."""
    seen: set[str] = set()
    out = {}
    for split in ("test", "val", "train"):
        count = n if split == "train" or n_eval is None else n_eval
        out[split] = generate_split(split, count, seed, knobs, weights, seen)
    return {s: out[s] for s in SPLITS}
