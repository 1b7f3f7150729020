"""Reading and writing Hugging Face safetensors folders (single file or sharded).

Reading validates every file's header and size up front, so a missing or
truncated shard is reported by name before any weight is loaded. Tensors are
read one at a time (memory-mapped by safetensors), never the whole model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from insightv_jax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _check_file(path: Path) -> list[str]:
    """Validate one safetensors file's header against its size; return its keys."""
    if not path.is_file():
        raise CheckpointError(f"{path}: safetensors file is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors header")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (needs {8 + n + end} bytes, has {size})"
        )
    return [k for k in header if k != "__metadata__"]


class SafetensorsFolder:
    """The tensors of a HF model folder, by key, read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        self.key_to_file: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index}: not a valid safetensors index") from None
            files = {self.folder / name for name in weight_map.values()}
            present = {f: set(_check_file(f)) for f in sorted(files)}
            for key, name in weight_map.items():
                path = self.folder / name
                if key not in present[path]:
                    raise CheckpointError(f"{path}: tensor {key!r} listed in the index is missing")
                self.key_to_file[key] = path
        elif single.is_file():
            self.key_to_file = dict.fromkeys(_check_file(single), single)
        else:
            found = sorted(self.folder.glob("*.safetensors"))
            if not found:
                bins = sorted(p.name for p in self.folder.glob("*.bin"))
                hint = (
                    f" (found {bins[0]}: pickle weights are not loaded; convert to safetensors)"
                    if bins
                    else ""
                )
                raise CheckpointError(f"{self.folder}: no safetensors weights found{hint}")
            for path in found:
                for key in _check_file(path):
                    self.key_to_file[key] = path

    def keys(self) -> list[str]:
        return sorted(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def _path(self, key: str) -> Path:
        if key not in self.key_to_file:
            raise CheckpointError(f"{self.folder}: tensor {key!r} is missing")
        return self.key_to_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self._path(key), framework="np") as f:
            return tuple(f.get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        """One tensor as a numpy array (bf16 via ml_dtypes)."""
        with safe_open(self._path(key), framework="np") as f:
            return f.get_tensor(key)


def write_folder(
    tensors: Iterator[tuple[str, np.ndarray]] | dict[str, np.ndarray],
    folder: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
    """Write tensors as `model.safetensors` or as shards plus an index.

    Tensors are consumed one by one so a large model streams through memory a
    shard at a time. Returns the file names written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    names: list[str] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, np.ndarray] = {}
    size = total = 0
    for key, arr in items:
        arr = np.ascontiguousarray(arr)
        if shard and size + arr.nbytes > max_shard_bytes:
            names.append(f"model-{len(names) + 1:05d}.safetensors")
            save_file(shard, str(folder / names[-1]), metadata={"format": "pt"})
            shard, size = {}, 0
        shard[key] = arr
        weight_map[key] = len(names)
        size += arr.nbytes
        total += arr.nbytes
    if len(names) == 0:
        save_file(shard, str(folder / SINGLE_NAME), metadata={"format": "pt"})
        return [SINGLE_NAME]
    names.append(f"model-{len(names) + 1:05d}.safetensors")
    save_file(shard, str(folder / names[-1]), metadata={"format": "pt"})
    # Rename shards to the hub's "-of-N" convention and write the index.
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    for old, new in zip(names, final):
        (folder / old).rename(folder / new)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: final[i] for k, i in sorted(weight_map.items())},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return final
