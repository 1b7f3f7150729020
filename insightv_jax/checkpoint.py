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
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from insightv_jax.config import ModelConfig, from_dict, read_yaml, save_yaml, to_dict
from insightv_jax.errors import CheckpointError
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


def restore_params(path: Path, cfg: ModelConfig, mesh: Mesh) -> nnx.Module:
    """Restore an orbax parameter state straight into the shardings of `mesh`."""
    graphdef, abstract = abstract_model(cfg, mesh)
    target = nnx.to_pure_dict(abstract)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path.absolute(), target)
    except Exception as e:  # orbax raises many types; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot restore parameters ({first[:300]})") from None
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def load_model(path: str | Path, mesh: Mesh | None = None):
    """(model, ModelConfig, tokenizer dir or None, processor dir or None) from a
    model directory, run directory or Hugging Face folder."""
    path = Path(path)
    mesh = mesh or single_device_mesh()
    kind = checkpoint_kind(path)
    if kind == "hf":
        from insightv_jax.hf.convert import import_hf

        model, cfg = import_hf(path, mesh)
        tok = (
            path
            if any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))
            else None
        )
        proc = path if (path / "preprocessor_config.json").exists() else None
        return model, cfg, tok, proc
    cfg = read_model_config(path)
    model = restore_params(params_path(path), cfg, mesh)
    tok = path / "tokenizer" if (path / "tokenizer").is_dir() else None
    proc = path / "processor" if (path / "processor").is_dir() else None
    return model, cfg, tok, proc


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


def copy_aux_dirs(dst: Path, tokenizer_dir: Path | None, processor_dir: Path | None) -> None:
    """Copy tokenizer / processor files into `dst/tokenizer` and `dst/processor`."""
    from insightv_jax.hf.files import copy_processor_files, copy_tokenizer_files

    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, dst / "tokenizer")
    if processor_dir is not None:
        copy_processor_files(processor_dir, dst / "processor")


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
    import dataclasses

    from insightv_jax.data.prompts import DEFAULT_PROMPTS, read_prompts

    configured = configured or DEFAULT_PROMPTS
    if configured != DEFAULT_PROMPTS:
        return configured
    from_reason, from_summary = read_prompts(reason), read_prompts(summary)
    out = from_reason or configured
    if from_summary is not None:
        out = dataclasses.replace(out, summary_instruction=from_summary.summary_instruction)
    return out
