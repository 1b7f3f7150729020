"""Append-only JSONL shards keyed by a stable record id, resumable after SIGKILL.

Every record carries a `key` (e.g. "<query id>#<sample>"). A writer reopens its
shard, drops a torn last line (a write the kill interrupted), remembers the keys
already there and skips them, and hands every line to the OS as it is written:
after a kill at any point a rerun loses nothing and duplicates nothing. Lines
reach the disk (fsync) at least once a second and on close, so a machine that
loses power loses at most the last second of records (redone on rerun); an
fsync per line cost the demo's data stage ~40 s for 100k records.
Process k of n writes `shard-0000k-of-0000n.jsonl`; readers merge every shard
of a folder.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from insightv_jax.errors import DataError


def shard_path(folder: str | Path, shard: int, num_shards: int) -> Path:
    return Path(folder) / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


def _good_prefix(path: Path) -> tuple[list[dict], int]:
    """The parseable complete lines of a shard and the byte length they cover."""
    data = path.read_bytes()
    records, end = [], 0
    while True:
        nl = data.find(b"\n", end)
        if nl < 0:
            break
        try:
            records.append(json.loads(data[end:nl]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            break  # a torn write: everything from here on is redone
        end = nl + 1
    return records, end


class ShardWriter:
    """Appends records to one shard; thread-safe; skips keys already written."""

    def __init__(self, path: str | Path, sync_every: float = 1.0):
        self.path = Path(path)
        self.sync_every = sync_every  # seconds between fsyncs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records, end = _good_prefix(self.path) if self.path.exists() else ([], 0)
        if self.path.exists() and end < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(end)
        self.done = {r["key"] for r in records}
        self.resumed = len(self.done)
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")
        self._synced = time.monotonic()

    def write(self, record: dict) -> bool:
        """Append one record (False if its key is already there)."""
        line = json.dumps(record, ensure_ascii=False, sort_keys=True).encode() + b"\n"
        with self._lock:
            if record["key"] in self.done:
                return False
            self._file.write(line)
            self._file.flush()  # in the OS: survives the process being killed
            if time.monotonic() - self._synced >= self.sync_every:
                self._sync()
            self.done.add(record["key"])
        return True

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            with self._lock:
                self._file.flush()
                self._sync()
                self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_shards(folder: str | Path) -> list[dict]:
    """All records of every shard of `folder`, one per key (first seen wins)."""
    folder = Path(folder)
    paths = sorted(folder.glob("shard-*.jsonl"))
    if not paths:
        raise DataError(f"{folder}: no shard-*.jsonl files (run the previous stage first)")
    seen, out = set(), []
    for path in paths:
        records, _ = _good_prefix(path)
        for rec in records:
            if rec["key"] not in seen:
                seen.add(rec["key"])
                out.append(rec)
    return out


def my_share(items: list, shard: int, num_shards: int) -> list:
    """Process `shard` of `num_shards` takes every num_shards-th item (disjoint, covering)."""
    return items[shard::num_shards]
