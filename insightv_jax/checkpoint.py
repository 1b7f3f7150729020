"""The project's one checkpoint layout, and loading a model from any checkpoint.

Model directory `CKPT/`:
    config.yaml      `model:` section (and whatever run sections produced it)
    tokenizer/       HF tokenizer files, chat template, added tokens
    processor/       image processor config (vision-language models)
    params/          orbax checkpoint of the parameter state
Run directory `RUN/`:
    config.yaml, tokenizer/, processor/   copied in when the run starts
    checkpoints/<step>/model/             loads exactly like `params/`
    checkpoints/<step>/...                optimizer, data-iterator state, metadata
Hugging Face folder: `config.json` + safetensors.

`load_model(path)` accepts all three; for a run directory it takes the latest step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from insightv_jax.config import ModelConfig, from_dict, read_yaml, save_yaml, to_dict
from insightv_jax.data.prompts import DEFAULT_PROMPTS, read_prompts
from insightv_jax.errors import CheckpointError
from insightv_jax.hf.convert import import_hf
from insightv_jax.hf.files import HF_TOKENIZER_MARKERS, copy_aux_dirs
from insightv_jax.models.factory import abstract_model
from insightv_jax.parallel import single_device_mesh


def checkpoint_kind(path: str | Path) -> str:
    """'model_dir', 'run_dir' or 'hf' — or a CheckpointError naming the path."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if (path / "params").is_dir() and (path / "config.yaml").is_file():
        return "model_dir"
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        return "run_dir"
    if (path / "config.json").is_file():
        return "hf"
    raise CheckpointError(
        f"{path}: not a model directory (config.yaml + params/), a run directory "
        "(config.yaml + checkpoints/) or a Hugging Face folder (config.json)"
    )


def latest_step(run_dir: str | Path) -> int:
    """The highest finished step under `RUN/checkpoints/`."""
    steps = [
        int(p.name)
        for p in (Path(run_dir) / "checkpoints").iterdir()
        if p.name.isdigit() and (p / "model").is_dir()
    ]
    if not steps:
        raise CheckpointError(f"{run_dir}: run directory has no finished checkpoint")
    return max(steps)


def read_model_config(path: str | Path) -> ModelConfig:
    """The `model:` section of a model or run directory's config.yaml."""
    data = read_yaml(Path(path) / "config.yaml")
    if "model" not in data:
        raise CheckpointError(f"{Path(path) / 'config.yaml'}: no 'model' section")
    cfg = from_dict(ModelConfig, data["model"], prefix="model")
    cfg.validate()
    return cfg


def params_path(path: str | Path) -> Path:
    """Where the orbax parameter state of a model or run directory lives."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "model_dir":
        return path / "params"
    if kind == "run_dir":
        return path / "checkpoints" / str(latest_step(path)) / "model"
    raise CheckpointError(f"{path}: a Hugging Face folder has no orbax params")


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that does not fit the config (a parameter missing or of
    another shape): the user's config is wrong, the checkpoint is not corrupt."""


# Files of an orbax item that a restore parses as JSON (`_sharding` and
# `_CHECKPOINT_METADATA` are not read by a restore with a target, so not checked:
# a checkpoint that restores is never called corrupt).
_JSON_NAMES = ("_METADATA", "metadata")
_LOCATION = re.compile(r"^(value|btreenode|versionnode):")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def check_orbax_item(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Check that orbax item `path` (a `params/` or a step's `model/`, `train/`,
    `data/`) can be read, without reading its arrays; returns the stored shape of
    every array, by its dotted name (empty when the item holds none).

    Checked: its JSON metadata parses, and every B-tree node and data range its
    OCDBT index refers to lies inside an existing file. A restore that meets a
    truncated file fails in one of many concurrent reads, and orbax closes its
    event loop under the others: pages of asyncio tracebacks follow the one-line
    error. Checking first keeps a corrupt checkpoint to that one line.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory is missing")
    uses_ocdbt = any(path.glob("ocdbt.process_*"))
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.name in _JSON_NAMES or f.name.endswith(".json")):
            meta = _read_json(f)
            if f.name == "_METADATA" and isinstance(meta, dict):
                uses_ocdbt = uses_ocdbt or bool(meta.get("use_ocdbt"))
    if (path / "array_metadatas").is_dir():
        for f in sorted((path / "array_metadatas").iterdir()):
            _read_json(f)
    if not (path / "manifest.ocdbt").is_file():
        if uses_ocdbt:
            raise CheckpointError(f"{path / 'manifest.ocdbt'}: checkpoint index is missing")
        return {}
    return _check_ocdbt(path)


def _read_json(f: Path):
    try:
        return json.loads(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{f}: corrupt checkpoint metadata (not JSON)") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e.strerror or type(e).__name__})") from None


def _location_extent(root: Path, location: str) -> tuple[Path, int] | None:
    """(file, end offset) of an OCDBT location `kind:base_path:relative_path:offset:length`;
    None when it has another form (then only the reads below can tell)."""
    parts = location.split(":")
    if len(parts) != 5 or not (parts[3].isdigit() and parts[4].isdigit()):
        return None
    return root / parts[1] / parts[2], int(parts[3]) + int(parts[4])


def _locations(node):
    """Every node or value location string inside a dumped manifest or B-tree node."""
    if isinstance(node, str):
        if _LOCATION.match(node):
            yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _locations(v)
    elif isinstance(node, list):
        for v in node:
            yield from _locations(v)


def _check_ocdbt(path: Path) -> dict[str, tuple[int, ...]]:
    """Walk an item's OCDBT index (manifest, B-tree nodes) with tensorstore's dump,
    checking each referenced byte range against its file's size; collects array
    shapes from the zarr metadata entries on the way."""
    import tensorstore as ts

    base = ts.KvStore.open({"driver": "file", "path": f"{path.absolute()}/"}).result()

    def dump(location: str | None):
        try:
            return ts.ocdbt.dump(base, location).result()
        except ValueError as e:  # tensorstore's read and decode errors
            extent = _location_extent(path, location) if location else None
            where = extent[0] if extent else path / "manifest.ocdbt"
            raise CheckpointError(f"{where}: corrupt checkpoint index ({_first_line(e)})") from None

    shapes: dict[str, tuple[int, ...]] = {}
    pending, seen = [dump(None)], set()
    while pending:
        node = pending.pop()
        for location in _locations(node):
            if location in seen:
                continue
            seen.add(location)
            extent = _location_extent(path, location)
            if extent is not None:
                f, end = extent
                if not f.is_file():
                    raise CheckpointError(f"{f}: checkpoint data file is missing")
                if f.stat().st_size < end:
                    raise CheckpointError(
                        f"{f}: truncated checkpoint data file ({f.stat().st_size} bytes, "
                        f"its index refers to byte {end})"
                    )
            if not location.startswith("value:"):
                pending.append(dump(location))
        for entry in node.get("entries", []) if isinstance(node, dict) else []:
            key = entry.get("key") if isinstance(entry, dict) else None
            if not isinstance(key, bytes):  # a version node's entry: no arrays in it
                continue
            name, _, leaf = key.decode("utf-8", "replace").rpartition("/")
            if leaf in (".zarray", "zarr.json"):  # zarr 2 / zarr 3 array metadata
                raw = entry.get("inline_value")
                if raw is None and isinstance(entry.get("indirect_value"), str):
                    raw = dump(entry["indirect_value"])
                try:
                    shapes[name] = tuple(json.loads(raw)["shape"])
                except (TypeError, ValueError, KeyError):
                    raise CheckpointError(f"{path}: corrupt array metadata of {name!r}") from None
    return shapes


def check_fits(path: str | Path, shapes: dict[str, tuple[int, ...]], target) -> None:
    """A CheckpointMismatch naming the first array of `target` (a pytree of
    ShapeDtypeStructs) that is absent from `shapes` (from `check_orbax_item`) or
    stored with another shape: orbax would refuse it, less legibly."""
    if not shapes:  # not an OCDBT item: nothing to compare against
        return
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in key_path)  # fmt: skip
        if name not in shapes:
            raise CheckpointMismatch(f"{path}: parameter {name} of the config is not stored")
        if tuple(leaf.shape) != shapes[name]:
            raise CheckpointMismatch(
                f"{path}: parameter {name} is stored with shape {shapes[name]}, the config "
                f"expects {tuple(leaf.shape)}"
            )


def restore_params(path: Path, cfg: ModelConfig, mesh: Mesh) -> nnx.Module:
    """Restore an orbax parameter state straight into the shardings of `mesh`."""
    graphdef, abstract = abstract_model(cfg, mesh)
    target = nnx.to_pure_dict(abstract)
    check_fits(path, check_orbax_item(path), target)  # a broken one fails here, quietly
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path.absolute(), target)
    except (ValueError, OSError, KeyError) as e:  # orbax's and tensorstore's read errors
        raise CheckpointError(f"{path}: cannot restore parameters ({_first_line(e)})") from None
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def aux_dirs(path: str | Path) -> tuple[Path | None, Path | None]:
    """(tokenizer dir, processor dir) of a model dir, run dir or Hugging Face
    folder; None where the checkpoint has none. A Hugging Face folder keeps both
    at its top level, our directories in `tokenizer/` and `processor/`."""
    path = Path(path)
    if checkpoint_kind(path) == "hf":
        tok = path if any((path / n).is_file() for n in HF_TOKENIZER_MARKERS) else None
        return tok, path if (path / "preprocessor_config.json").is_file() else None
    tok = path / "tokenizer" if (path / "tokenizer").is_dir() else None
    return tok, path / "processor" if (path / "processor").is_dir() else None


def load_model(path: str | Path, mesh: Mesh | None = None):
    """(model, ModelConfig, tokenizer dir or None, processor dir or None) from a
    model directory, run directory or Hugging Face folder."""
    path = Path(path)
    mesh = mesh or single_device_mesh()
    if checkpoint_kind(path) == "hf":
        model, cfg = import_hf(path, mesh)
    else:
        cfg = read_model_config(path)
        model = restore_params(params_path(path), cfg, mesh)
    return (model, cfg, *aux_dirs(path))


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling of `out`; rename it to `out` only on success.

    A failure leaves nothing at `out`. An existing non-empty `out` is an error
    unless `overwrite`.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: output already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def save_model_dir(
    model: nnx.Module,
    cfg: ModelConfig,
    out: str | Path,
    tokenizer_dir: Path | None = None,
    processor_dir: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model directory (config.yaml, tokenizer/, processor/, params/)."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_yaml({"model": to_dict(cfg)}, tmp / "config.yaml")
        copy_aux_dirs(tmp, tokenizer_dir, processor_dir)
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), state)
            ckptr.wait_until_finished()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("save_model_dir")
    return out


# ------------------------------------------------------------------ prompts


def agent_prompts(configured, reason: str | Path | None = None, summary: str | Path | None = None):
    """The prompts two agents run with: a config whose prompts differ from the
    defaults wins (an explicit override); otherwise the reasoning wording comes from
    the reasoning agent's checkpoint and the summary wording from the summary
    agent's (their `prompts.json`), each falling back to `configured` where a
    checkpoint carries none."""
    configured = configured or DEFAULT_PROMPTS
    if configured != DEFAULT_PROMPTS:
        return configured
    from_reason, from_summary = read_prompts(reason), read_prompts(summary)
    out = from_reason or configured
    if from_summary is not None:
        out = dataclasses.replace(out, summary_instruction=from_summary.summary_instruction)
    return out
