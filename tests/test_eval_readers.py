"""Benchmark readers: every layout -> the same normalized EvalItems; bad input is one line."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from insightv_jax.errors import DataError
from insightv_jax.eval.readers import EvalItem, read_benchmark

OPTS = ["red", "blue", "green", "yellow"]
# (id, question, options, answer, category); the expected kinds are mc, mc, yesno, numeric, open
ROWS = [
    ("1", "What colour is the big square?", OPTS, "B", "colour"),
    ("2", "How many circles?", ["1", "2", "3", "4"], "A", "count"),
    ("3", "Is there a triangle?", None, "Yes", "exist"),
    ("4", "How many shapes in total?", None, "12", "count"),
    ("5", "What shape is top-left?", None, "circle", "shape"),
]
KINDS = ["mc", "mc", "yesno", "numeric", "open"]


def png_bytes(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tsv(path, images: str) -> None:
    """VLMEvalKit style; images='base64' (row 2 refers to row 1's image by index)
    or 'path' (an image_path column relative to the file)."""
    cols = ["index", "question", "A", "B", "C", "D", "answer", "category"]
    cols.append("image" if images == "base64" else "image_path")
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        for k, (rid, q, opts, ans, cat) in enumerate(ROWS):
            o = list(opts) if opts else ["", "", "", ""]
            if images == "base64":
                img = "1" if rid == "2" else base64.b64encode(png_bytes((k * 40, 0, 0))).decode()
            else:
                (path.parent / f"img{rid}.png").write_bytes(png_bytes())
                img = f"img{rid}.png"
            w.writerow([rid, q, *o, ans, cat, img])


def json_records(path_dir) -> list[dict]:
    recs = []
    for rid, q, opts, ans, cat in ROWS:
        (path_dir / f"img{rid}.png").write_bytes(png_bytes())
        rec = {"id": rid, "question": q, "answer": ans, "category": cat, "image": f"img{rid}.png"}
        if opts:
            rec["options"] = opts
        recs.append(rec)
    recs[0]["answer"] = "blue"  # an MC answer given as the option's text
    return recs


def write_layout(tmp_path, layout: str):
    """The hand-made benchmark in `layout`; returns its path."""
    if layout in ("tsv_base64", "tsv_path"):
        p = tmp_path / "bench.tsv"
        write_tsv(p, layout.split("_")[1])
    elif layout == "json":
        p = tmp_path / "bench.json"
        p.write_text(json.dumps(json_records(tmp_path)))
    elif layout == "jsonl":
        p = tmp_path / "bench.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in json_records(tmp_path)) + "\n")
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        rows = []
        for k, (rid, q, opts, ans, cat) in enumerate(ROWS):
            row = {"index": int(rid), "question": q, "answer": ans, "category": cat}
            row.update({L: (opts[i] if opts else None) for i, L in enumerate("ABCD")})
            row["image"] = {"bytes": png_bytes((0, k * 40, 0)), "path": None}  # HF Image cell
            rows.append(row)
        p = tmp_path / "bench.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    return p


LAYOUTS = ["tsv_base64", "tsv_path", "json", "jsonl", "parquet"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_normalizes_the_same(tmp_path, layout):
    items = read_benchmark(write_layout(tmp_path, layout), name="hand")
    assert [it.id for it in items] == [r[0] for r in ROWS]
    assert [it.kind for it in items] == KINDS
    assert [it.answer for it in items] == ["B", "A", "Yes", "12", "circle"]
    assert items[0].options == dict(zip("ABCD", OPTS)) and items[2].options is None
    assert [it.category for it in items] == [r[4] for r in ROWS]
    assert all(it.benchmark == "hand" for it in items)
    for it in items:  # every image opens, as a path or a PIL image
        im = it.image if isinstance(it.image, Image.Image) else Image.open(it.image)
        assert im.size == (8, 6)
    if layout == "tsv_base64":  # row 2 re-uses row 1's image (VLMEvalKit dedup)
        assert items[1].image is items[0].image
    # the prompt lists the options and the kind's instruction
    assert items[0].prompt.splitlines()[1:] == [
        "A. red", "B. blue", "C. green", "D. yellow",
        "Answer with the option's letter from the given choices directly.",
    ]  # fmt: skip


def test_synthetic_suite_reader(tmp_path):
    from insightv_jax.data.synthetic.writer import write_llava

    write_llava(tmp_path, 12, 0)
    items = read_benchmark(tmp_path, split="val")
    assert len(items) == 12 and items[0].benchmark == "synthetic"
    assert all(it.instruction == "" and it.prompt == it.question for it in items)
    recs = {r["id"]: r for r in json.loads((tmp_path / "val.json").read_text())}
    for it in items:
        assert it.category == recs[it.id]["family"] and it.answer == recs[it.id]["answer"]
        assert (it.kind == "mc") == it.category.startswith("mc_")
        assert Image.open(it.image).size[0] > 0
    assert read_benchmark(tmp_path, split="val", limit=3) == items[:3]


def test_bad_input_is_one_line(tmp_path):
    def fails(records, match, suffix="json"):
        p = tmp_path / f"bad.{suffix}"
        p.write_text(records if isinstance(records, str) else json.dumps(records))
        with pytest.raises(DataError, match=match) as e:
            read_benchmark(p)
        assert "\n" not in str(e.value)

    fails([{"id": "q7", "question": "x?"}], r"id q7\): no answer")
    fails([{"id": "q8", "answer": "1"}], r"id q8\): no question")
    fails(
        [{"id": "q9", "question": "x?", "answer": "1", "image": "nope.png"}], "nope.png not found"
    )
    fails(
        [{"id": "a", "question": "x?", "answer": "purple", "options": OPTS}], "not one of the opt"
    )
    fails([{"id": "a", "question": "x", "answer": "1"}, {"id": "a", "question": "y", "answer": "2"}],
          "duplicate id 'a'")  # fmt: skip
    fails('{"id": 1, "question": "x", "answer": "1"}\n{oops\n', r"bad.jsonl:2: malformed", "jsonl")
    with pytest.raises(DataError, match="benchmark file not found"):
        read_benchmark(tmp_path / "missing.tsv")


def test_forced_kind_and_instruction(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps([{"id": "1", "question": "value of A?", "answer": ["45", "45.0"]}]))
    (item,) = read_benchmark(p, kind="chartqa", instruction="")
    assert isinstance(item, EvalItem) and item.kind == "chartqa" and item.answer == "45"
    assert item.prompt == "value of A?"
