"""Record sources: LLaVA JSON, JSONL and ArrayRecord (tfds), all random access.

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose
items are record dicts — or a `BadRecord` when the record cannot even be parsed
(a malformed JSON line, bytes that are not UTF-8), so validation can name it
instead of crashing. Record images are paths relative to `root` (`image`: a path
or a list of paths) or, for ArrayRecord, decoded arrays under `image_arrays`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from insightv_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record that could not be parsed: its id (or line) and the reason."""

    id: str
    reason: str


def record_id(rec: dict | BadRecord, index: int) -> str:
    if isinstance(rec, BadRecord):
        return rec.id
    rid = rec.get("id") if isinstance(rec, dict) else None
    return str(rid) if rid is not None else f"#{index}"


class LlavaJsonSource:
    """A LLaVA JSON file: one list of records."""

    def __init__(self, path: str | Path, root: str | Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.path}: file not found") from None
        except OSError as e:
            raise DataError(
                f"{self.path}: cannot read ({e.strerror or type(e).__name__})"
            ) from None
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not valid UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}: malformed JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{self.path}: top level must be a list of records")
        self.records = data

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        return rec if isinstance(rec, dict) else BadRecord(f"#{i}", "record is not an object")


class JsonlSource:
    """A JSON-lines file; each line is parsed on access, so a bad line is one bad record."""

    def __init__(self, path: str | Path, root: str | Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        try:
            raw = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            raise DataError(f"{self.path}: file not found") from None
        except OSError as e:
            raise DataError(
                f"{self.path}: cannot read ({e.strerror or type(e).__name__})"
            ) from None
        self.lines = [(n + 1, line) for n, line in enumerate(raw) if line.strip()]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int):
        lineno, line = self.lines[i]
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            return BadRecord(f"line {lineno}", f"not valid UTF-8 at byte {e.start}")
        except json.JSONDecodeError as e:
            return BadRecord(f"line {lineno}", f"malformed JSON ({e.msg})")
        if not isinstance(rec, dict):
            return BadRecord(f"line {lineno}", "record is not an object")
        return rec


class ArrayRecordSource:
    """One split of a tfds ArrayRecord dataset (e.g. from `insightv synth --format arrayrecord`).

    JSON-text fields (conversations, scene, query) are decoded back to objects;
    the image arrives decoded as `image_arrays` [(H, W, 3) uint8].
    """

    JSON_FIELDS = ("conversations", "scene", "query")

    def __init__(self, path: str | Path, split: str = "train"):
        self.path, self.split = Path(find_tfds_dir(path)), split
        self.root = self.path
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(str(self.path))
            if self.split not in builder.info.splits:
                raise DataError(f"{self.path}: no split {self.split!r}")
            self._source = builder.as_data_source(self.split)
        return self._source

    def __getstate__(self):  # grain workers reopen the files
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        raw = self._open()[i]
        rec = {}
        try:
            for key, value in raw.items():
                if key == "image":
                    rec["image_arrays"] = [value]
                elif isinstance(value, bytes):
                    text = value.decode("utf-8")
                    rec[key] = json.loads(text) if key in self.JSON_FIELDS else text
                else:
                    rec[key] = value
        except UnicodeDecodeError as e:
            return BadRecord(f"#{i}", f"field {key!r} not valid UTF-8 at byte {e.start}")
        except json.JSONDecodeError as e:
            return BadRecord(f"#{i}", f"field {key!r} malformed JSON ({e.msg})")
        return rec


def find_tfds_dir(path: str | Path) -> Path:
    """The directory holding dataset_info.json at or below `path` (the newest version)."""
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(path.glob("**/dataset_info.json"))
    if not found:
        raise DataError(f"{path}: no tfds dataset (dataset_info.json) found")
    return found[-1].parent


def open_source(path: str | Path, split: str = "train", root: str | Path | None = None):
    """The source for a .json / .jsonl file or an ArrayRecord dataset directory."""
    path = Path(path)
    if path.is_dir():
        return ArrayRecordSource(path, split)
    if path.suffix == ".jsonl":
        return JsonlSource(path, root)
    if path.suffix == ".json":
        return LlavaJsonSource(path, root)
    if not path.exists():
        raise DataError(f"{path}: not found")
    raise DataError(f"{path}: unknown dataset format (expected .json, .jsonl or a tfds dir)")
