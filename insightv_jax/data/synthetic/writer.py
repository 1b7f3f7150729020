"""Write the suite as LLaVA-style JSON + PNGs (or ArrayRecord via tfds_builder.py).

Output is a pure function of (n, seed, knobs, weights): JSON with sorted keys
and metadata-free PNGs, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from insightv_jax.data.synthetic.families import FAMILIES
from insightv_jax.data.synthetic.generate import SPLITS, Item, generate_splits, solve
from insightv_jax.data.synthetic.render import png_bytes, render
from insightv_jax.data.synthetic.scenes import DEFAULT_KNOBS, Knobs, scene_from_dict


def to_record(item: Item, image: str | None = None) -> dict:
    """The LLaVA-style record of an item (`image` defaults to images/<id>.png)."""
    return {
        "id": item.id,
        "image": image if image is not None else f"images/{item.id}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{item.question}"},
            {"from": "gpt", "value": item.answer},
        ],
        "question": item.question,
        "answer": item.answer,
        "family": item.family,
        "scene": item.scene,
        "query": item.query,
    }


def perception_records(records: list[dict], knobs: Knobs, family: str = "inventory") -> list[dict]:
    """One `family` question on each grid image of `records`, reusing the image:
    the dense perception data the demo's base model trains on beside direct QA."""
    fam = FAMILIES[family]
    out = []
    for rec in records:
        if rec.get("scene", {}).get("kind", "grid") != fam.scene:
            continue
        scene = scene_from_dict(rec["scene"])
        query = fam.sample(scene, random.Random(f"perception/{rec['id']}"), knobs)
        if query is None:
            continue
        answer = str(solve(family, rec["scene"], query))
        item = Item(
            f"{rec['id']}-{family}", family, rec["scene"], query, fam.question(query), answer
        )
        out.append(to_record(item, rec["image"]))
    return out


def item_png(item: Item) -> bytes:
    return png_bytes(render(scene_from_dict(item.scene)))


def write_llava(
    out: str | Path,
    n: int,
    seed: int,
    knobs: Knobs = DEFAULT_KNOBS,
    weights: dict[str, float] | None = None,
    n_eval: int | None = None,
) -> dict[str, int]:
    """Write out/{train,val,test}.json and out/images/*.png (`n` train items,
    `n_eval`, default `n`, each for val and test); returns counts per split."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = generate_splits(n, seed, knobs, weights, n_eval)
    for split in SPLITS:
        records = []
        for item in splits[split]:
            (out / "images" / f"{item.id}.png").write_bytes(item_png(item))
            records.append(to_record(item))
        text = json.dumps(records, indent=1, sort_keys=True, ensure_ascii=False)
        (out / f"{split}.json").write_text(text + "\n", encoding="utf-8")
    return {s: len(v) for s, v in splits.items()}
