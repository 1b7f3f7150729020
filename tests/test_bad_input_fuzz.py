"""A corpus of broken inputs, each through the CLI's entry function: every one ends
in exit code 1, one `error:` line naming the file, record or key, no traceback,
and nothing at the output path (ISSUE #28).

Configs and overrides (`sft`), safetensors headers and HF config.json (`convert
hf2jax`), JSONL records and images (`data validate`, `infer`), orbax checkpoints
(`convert jax2hf`), and one subprocess run of a truncated checkpoint, where the
asyncio tracebacks of a failed orbax restore used to follow the error line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from insightv_jax import cli
from insightv_jax.hf.safetensors_io import DTYPE_BITS

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "sft" / "tiny-synthetic.yaml"
GATE = "model.layers.0.mlp.gate_proj.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error(result, *needles: str, out_path: Path | None = None, allow=()):
    """Exit 1; stderr is one `error:` line holding every needle (plus lines that
    start with an `allow` prefix); no traceback anywhere; nothing at `out_path`."""
    code, out, err = result
    assert code == 1, (out, err)
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert all(line.startswith(("error: ", *allow)) for line in lines), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    if out_path is not None:
        assert not out_path.exists(), out_path
        assert not list(out_path.parent.glob(f".{out_path.name}.tmp-*"))


# ---------------------------------------------------------------- configs and overrides


def _sft(capsys, tmp_path, config, *overrides):
    run = tmp_path / "run"
    result = _run(capsys, "sft", "--config", str(config), f"train.workdir={run}", *overrides)
    return result, run


def _yaml(tmp_path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


OVERRIDES = [
    ("unclosed-list", ["data.buckets=[64,128"], ["data.buckets", "not valid YAML"]),
    ("python-tag", ["train.lr=!!python/object/apply:os.system [true]"], ["train.lr", "python/"]),
    ("no-equals", ["train.lr"], ["'train.lr'", "key=value"]),
    ("unknown-key", ["train.lrr=1"], ["train.lrr"]),
    ("wrong-type", ["train.steps=ten"], ["train.steps", "integer"]),
    ("not-a-section", ["train.lr.x=1"], ["train.lr.x", "'lr' is not a section"]),
    ("mapping-value", ["pipeline.summary_mix={high: lots}"], ["pipeline.summary_mix.high"]),
    ("zero-heads", ["model.decoder.num_kv_heads=0"], ["decoder.num_kv_heads=0"]),
    ("bucket-too-small", ["data.buckets=[8]"], ["data.buckets"]),
]


@pytest.mark.parametrize("name, overrides, needles", OVERRIDES, ids=[c[0] for c in OVERRIDES])
def test_bad_override(name, overrides, needles, tmp_path, capsys):
    result, run = _sft(capsys, tmp_path, TINY, *overrides)
    _assert_one_error(result, *needles, out_path=run)


def test_python_tag_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "made-by-yaml"
    result, run = _sft(
        capsys, tmp_path, TINY, f'train.lr=!!python/object/apply:os.mkdir ["{marker}"]'
    )
    _assert_one_error(result, "train.lr", out_path=run)
    assert not marker.exists()


CONFIG_FILES = [
    ("non-utf8", b"train:\n  lr: \xff\n", ["bad.yaml", "UTF-8"]),
    ("yaml-syntax", "train: {lr: 1\n", ["bad.yaml", "not valid YAML"]),
    ("tab-indent", "train:\n\tlr: 1\n", ["bad.yaml", "not valid YAML"]),
    ("top-level-list", "- 1\n- 2\n", ["bad.yaml", "mapping"]),
    ("include-missing", "include: nope.yaml\n", ["nope.yaml", "not found"]),
    ("include-number", "include: 5\n", ["bad.yaml", "include"]),
    ("include-self", "include: bad.yaml\n", ["bad.yaml", "include cycle"]),
    ("python-tag", "train:\n  lr: !!python/name:os.system\n", ["bad.yaml", "python/"]),
    ("unknown-section", "trian:\n  lr: 1\n", ["'trian'"]),
]


@pytest.mark.parametrize("name, content, needles", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file(name, content, needles, tmp_path, capsys):
    result, run = _sft(capsys, tmp_path, _yaml(tmp_path, "bad.yaml", content))
    _assert_one_error(result, *needles, out_path=run)


def test_missing_config_file(tmp_path, capsys):
    result, run = _sft(capsys, tmp_path, tmp_path / "absent.yaml")
    _assert_one_error(result, "absent.yaml", "not found", out_path=run)


@pytest.mark.parametrize(
    "content, needle",
    [("suite: [1,\n", "not valid YAML"), (b"suite: \xfe\n", "UTF-8"), (None, "not found")],
    ids=["yaml-syntax", "non-utf8", "missing"],
)
def test_bad_demo_preset(content, needle, tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    if content is not None:
        _yaml(tmp_path, "preset.yaml", content)
    work = tmp_path / "demo"
    result = _run(capsys, "demo", "--preset", str(preset), "--workdir", str(work))
    _assert_one_error(result, "preset.yaml", needle, out_path=work)


# ---------------------------------------------------------------- safetensors and config.json


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama folder (config.json + model.safetensors) exported by our own code."""
    from insightv_jax.config import DecoderConfig, ModelConfig
    from insightv_jax.hf.convert import export_hf
    from insightv_jax.models.factory import init_model
    from insightv_jax.parallel import single_device_mesh

    decoder = DecoderConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
        num_kv_heads=2,
    )  # fmt: skip
    cfg = ModelConfig(decoder=decoder)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    out.mkdir()
    export_hf(init_model(cfg, single_device_mesh()), cfg, out)
    return out


def _read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _relayout(header: dict, body: bytes, key: str, **changes) -> tuple[dict, bytes]:
    """`key` with new dtype/shape, every tensor's bytes laid out again contiguously
    (a well-formed file whose tensor is of another kind)."""
    header = json.loads(json.dumps(header))
    order = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: header[k]["data_offsets"][0])  # fmt: skip
    header[key].update(changes)
    chunks, at = [], 0
    for k in order:
        begin, end = header[k]["data_offsets"]
        n = 1
        for d in header[k]["shape"]:
            n *= d
        size = n * DTYPE_BITS[header[k]["dtype"]] // 8
        old = body[begin:end] if k != key else body[begin:end][:size]
        chunks.append(old.ljust(size, b"\0"))
        header[k]["data_offsets"] = [at, at + size]
        at += size
    return header, b"".join(chunks)


def _entry(header, key, **changes):
    header = json.loads(json.dumps(header))
    header[key].update(changes)
    return header


def _last(header) -> str:
    return max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][0])  # fmt: skip


def _gap(header, body):
    """The last tensor moved 4 bytes on: a gap before it."""
    header = json.loads(json.dumps(header))
    b, e = header[_last(header)]["data_offsets"]
    header[_last(header)]["data_offsets"] = [b + 4, e + 4]
    return header, body[:b] + b"\0" * 4 + body[b:]


# name -> (header, body) -> (header (dict) or raw header bytes, body, stated header length or None)
SAFETENSORS = {
    "shape-vs-bytes": (lambda h, b: (_entry(h, GATE, shape=[16, 9]), b, None),
                       [GATE, "needs 576 bytes"]),
    "unknown-dtype": (lambda h, b: (_entry(h, GATE, dtype="Q7"), b, None), [GATE, "'Q7'"]),
    "dtype-vs-bytes": (lambda h, b: (_entry(h, GATE, dtype="F16"), b, None), [GATE, "F16"]),
    "overlapping": (lambda h, b: (_entry(h, GATE, data_offsets=[1500, 2080]), b, None), [GATE]),
    "gap": (lambda h, b: (*_gap(h, b), None), ["begin at"]),
    "reversed-offsets": (lambda h, b: (_entry(h, GATE, data_offsets=[2080, 1568]), b, None),
                         [GATE, "data_offsets"]),
    "negative-dim": (lambda h, b: (_entry(h, GATE, shape=[-16, 8]), b, None), [GATE, "shape"]),
    "shape-not-list": (lambda h, b: (_entry(h, GATE, shape="16x8"), b, None), [GATE, "shape"]),
    "no-offsets": (lambda h, b: (_entry(h, GATE, data_offsets=None), b, None),
                   [GATE, "data_offsets"]),
    "entry-not-object": (lambda h, b: ({**h, GATE: 5}, b, None), [GATE, "not an object"]),
    "header-a-list": (lambda h, b: ([1, 2], b, None), ["not a JSON object"]),
    "bad-metadata": (lambda h, b: ({**h, "__metadata__": {"format": 1}}, b, None),
                     ["__metadata__"]),
    "header-len-beyond-file": (lambda h, b: (h, b, 1 << 40), ["header length"]),
    "non-json-header": (lambda h, b: (b"\x00\x01garbage", b, None), ["not JSON"]),
    "non-utf8-header": (lambda h, b: (b'{"\xff": 1}', b, None), ["not JSON"]),
    "trailing-bytes": (lambda h, b: (h, b + b"xxxx", None), ["4 bytes after"]),
    "truncated-data": (lambda h, b: (h, b[:-100], None), ["truncated"]),
    "fp8-weight": (lambda h, b: (*_relayout(h, b, GATE, dtype="F8_E4M3"), None),
                   [GATE, "F8_E4M3"]),
    "int-weight": (lambda h, b: (*_relayout(h, b, GATE, dtype="I32"), None), [GATE, "I32"]),
    "shape-vs-config": (lambda h, b: (_entry(h, Q_PROJ, shape=[4, 16]), b, None),
                        [Q_PROJ, "does not fit"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SAFETENSORS))
def test_broken_safetensors(name, hf_dir, tmp_path, capsys):
    mutate, needles = SAFETENSORS[name]
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    header, body, length = mutate(*_read_st(src / "model.safetensors"))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    (src / "model.safetensors").write_bytes(struct.pack("<Q", n) + raw + body)
    out = tmp_path / "out"
    result = _run(capsys, "convert", "hf2jax", "--src", str(src), "--out", str(out))
    _assert_one_error(result, "model.safetensors", *needles, out_path=out)


def test_sharded_index_points_outside(hf_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    header, _ = _read_st(src / "model.safetensors")
    weight_map = {k: "../model.safetensors" for k in header if k != "__metadata__"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    result = _run(capsys, "convert", "hf2jax", "--src", str(src), "--out", str(out))
    _assert_one_error(result, "model.safetensors.index.json", "weight_map", out_path=out)


CONFIG_JSON = {
    "width-as-text": (lambda d: {**d, "hidden_size": "8"}, ["'hidden_size'", "not a number"]),
    "width-null": (lambda d: {**d, "intermediate_size": None}, ["'intermediate_size'"]),
    "fractional-layers": (lambda d: {**d, "num_hidden_layers": 1.5}, ["'num_hidden_layers'"]),
    "zero-heads": (lambda d: {**d, "num_attention_heads": 0}, ["num_heads=0"]),
    "rope-not-object": (lambda d: {**d, "rope_parameters": "llama3"}, ["'rope_parameters'"]),
    "top-level-list": (lambda d: [d], ["JSON object"]),
}


@pytest.mark.parametrize("name", list(CONFIG_JSON))
def test_hostile_config_json(name, hf_dir, tmp_path, capsys):
    mutate, needles = CONFIG_JSON[name]
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "config.json").write_text(
        json.dumps(mutate(json.loads((src / "config.json").read_text())))
    )
    out = tmp_path / "out"
    result = _run(capsys, "convert", "hf2jax", "--src", str(src), "--out", str(out))
    _assert_one_error(result, "config.json", *needles, out_path=out)


def test_config_json_not_utf8(hf_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    out = tmp_path / "out"
    result = _run(capsys, "convert", "hf2jax", "--src", str(src), "--out", str(out))
    _assert_one_error(result, "config.json", "UTF-8", out_path=out)


# ---------------------------------------------------------------- JSONL records and images


def _png(path: Path) -> bytes:
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path.read_bytes()


def _png_claiming(width: int, height: int, good: bytes) -> bytes:
    """A PNG whose IHDR claims another size (CRC fixed, so PIL believes it)."""
    ihdr = bytearray(good[12:29])  # b"IHDR" + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    return good[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(ihdr)) + good[33:]


def _record(rid: str, image: str | None = "img.png", **extra) -> dict:
    question = "<image>\nWhat colour?" if image else "What colour?"
    rec = {"id": rid, "conversations": [{"from": "human", "value": question},
                                        {"from": "gpt", "value": "red"}]}  # fmt: skip
    if image:
        rec["image"] = image
    return {**rec, **extra}


def _image_file(kind: str, path: Path) -> None:
    good = _png(path)
    data = {
        "garbage": b"this is not an image",
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "bomb": _png_claiming(100_000, 100_000, good),
    }[kind]
    path.write_bytes(data)


# name -> (JSONL bytes of the second line, or an image kind, what stdout names)
RECORDS = {
    "malformed-json": (b'{"id": "r2", "conversations": [', "line 2: malformed JSON"),
    "non-utf8": (b'{"id": "r2\xff"}', "line 2: not valid UTF-8"),
    "not-an-object": (b"[1, 2, 3]", "line 2: record is not an object"),
    "roles-swapped": (
        json.dumps({**_record("r2"), "conversations": [{"from": "gpt", "value": "x"}]}).encode(),
        "r2: conversation turn 0",
    ),
    "image-leaves-root": (json.dumps(_record("r2", "../escape.png")).encode(), "r2: image path"),
    "image-not-a-string": (json.dumps({**_record("r2"), "image": 5}).encode(), "r2: image path 5"),
    "image-garbage": ("garbage", "r2: image bad.png does not decode"),
    "image-truncated": ("truncated", "r2: image bad.png does not decode"),
    "image-empty": ("empty", "r2: image bad.png does not decode"),
    "image-bomb": ("bomb", "r2: image bad.png does not decode (DecompressionBombError)"),
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_bad_record(name, tmp_path, capsys):
    line, named = RECORDS[name]
    _png(tmp_path / "img.png")
    if isinstance(line, str):  # a broken image behind a well-formed record
        _image_file(line, tmp_path / "bad.png")
        line = json.dumps(_record("r2", "bad.png")).encode()
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps(_record("r1")).encode() + b"\n" + line + b"\n")
    code, out, err = _run(capsys, "data", "validate", str(data))
    _assert_one_error((code, out, err), "data.jsonl", "1 bad record")
    assert named in out, out
    assert "r1" not in out.replace("records", "")  # the good record is not reported


@pytest.mark.parametrize(
    "content, needle",
    [(b'[{"id": 1,', "malformed JSON"), (b"[\xff]", "UTF-8"), (b'{"id": 1}', "list of records")],
    ids=["malformed", "non-utf8", "not-a-list"],
)
def test_bad_llava_json(content, needle, tmp_path, capsys):
    (tmp_path / "data.json").write_bytes(content)
    result = _run(capsys, "data", "validate", str(tmp_path / "data.json"))
    _assert_one_error(result, "data.json", needle)


def _infer(capsys, tmp_path, *args):
    out = tmp_path / "answers.jsonl"
    absent = str(tmp_path / "no-checkpoint")  # bad input must fail before any model loads
    argv = ("infer", "--reason", absent, "--summary", absent, "--out", str(out), *args)
    return _run(capsys, *argv), out


INFER_ROWS = {
    "malformed-json": (b'{"question": ', "malformed JSON"),
    "row-a-list": (b'["what colour?"]', "row is not a JSON object"),
    "empty-question": (b'{"question": "  "}', "empty question"),
    "image-a-number": (b'{"question": "q", "image": 5}', "image 5 is not a path"),
    "image-missing": (b'{"question": "q", "image": "nope.png"}', "image nope.png not found"),
}


@pytest.mark.parametrize("name", list(INFER_ROWS))
def test_infer_batch_bad_row(name, tmp_path, capsys):
    row, reason = INFER_ROWS[name]
    (tmp_path / "rows.jsonl").write_bytes(row + b"\n")
    result, out = _infer(capsys, tmp_path, "--batch", str(tmp_path / "rows.jsonl"))
    _assert_one_error(result, "rows.jsonl", "no valid rows", out_path=out, allow=("skipped ",))
    assert f"rows.jsonl:1: {reason}" in result[2]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "bomb"])
def test_infer_broken_image(kind, tmp_path, capsys):
    _image_file(kind, tmp_path / "bad.png")
    result, out = _infer(capsys, tmp_path, "--question", "q", "--image", str(tmp_path / "bad.png"))
    _assert_one_error(result, "bad.png", "unreadable", out_path=out)


# ---------------------------------------------------------------- orbax checkpoints


@pytest.fixture(scope="module")
def model_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "model"
    assert cli.main(["convert", "hf2jax", "--src", str(hf_dir), "--out", str(out)]) == 0
    return out


def _truncate_data(ckpt: Path) -> list[Path]:
    """Halve every OCDBT data file (`d/...`) of the params: what a crash mid-copy leaves."""
    files = [f for f in (ckpt / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return files


def _delete_largest(ckpt: Path) -> None:
    files = [f for f in (ckpt / "params" / "d").iterdir()]
    max(files, key=lambda f: f.stat().st_size).unlink()


def _edit_config(ckpt: Path) -> None:
    path = ckpt / "config.yaml"
    path.write_text(path.read_text().replace("intermediate_size: 16", "intermediate_size: 24"))


CHECKPOINTS = {
    "truncated-data": (_truncate_data, ["params/d/", "truncated checkpoint data file"]),
    "missing-data": (_delete_largest, ["params/d/", "is missing"]),
    "corrupt-metadata": (lambda c: (c / "params" / "_METADATA").write_text('{"tree_'),
                         ["_METADATA", "not JSON"]),
    "corrupt-index": (lambda c: (c / "params" / "manifest.ocdbt").write_bytes(b"\0" * 64),
                      ["manifest.ocdbt", "corrupt checkpoint index"]),
    "config-disagrees": (_edit_config, ["params", "down_proj", "(1, 16, 8)", "(1, 24, 8)"]),
    "config-not-utf8": (lambda c: (c / "config.yaml").write_bytes(b"model:\n  kind: \xff\n"),
                        ["config.yaml", "UTF-8"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_broken_checkpoint(name, model_dir, tmp_path, capsys):
    mutate, needles = CHECKPOINTS[name]
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    mutate(src)
    out = tmp_path / "hf"
    result = _run(capsys, "convert", "jax2hf", "--src", str(src), "--out", str(out))
    _assert_one_error(result, *needles, out_path=out)


PAIRS = {
    "malformed-json": (b'{"chosen": \n', "pairs.jsonl:1: malformed JSON"),
    "not-an-object": (b'{"id": "p1"}\n"a string"\n', "pairs.jsonl:2: not a JSON object"),
    "non-utf8": (b'{"id": "p\xff"}\n', "pairs.jsonl:1: not valid UTF-8"),
    "missing": (None, "pairs.jsonl: file not found"),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_bad_pair_file(name, model_dir, tmp_path, capsys):
    content, needle = PAIRS[name]
    init = tmp_path / "init"
    shutil.copytree(model_dir, init)
    (init / "tokenizer").mkdir()  # read only after the pairs
    if content is not None:
        (tmp_path / "pairs.jsonl").write_bytes(content)
    config = _yaml(tmp_path, "dpo.yaml", "train:\n  steps: 1\n")
    run = tmp_path / "run"
    result = _run(capsys, "dpo", "--config", str(config), f"train.init={init}",
                  f"dpo.pairs={tmp_path / 'pairs.jsonl'}", f"train.workdir={run}")  # fmt: skip
    _assert_one_error(result, needle, out_path=run)


EVAL_FILES = {
    "benchmark-non-utf8": ("bench", b'{"id": "q\xff", "question": "?", "answer": "1"}\n',
                           "bench.jsonl: not valid UTF-8"),
    "chains-non-utf8": ("chains", b'{"id": "q1", "chain": "\xff"}\n',
                        "chains.jsonl: not valid UTF-8"),
    "chains-malformed": ("chains", b'{"id": "q1", \n', "chains.jsonl:1: not a {id, chain} record"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EVAL_FILES))
def test_bad_eval_file(name, model_dir, tmp_path, capsys):
    which, content, needle = EVAL_FILES[name]
    bench, chains = tmp_path / "bench.jsonl", tmp_path / "chains.jsonl"
    bench.write_bytes(b'{"id": "q1", "question": "how many?", "answer": "1"}\n')
    chains.write_bytes(b'{"id": "q1", "chain": "Answer: answer 1"}\n')
    (bench if which == "bench" else chains).write_bytes(content)
    out = tmp_path / "report"
    config = _yaml(tmp_path, "eval.yaml", f"""eval:
  benchmarks: [{{path: {bench}, name: b}}]
  systems: [{{name: s, mode: given_chain, summary: {model_dir}, chains: {chains}}}]
  out: {out}
""")  # fmt: skip
    result = _run(capsys, "eval", "--config", str(config))
    _assert_one_error(result, needle, out_path=out, allow=("eval: ",))  # progress lines


# JAX, XLA and absl may print these when a process starts; they are not ours.
STARTUP = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} |An NVIDIA GPU may)")


def test_truncated_checkpoint_in_a_fresh_process(model_dir, tmp_path):
    """The real program: before the fix, 8 runs in 10 printed 13 to 1,159 lines of
    orbax's asyncio tracebacks after the error ("Task exception was never
    retrieved", "Event loop is closed"), some at interpreter exit."""
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    _truncate_data(src)
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "insightv_jax.cli", "convert", "jax2hf", "--src", str(src),
         "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not STARTUP.match(x)]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "truncated checkpoint data file" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()
