"""Reading and writing Hugging Face safetensors folders (single file or sharded).

Reading validates every file's header and size up front, so a missing or
truncated shard is reported by name before any weight is loaded. Tensors are
read one at a time (memory-mapped by safetensors), never the whole model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from insightv_jax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
# The floating dtypes a weight may have (numpy reads them; bf16 via ml_dtypes).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(key: str, entry) -> tuple[int, int, str, tuple[int, ...]]:
    """One header entry's (begin, end, dtype, shape); a ValueError says what is wrong."""
    where = f"tensor {key!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise ValueError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a [begin, end] byte range")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise ValueError(
            f"{where}: shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets "
            f"{offsets} hold {offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1], dtype, tuple(shape)


def _check_header(header, data_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check a parsed header against the data that follows it, by the format's own
    rules (tensors tile the data exactly, each range fits its shape and dtype);
    returns {key: (dtype, shape)}. Raises ValueError with a one-line reason."""
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise ValueError("__metadata__ is not a mapping of strings")
    spans, kinds = [], {}
    for key, entry in header.items():
        if key != "__metadata__":
            begin, end, *kinds[key] = _check_entry(key, entry)
            spans.append((begin, end, key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise ValueError(
                f"tensor {key!r}: data_offsets begin at {begin}, where the previous tensor ends "
                f"at {end} (overlapping or gapped byte ranges)"
            )
        end = stop
    if end > data_bytes:
        raise ValueError(
            f"truncated safetensors file (tensors need {end} data bytes, has {data_bytes})"
        )
    if end < data_bytes:
        raise ValueError(f"{data_bytes - end} bytes after the last tensor (corrupt header?)")
    return {key: (dtype, shape) for key, (dtype, shape) in kinds.items()}


def _check_file(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate one safetensors file's header against its size; return {key: (dtype, shape)}.

    Everything safetensors itself would reject is reported here, by file and
    tensor, instead of as a SafetensorError traceback at the first read."""
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
                raise CheckpointError(
                    f"{path}: truncated safetensors header (header length {n} exceeds the "
                    f"file's {size - 8} bytes after it)"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        kinds = _check_header(header, size - 8 - n)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    with _open(path):
        pass  # the library's own checks too, should they go beyond the ones above
    return kinds


def _open(path: Path):
    """safe_open, with the library's own rejection as a one-line CheckpointError."""
    try:
        return safe_open(path, framework="np")
    except SafetensorError as e:
        first = (str(e).strip().splitlines() or ["SafetensorError"])[0]
        raise CheckpointError(f"{path}: not a valid safetensors file ({first[:200]})") from None


class SafetensorsFolder:
    """The tensors of a HF model folder, by key, read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        self.key_to_file: dict[str, Path] = {}
        self.kinds: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (dtype, shape)
        if index.is_file():
            weight_map = _read_index(index)
            files = {self.folder / name for name in weight_map.values()}
            present = {f: _check_file(f) for f in sorted(files)}
            for key, name in weight_map.items():
                path = self.folder / name
                if key not in present[path]:
                    raise CheckpointError(f"{path}: tensor {key!r} listed in the index is missing")
                self.key_to_file[key] = path
                self.kinds[key] = present[path][key]
        elif single.is_file():
            self.kinds = _check_file(single)
            self.key_to_file = dict.fromkeys(self.kinds, single)
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
                for key, kind in _check_file(path).items():
                    self.key_to_file[key] = path
                    self.kinds[key] = kind

    def keys(self) -> list[str]:
        return sorted(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def _path(self, key: str) -> Path:
        if key not in self.key_to_file:
            raise CheckpointError(f"{self.folder}: tensor {key!r} is missing")
        return self.key_to_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from its (validated) header entry."""
        self._path(key)
        return self.kinds[key][1]

    def read(self, key: str) -> np.ndarray:
        """One floating-point tensor as a numpy array (bf16 via ml_dtypes)."""
        path = self._path(key)
        dtype = self.kinds[key][0]
        if dtype not in FLOAT_DTYPES:  # numpy has no fp8/fp4; integers are not weights
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {dtype} "
                f"(weights must be one of {', '.join(FLOAT_DTYPES)})"
            )
        with _open(path) as f:
            return f.get_tensor(key)


def _read_index(index: Path) -> dict[str, str]:
    """The weight map of a sharded folder's index: tensor key -> shard file name."""
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid safetensors index") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
    ):  # a shard is a file name in the folder, never a path out of it
        raise CheckpointError(f"{index}: weight_map must map tensor keys to shard file names")
    return weight_map


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
