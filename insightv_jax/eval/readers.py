"""Benchmark files -> normalized `EvalItem`s.

Layouts: VLMEvalKit-style TSV (index, question, A..J option columns, answer,
image as base64 / a path / the index of another row's image, category, hint),
JSON (a list of records, or a mapping id -> record), JSONL, parquet (Hugging
Face style image cells `{bytes, path}` too) and the synthetic suite
(`insightv synth` output: D/{split}.json). Field names are looked up from a few
common aliases; one bad record is a one-line `DataError` naming file and id.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

from insightv_jax.errors import DataError
from insightv_jax.eval.extract import LETTERS, normalize_text, parse_options
from insightv_jax.jsonl import parse_jsonl

KINDS = ("mc", "yesno", "numeric", "open", "chartqa")
LAYOUTS = ("auto", "tsv", "json", "jsonl", "parquet", "synthetic")

ID_KEYS = ("id", "index", "question_id", "qid", "pid")
QUESTION_KEYS = ("question", "query", "prompt")
ANSWER_KEYS = ("answer", "gt_answer", "ground_truth", "label", "answers")
IMAGE_KEYS = ("image", "image_path", "img", "image_file", "decoded_image")
OPTION_KEYS = ("options", "choices")
CATEGORY_KEYS = ("category", "family", "subject", "task")

# The instruction after the question when a benchmark config gives none (LLaVA's
# evaluation wording). The synthetic suite's questions are used as trained: none.
DEFAULT_INSTRUCTION = {
    "mc": "Answer with the option's letter from the given choices directly.",
    "yesno": "Answer the question using a single word or phrase.",
    "numeric": "Answer the question using a single word or phrase.",
    "open": "Answer the question using a single word or phrase.",
    "chartqa": "Answer the question using a single word or phrase.",
}
_IMAGE_EXT = re.compile(r"\.(png|jpe?g|gif|bmp|webp|tiff?)$", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One benchmark question, normalized. `image` is a path, a PIL image or None;
    `options` maps letters to option texts (multiple choice only)."""

    id: str
    question: str
    answer: str
    options: dict[str, str] | None = None
    image: Any = None
    kind: str = "open"
    category: str = ""
    benchmark: str = ""
    instruction: str = ""

    @property
    def prompt(self) -> str:
        """The question as a model sees it: options listed (unless the question
        already lists them), then the instruction."""
        text = self.question
        if self.options and not parse_options(text):
            text += "\n" + "\n".join(f"{k}. {v}" for k, v in self.options.items())
        return f"{text}\n{self.instruction}" if self.instruction else text


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or str(v).strip().lower() in ("", "nan")


def _first(rec: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in rec and not _missing(rec[k]):
            return rec[k]
    return None


def _as_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def infer_kind(answer: str, options: dict | None) -> str:
    """mc with options; yesno / numeric by the answer's form; else open."""
    if options:
        return "mc"
    if normalize_text(answer) in ("yes", "no"):
        return "yesno"
    return "numeric" if _NUMBER.fullmatch(answer.replace(" ", "")) else "open"


def _parse_list(v: Any) -> Any:
    """A Python/JSON list written as a string (VLMEvalKit, MMMU) -> list."""
    if isinstance(v, str) and v.strip().startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(v)
            except (ValueError, SyntaxError):
                continue
    return v


def _options(rec: dict, question: str) -> dict[str, str] | None:
    cols = {k: _as_text(rec[k]) for k in LETTERS if k in rec and not _missing(rec[k])}
    if cols:
        return cols
    v = _parse_list(_first(rec, OPTION_KEYS))
    if isinstance(v, dict):
        return {str(k).upper(): _as_text(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and v:
        return {LETTERS[i]: _as_text(x) for i, x in enumerate(v[: len(LETTERS)])}
    if isinstance(v, str):
        return parse_options(v) or None
    return parse_options(question) or None


def _decode_b64(s: str, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(s, validate=False)
        return Image.open(io.BytesIO(raw))  # lazy: pixels are decoded on first use
    except (binascii.Error, UnidentifiedImageError, ValueError, OSError):
        raise DataError(
            f"{where}: image is neither a readable file nor base64 image data"
        ) from None


def _image(v: Any, root: Path, where: str, by_index: dict[str, Any]) -> Any:
    """A path (checked), a PIL image, or None."""
    from PIL import Image, UnidentifiedImageError

    v = _parse_list(v)
    if isinstance(v, (list, tuple)):  # multi-image records: the first image is used
        v = v[0] if v else None
    if _missing(v):
        return None
    if isinstance(v, Image.Image):
        return v
    if isinstance(v, dict):  # Hugging Face datasets Image cell
        v = v.get("bytes") or v.get("path")
        if _missing(v):
            return None
    if isinstance(v, (bytes, bytearray)):
        try:
            return Image.open(io.BytesIO(bytes(v)))
        except (UnidentifiedImageError, OSError):
            raise DataError(f"{where}: image bytes are not a readable image") from None
    s = str(v).strip()
    if s.isdigit() and s in by_index:  # VLMEvalKit: the image of the row with this index
        return by_index[s]
    path = Path(s) if len(s) < 4096 else None
    if path is not None and not path.is_absolute():
        path = root / path
    if path is not None and path.is_file():
        return str(path)
    if not _IMAGE_EXT.search(s):
        try:
            return _decode_b64(s, where)
        except DataError:
            if "/" not in s or path is None:
                raise
    raise DataError(f"{where}: image {path} not found")


def normalize_record(
    rec: dict,
    where: str,
    root: Path,
    *,
    benchmark: str,
    kind: str = "auto",
    instruction: str | None = None,
    by_index: dict[str, Any] | None = None,
) -> EvalItem:
    """One raw record -> EvalItem (a DataError naming `where` if it is unusable)."""
    rid = _first(rec, ID_KEYS)
    where = f"{where} (id {_as_text(rid)})" if rid is not None else where
    question = _first(rec, QUESTION_KEYS)
    if question is None:
        raise DataError(f"{where}: no question (looked for {', '.join(QUESTION_KEYS)})")
    question = str(question).strip()
    hint = rec.get("hint")
    if not _missing(hint):
        question = f"Hint: {str(hint).strip()}\n{question}"
    answer = _parse_list(_first(rec, ANSWER_KEYS))
    if isinstance(answer, (list, tuple)):  # several references: the first is scored
        answer = answer[0] if answer else None
    if _missing(answer):
        raise DataError(f"{where}: no answer (looked for {', '.join(ANSWER_KEYS)})")
    answer = _as_text(answer)
    options = _options(rec, question) if kind in ("auto", "mc") else None
    if kind == "mc" and not options:
        raise DataError(f"{where}: multiple-choice record without options")
    if options and answer.upper() not in options:
        hits = [k for k, t in options.items() if normalize_text(t) == normalize_text(answer)]
        if not hits:
            raise DataError(f"{where}: answer {answer!r} is not one of the options")
        answer = hits[0]
    elif options:
        answer = answer.upper()
    kind = infer_kind(answer, options) if kind == "auto" else kind
    category = _first(rec, CATEGORY_KEYS)
    image = _image(_first(rec, IMAGE_KEYS), root, where, by_index or {})
    return EvalItem(
        id=_as_text(rid) if rid is not None else where.rsplit(":", 1)[-1],
        question=question,
        answer=answer,
        options=options,
        image=image,
        kind=kind,
        category=_as_text(category) if category is not None else "",
        benchmark=benchmark,
        instruction=DEFAULT_INSTRUCTION[kind] if instruction is None else instruction,
    )


# ------------------------------------------------------------------ raw records


def _read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long cells
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [{"id": k, **v} for k, v in data.items()]  # e.g. MathVista: pid -> record
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of records or a mapping id -> record")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    return parse_jsonl(path.read_text(encoding="utf-8"), path)  # not UTF-8: read_benchmark says


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: unreadable parquet ({str(e).splitlines()[0][:120]})") from None


READERS = {"tsv": _read_tsv, "json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet}


def detect_layout(path: Path) -> str:
    """The layout from the path: a directory is the synthetic suite, else the suffix."""
    if path.is_dir():
        return "synthetic"
    suffix = path.suffix.lower().lstrip(".")
    layout = {"tsv": "tsv", "json": "json", "jsonl": "jsonl", "parquet": "parquet"}.get(suffix)
    if layout is None:
        raise DataError(f"{path}: cannot tell the layout from the name; set layout")
    return layout


def read_benchmark(
    path: str | Path,
    layout: str = "auto",
    *,
    name: str | None = None,
    kind: str = "auto",
    split: str = "test",
    image_root: str | None = None,
    instruction: str | None = None,
    limit: int = 0,
) -> list[EvalItem]:
    """Read a benchmark file (or the synthetic suite directory) into EvalItems.

    `kind` forces the scoring kind for every item (ChartQA needs `chartqa` for
    relaxed accuracy); `instruction` None uses the kind's default wording
    (none for the synthetic suite); `limit` > 0 keeps the first items.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: benchmark file not found")
    if layout not in LAYOUTS:
        raise DataError(f"{path}: layout {layout!r} is not one of {LAYOUTS}")
    if kind != "auto" and kind not in KINDS:
        raise DataError(f"{path}: kind {kind!r} is not one of {KINDS}")
    layout = detect_layout(path) if layout == "auto" else layout
    if layout == "synthetic":
        path = path / f"{split}.json" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"{path}: synthetic split file not found (run `insightv synth`)")
        layout, instruction = "json", "" if instruction is None else instruction
        name = name or "synthetic"
    name = name or path.stem
    root = Path(image_root) if image_root else path.parent
    try:
        records = READERS[layout](path)
    except UnicodeDecodeError as e:  # a benchmark file that is not UTF-8 text
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    if limit > 0:
        records = records[:limit]
    items: list[EvalItem] = []
    by_index: dict[str, Any] = {}
    for n, rec in enumerate(records):
        item = normalize_record(
            rec, f"{path}:{n + 1}", root, benchmark=name, kind=kind,
            instruction=instruction, by_index=by_index,
        )  # fmt: skip
        if item.image is not None:
            by_index[item.id] = item.image
        items.append(item)
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{path}: duplicate id {item.id!r}")
        seen.add(item.id)
    if not items:
        raise DataError(f"{path}: no records")
    return items
