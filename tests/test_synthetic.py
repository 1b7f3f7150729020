"""The synthetic suite: determinism, split hygiene, rendering, claims, oracle figures."""

import dataclasses
import hashlib
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insightv_jax.cli import main
from insightv_jax.data.synthetic.claims import check_claim, format_claim, parse_claims
from insightv_jax.data.synthetic.generate import generate_split, generate_splits
from insightv_jax.data.synthetic.oracle import OracleJudge, OracleScorer, parse_verdict
from insightv_jax.data.synthetic.render import RGB, render
from insightv_jax.data.synthetic.scenes import ChartScene, GridScene
from insightv_jax.data.synthetic.teacher import OracleTeacher


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_dataset(tmp_path):
    for name in ("a", "b"):
        assert main(["synth", "--out", str(tmp_path / name), "--n", "12", "--seed", "5"]) == 0
    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "12", "--seed", "6"]) == 0
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert len(a) == 3 + 36 and a == b
    assert a["train.json"] != c["train.json"]
    rec = json.loads((tmp_path / "a" / "train.json").read_text())[0]
    assert set(rec) >= {"id", "image", "conversations", "answer", "family", "scene"}
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert (tmp_path / "a" / rec["image"]).is_file()


def test_splits_share_no_question():
    splits = generate_splits(400, seed=1)
    keys = {s: {it.key() for it in items} for s, items in splits.items()}
    assert all(len(k) == 400 for k in keys.values())  # no duplicate within a split
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    families = {it.family for it in splits["train"]}
    assert {"compare", "sum", "hop", "chart_diff", "mc_sum", "count_colour"} <= families


def test_grid_render_one_patch_per_cell():
    scene = GridScene(4, {(1, 1): ("red", "square"), (3, 2): ("blue", "circle")})
    img = np.asarray(render(scene))
    assert img.shape == (40, 40, 3)
    assert tuple(img[4, 4]) == RGB["red"] and tuple(img[24, 14]) == RGB["blue"]
    assert (img[30:40, 30:40] == 255).all()  # empty cell 4 4 is background
    chart = np.asarray(render(ChartScene((("A", 8), ("B", 1)), 8)))
    assert chart.shape == (40, 20, 3)
    assert (chart[8:40, 4] != 255).any(axis=-1).all() and (chart[8:36, 14] == 255).all()


def test_claim_grammar_roundtrip_and_check():
    scene = GridScene(
        4, {(2, 3): ("blue", "circle"), (2, 4): ("red", "star"), (1, 1): ("red", "square")}
    )
    claims = [
        ("count", "red", None, 2), ("count", None, "circle", 1), ("count", "red", "star", 1),
        ("cell", 2, 3, "blue", "circle"), ("cell", 4, 4, None, None),
        ("hop", "right", 2, 3, 2, 4), ("arith", 2, "+", 1, 3), ("arith", 5, "-", 2, 3),
        ("cmp", 2, ">", 1),
    ]  # fmt: skip
    text = "Counting: " + ". ".join(format_claim(c) for c in claims) + "."
    assert parse_claims(text) == claims
    assert all(check_claim(c, scene) for c in claims)
    wrong = ["red shapes: 3", "cell 2 3: red circle", "left of cell 2 3 is cell 2 4", "2 + 2 = 5",
             "1 > 2", "cell 5 1: empty"]  # fmt: skip
    for w in wrong:
        (c,) = parse_claims(w)
        assert not check_claim(c, scene), w
    chart = ChartScene((("A", 3), ("B", 7)), 8)
    assert [check_claim(c, chart) for c in parse_claims("Bar b: 7, tallest bar: A")] == [
        True,
        False,
    ]


def _oracle_figures(error_rate: float, style: str, items: list[dict]):
    teacher, judge, scorer = OracleTeacher(error_rate, style, seed=3), OracleJudge(), OracleScorer()
    right, wrong, n_steps_ok, n = [], [], 0, 0
    for item in items:
        chains = teacher.chains(item, 3)
        for chain, score in zip(chains, scorer.score(item, chains)):
            n += 1
            steps = chain["steps"]
            n_steps_ok += (
                len(steps) >= 2
                and all(set(s) == {"title", "content", "next_action"} for s in steps)
                and [s["next_action"] for s in steps] == ["continue"] * (len(steps) - 1) + ["final_answer"]
                and all(parse_claims(s["content"]) for s in steps[:-1] if "question asks" not in s["content"])
            )  # fmt: skip
            verdict, raw = judge.judge(item["question"], item["answer"], chain["final_answer"])
            assert raw == f"[{verdict}]"
            (right if verdict else wrong).append(score)
    return n_steps_ok / n, len(right) / n, right, wrong


@pytest.mark.parametrize("style", ["full", "terse"])
def test_oracle_figures(style):
    items = [dataclasses.asdict(it) for it in generate_split("val", 300, seed=2)]
    parsed, acc, right, _ = _oracle_figures(0.0, style, items)
    print(f"\n[{style}] error 0: chains parse {parsed:.0%}, answers correct {acc:.0%}, "
          f"score min {min(right)} mean {statistics.mean(right):.1f}")  # fmt: skip
    assert parsed == 1.0 and acc == 1.0 and min(right) >= 90
    parsed, acc, right, wrong = _oracle_figures(0.3, style, items)
    print(f"[{style}] error 0.3: chains parse {parsed:.0%}, answers correct {acc:.0%}, "
          f"score right {statistics.mean(right):.1f} vs wrong {statistics.mean(wrong):.1f}")  # fmt: skip
    assert parsed == 1.0 and 0.6 < acc < 0.9
    assert statistics.mean(wrong) < statistics.mean(right) - 30


def test_scorer_grades_thoughts_text_like_steps():
    item = dataclasses.asdict(generate_split("test", 1, seed=0, weights={"sum": 1.0})[0])
    chain = OracleTeacher(0.0, "full").chain(item)
    text = "<thoughts>\n" + "\n".join(f"{s['title']}: {s['content']}" for s in chain["steps"][:-1])
    text += "\n</thoughts>"
    scorer = OracleScorer()
    assert scorer.score(item, [chain, text]) == [100, 100]
    assert scorer.score(item, ["I am not sure.", ""]) == [1, 1]


def test_judge_and_verdicts():
    judge = OracleJudge()
    q = "how many red shapes plus circles?\nA. 2\nB. 3\nC. 4\nD. 5"
    assert judge.judge(q, "B", "(B)")[0] == 1 and judge.judge(q, "B", "3")[0] == 1
    assert judge.judge(q, "B", "C.")[0] == 0 and judge.judge(q, "B", "no idea") == (0, "[0]")
    assert judge.judge("more red shapes than squares?", "yes", "Yes, 3 > 2.") == (1, "[1]")
    assert judge.judge("bar A plus bar B?", "9", "the answer is 9.0")[0] == 1
    assert judge.judge("colour of cell 1 1?", "red", "Blue")[0] == 0
    assert [parse_verdict(x) for x in ("[1]", " [ 0 ] ", "yes", "")] == [1, 0, 0, 0]


def test_arrayrecord_matches_llava(tmp_path):
    from insightv_jax.data.sources import open_source

    assert main(["synth", "--out", str(tmp_path / "j"), "--n", "4", "--seed", "9"]) == 0
    args = [
        "synth",
        "--out",
        str(tmp_path / "ar"),
        "--n",
        "4",
        "--seed",
        "9",
        "--format",
        "arrayrecord",
    ]
    assert main(args) == 0
    llava = open_source(tmp_path / "j" / "val.json")
    ar = open_source(tmp_path / "ar", split="val")
    assert len(ar) == len(llava) == 4
    for i in range(4):
        a, b = ar[i], llava[i]
        for key in ("id", "question", "answer", "family", "conversations", "scene", "query"):
            assert a[key] == b[key], key
        png = np.asarray(Image.open(tmp_path / "j" / b["image"]).convert("RGB"))
        assert np.array_equal(a["image_arrays"][0], png)


def test_descriptor_knob_and_count_object():
    from insightv_jax.data.synthetic.generate import generate_split
    from insightv_jax.data.synthetic.scenes import Knobs

    knobs = Knobs(descriptors=("both",))
    items = generate_split("train", 60, 0, knobs, {"sum": 1.0, "count_object": 1.0})
    for it in items:
        descs = [it.query["desc"]] if "desc" in it.query else [it.query["a"], it.query["b"]]
        assert all(c is not None and s is not None for c, s in descs), it.question
    with pytest.raises(ValueError, match="descriptors"):
        Knobs(descriptors=("size",))


def test_inventory_perception_records_read_every_kind_on_the_same_image():
    from insightv_jax.data.synthetic.scenes import Knobs, scene_from_dict
    from insightv_jax.data.synthetic.writer import perception_records, to_record

    knobs = Knobs(descriptors=("both",), n_colours=3, n_shapes=2)
    items = generate_split("train", 40, 1, knobs, {"compare": 1.0, "bar_value": 1.0})
    records = [to_record(it) for it in items]
    extra = perception_records(records, knobs)
    grid = [r for r in records if r["scene"]["kind"] == "grid"]
    assert 0 < len(extra) == len(grid) < len(records)  # charts have no inventory
    for rec, inv in zip(grid, extra):
        assert inv["image"] == rec["image"] and inv["family"] == "inventory"
        claims = parse_claims(inv["answer"])
        assert len(claims) == len(knobs.colours) * len(knobs.shapes)
        assert all(check_claim(c, scene_from_dict(rec["scene"])) for c in claims)
    assert {c[3] for r in extra for c in parse_claims(r["answer"])} >= {0, 1, 2}
