"""JSON Lines files: one JSON object a line (pair files, generations, metrics).

Reading is strict: a bad line is a one-line DataError naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from insightv_jax.errors import DataError


def parse_jsonl(data: bytes | str, where: str | Path) -> list[dict]:
    """The JSON objects of JSONL `data` (blank lines skipped); errors name `where`
    and the line (bytes are decoded line by line, so a bad byte names its line)."""
    sep = b"\n" if isinstance(data, bytes) else "\n"
    rows = []
    for n, line in enumerate(data.split(sep), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
        except UnicodeDecodeError as e:
            raise DataError(f"{where}:{n}: not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}:{n}: not a JSON object")
        rows.append(row)
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file (a pair file, a run's own records); a missing
    file or a bad line is a one-line DataError naming the file and line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return parse_jsonl(data, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write atomically (a crash leaves the old file or none, never half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one object as a line (a log that grows across resumes)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
