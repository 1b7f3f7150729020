"""Sources and validation: a corpus with one record of each kind of bad input."""

import json
from pathlib import Path

import pytest

from insightv_jax.cli import main
from insightv_jax.data.sources import JsonlSource, LlavaJsonSource, open_source
from insightv_jax.data.synthetic.render import png_bytes, render
from insightv_jax.data.synthetic.scenes import GridScene
from insightv_jax.data.validate import Limits, validate_source
from insightv_jax.errors import DataError

BAD = {  # id -> the words its reason must contain
    "truncated": "does not decode",
    "missing": "not found",
    "escape": "leaves the data root",
    "line 6": "malformed JSON",
    "empty": "empty conversation",
    "long": "too long",
    "line 8": "UTF-8",
}
LIMITS = Limits(max_length=80, image_tokens=16)


def _rec(rid: str, image: str, question: str = "how many red shapes?", answer: str = "2"):
    conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": conv}


def make_corpus(root: Path, n_good: int = 8) -> Path:
    """root/data.jsonl: good records 0..2, the seven bad ones, then more good ones."""
    (root / "images").mkdir(parents=True)
    png = png_bytes(render(GridScene(4, {(1, 1): ("red", "square"), (2, 2): ("red", "star")})))
    (root / "images" / "ok.png").write_bytes(png)
    (root / "images" / "cut.png").write_bytes(png[: len(png) // 2])
    (root.parent / "outside.png").write_bytes(png)
    lines = [json.dumps(_rec(f"good-{i}", "images/ok.png")).encode() for i in range(3)]
    lines += [
        json.dumps(_rec("truncated", "images/cut.png")).encode(),  # line 4
        json.dumps(_rec("missing", "images/nope.png")).encode(),
        b'{"id": "broken", "conversations": [',  # line 6
        json.dumps(_rec("escape", "../outside.png")).encode(),
        b'{"id": "latin1", "image": "images/ok.png", "conversations": [{"from": "human", '
        b'"value": "<image>\\ncaf\xe9?"}, {"from": "gpt", "value": "x"}]}',  # line 8
        json.dumps({"id": "empty", "image": "images/ok.png", "conversations": []}).encode(),
        json.dumps(_rec("long", "images/ok.png", "red " * 100)).encode(),
    ]
    lines += [json.dumps(_rec(f"good-{i}", "images/ok.png")).encode() for i in range(3, n_good)]
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_validate_names_every_bad_record(tmp_path):
    path = make_corpus(tmp_path / "d")
    report = validate_source(JsonlSource(path), LIMITS)
    bad = dict(report.bad)
    assert set(bad) == set(BAD), bad
    for rid, words in BAD.items():
        assert words in bad[rid], (rid, bad[rid])
    assert report.total == 15 and len(report.good) == 8


def test_cli_data_validate(tmp_path, capsys):
    path = make_corpus(tmp_path / "d")
    assert main(["data", "validate", str(path), "--max-length", "80"]) == 1
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 8 and lines[-1] == "15 records: 8 ok, 7 bad"
    assert {line.split(":")[0] for line in lines[:-1]} == set(BAD)
    assert err.startswith("error: ") and "7 bad record(s)" in err
    good = tmp_path / "good.json"
    recs = [_rec("a", "d/images/ok.png"), _rec("b", "d/images/ok.png")]
    good.write_text(json.dumps(recs))
    assert main(["data", "validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == "2 records: 2 ok, 0 bad"


def test_conversation_rules_and_image_count(tmp_path):
    root = tmp_path / "d"
    make_corpus(root)
    cases = {
        "gpt first": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "<image>"}],
        "no answer": [{"from": "human", "value": "<image>\nq?"}],
        "blank turn": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": " "}],
        "two tags": [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
    }
    recs = [{"id": k, "image": "images/ok.png", "conversations": v} for k, v in cases.items()]
    sys_ok = [{"from": "system", "value": "be brief"}, *_rec("x", "")["conversations"]]
    recs.append({"id": "system ok", "image": "images/ok.png", "conversations": sys_ok})
    recs.append(_rec("abs", str((root / "images/ok.png").resolve())))
    (root / "more.json").write_text(json.dumps(recs))
    report = validate_source(LlavaJsonSource(root / "more.json"), LIMITS)
    bad = dict(report.bad)
    assert set(bad) == {"gpt first", "no answer", "blank turn", "two tags", "abs"}
    assert "expected from=human" in bad["gpt first"] and "2 <image> tag(s)" in bad["two tags"]
    assert "leaves the data root" in bad["abs"]


def test_whole_file_errors_are_one_line(tmp_path):
    (tmp_path / "x.json").write_bytes(b'[{"id": 1}')
    with pytest.raises(DataError, match=r"x.json: malformed JSON"):
        open_source(tmp_path / "x.json")
    (tmp_path / "y.json").write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(DataError, match="not valid UTF-8"):
        open_source(tmp_path / "y.json")
    with pytest.raises(DataError, match="not found"):
        open_source(tmp_path / "z.jsonl")


def test_images_decode_once_but_a_changed_file_is_checked_again(tmp_path):
    # validation decodes each image file once per process (records share images);
    # the cache is keyed by the file's mtime and size, so a file broken after a
    # first check is reported, not remembered as good
    path = make_corpus(tmp_path / "d")
    assert validate_source(JsonlSource(path), LIMITS).total == 15
    ok = tmp_path / "d" / "images" / "ok.png"
    ok.write_bytes(ok.read_bytes()[:40])
    bad = dict(validate_source(JsonlSource(path), LIMITS).bad)
    assert all("does not decode" in bad[f"good-{i}"] for i in range(8))


def test_a_lone_surrogate_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    png = png_bytes(render(GridScene(4, {(0, 0): ("red", "square")})))
    (tmp_path / "images" / "a.png").write_bytes(png)
    rec = _rec("s", "images/a.png", "caf\ud800?")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(rec) + "\n")  # ensure_ascii keeps the surrogate as \ud800
    bad = dict(validate_source(JsonlSource(path), LIMITS).bad)
    assert "UTF-8" in bad["s"] and "conversations[0].value" in bad["s"], bad


def test_image_paths_are_checked_through_symlinks_and_dots(tmp_path):
    root = tmp_path / "d"
    make_corpus(root)
    images = root / "images"
    (images / "out.png").symlink_to(tmp_path / "outside.png")  # a link out of the root
    (images / "in.png").symlink_to(images / "ok.png")  # a link that stays inside
    (root / "linked").symlink_to(tmp_path)  # a directory link out of the root
    (images / "sub").mkdir()
    cases = {
        "link out": "images/out.png",
        "link in": "images/in.png",
        "dir link out": "linked/outside.png",
        "dots inside": "images/sub/../ok.png",
        "dots out": "images/../../outside.png",
        "a directory": "images/sub",
    }
    (root / "paths.json").write_text(json.dumps([_rec(k, v) for k, v in cases.items()]))
    bad = dict(validate_source(LlavaJsonSource(root / "paths.json"), LIMITS).bad)
    assert set(bad) == {"link out", "dir link out", "dots out", "a directory"}, bad
    for rid in ("link out", "dir link out", "dots out"):
        assert "leaves the data root" in bad[rid]
    assert "not found" in bad["a directory"]
