"""The SFT loop: initialise or resume, step, log, checkpoint, stop cleanly.

Run directory (checkpoint.py's layout):
    RUN/config.yaml, RUN/tokenizer/, RUN/processor/   written when the run starts
    RUN/checkpoints/<step>/model/   all parameters (loads like a model dir's params/)
    RUN/checkpoints/<step>/train/   optimizer state, step, skipped-step count and, with
                                    train.master_weights, the fp32 master copy
    RUN/checkpoints/<step>/data/    the data iterator's state (one file per process)
    RUN/checkpoints/<step>/meta/    step, skipped, total steps, the run config
    RUN/tb/                         TensorBoard event files

Checkpoints are orbax CheckpointManager saves (async, keep-N, written to a
temporary directory and renamed when complete). A run resumes from its latest
checkpoint by default; a checkpoint that fails to restore is reported, moved
aside (`<step>.corrupt`) and the previous one is used. SIGTERM (TPU
preemption) finishes the current step, writes a checkpoint and returns.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from insightv_jax.checkpoint import CheckpointMismatch, check_fits, check_orbax_item, load_model
from insightv_jax.config import ModelConfig, RunConfig, save_yaml, to_dict
from insightv_jax.data.prompts import DEFAULT_PROMPTS, read_prompts, write_prompts
from insightv_jax.errors import CheckpointError
from insightv_jax.hf.files import copy_aux_dirs
from insightv_jax.models.factory import construct, init_model
from insightv_jax.parallel import make_mesh, state_shardings
from insightv_jax.train.metrics import MetricsLogger, measure_matmul_peak, step_flops
from insightv_jax.train.optim import split_trainable
from insightv_jax.train.steps import SFTProgram


def _grain_iterator(it) -> bool:
    """Whether `it` is a grain dataset iterator. grain is looked up, not imported:
    an iterator grain made means grain is loaded, and a model-only install has
    no grain to import."""
    grain = sys.modules.get("grain")
    return grain is not None and isinstance(it, grain.DatasetIterator)


def effective_model_config(cfg: RunConfig) -> ModelConfig:
    """The model config with the train section's remat override applied."""
    model = cfg.model
    if cfg.train.remat is not None and hasattr(model, "decoder"):
        decoder = dataclasses.replace(model.decoder, remat=cfg.train.remat)
        model = dataclasses.replace(model, decoder=decoder)
    return model


def build_program(
    model_cfg: ModelConfig, cfg: RunConfig, mesh: Mesh, total_steps: int, program_cls=SFTProgram
):
    """An SFTProgram (or `program_cls`, e.g. DPO's, called with the same
    arguments) for `model_cfg` on `mesh` from abstract parameters (no memory)."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: construct(model_cfg, cfg.seed))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = state_shardings(params, mesh)
    abstract_params = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(params),
        nnx.to_pure_dict(shardings),
    )
    rest = nnx.to_pure_dict(rest)
    return program_cls(graphdef, rest, abstract_params, cfg.train, mesh, total_steps)


def global_batch(local: dict, program: SFTProgram) -> dict:
    """This process's rows -> global jax arrays sharded along the batch axis."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        sharding = program.batch_shardings({key: jax.ShapeDtypeStruct(shape, value.dtype)})[key]
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


# What a step's `train/` item holds of the train state ("master" only when there is one).
TRAIN_ITEM = ("opt", "master", "step", "skipped")


def check_master(path: Path, stored: dict, master: dict | None) -> None:
    """A CheckpointMismatch when the `train/` item at `path` (its array shapes,
    from `check_orbax_item`) was written with an fp32 master copy and the run has
    none, or the other way round: the config changed, the checkpoint is intact."""
    has = any(name.startswith("master.") for name in stored)
    if stored and has != bool(master):
        want = "on" if master else "off"
        raise CheckpointMismatch(
            f"{path}: written with train.master_weights {'on' if has else 'off'}, this run has "
            f"it {want} (resume with the setting it was written with)"
        )
    if master:
        check_fits(path, stored, {"master": master})


@dataclasses.dataclass
class TrainResult:
    losses: list[float]  # per step run in this call (NaN for skipped steps)
    start_step: int  # the step this call began at (0, or the resumed checkpoint)
    step: int  # the step reached
    skipped: int  # non-finite steps skipped over the whole run
    preempted: bool
    state: dict
    program: SFTProgram


def training_prompts(cfg: RunConfig):
    """The wording the run trains with: the prompts its data was built with (the
    `prompts.json` that `insightv build` writes beside the sets), else the config's
    when it sets any, else those of the checkpoint it starts from."""
    if cfg.train.data:
        built = read_prompts(Path(cfg.train.data).parent)
        if built is not None:
            return built
    if cfg.pipeline.prompts == DEFAULT_PROMPTS and cfg.train.init:
        started = read_prompts(cfg.train.init)  # e.g. DPO from an agent: its wording
        if started is not None:
            return started
    return cfg.pipeline.prompts


class Trainer:
    """SFT of one model on one mesh over an iterator of (process-local) batch dicts.

    The iterator may have `get_state()`/`set_state()` (grain iterators do); its
    state is then checkpointed and restored. `init_params` (a full parameter
    pure dict) or `cfg.train.init` seed a fresh run; otherwise the model is
    randomly initialised from `cfg.model`.
    """

    def __init__(
        self,
        cfg: RunConfig,
        batches: Iterator[dict],
        *,
        mesh: Mesh | None = None,
        total_steps: int | None = None,
        init_params: dict | None = None,
        tokenizer_dir: Path | None = None,
        processor_dir: Path | None = None,
        on_step: Callable[[int, dict, dict, dict], None] | None = None,
        print_fn: Callable[[str], None] = print,
        measure_peak: bool = True,
        program_cls=SFTProgram,
    ):
        self.cfg, self.batches = cfg, batches
        self.mesh = mesh or make_mesh(cfg.mesh)
        self.total_steps = total_steps or cfg.train.steps
        if self.total_steps <= 0:
            raise CheckpointError("train: the number of steps is unknown (set train.steps)")
        self.run_dir = Path(cfg.train.workdir).absolute()
        self.model_cfg = effective_model_config(cfg)
        self.program = build_program(self.model_cfg, cfg, self.mesh, self.total_steps, program_cls)
        self.init_params, self.on_step, self.print = init_params, on_step, print_fn
        self.tokenizer_dir, self.processor_dir = tokenizer_dir, processor_dir
        self.measure_peak = measure_peak
        self._stop = False
        self._prepare_run_dir()
        self.manager = self._new_manager()

    # ------------------------------------------------------------ run dir

    def _prepare_run_dir(self) -> None:
        if jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg = dataclasses.replace(self.cfg, model=self.model_cfg)
            save_yaml(cfg, self.run_dir / "config.yaml")
            write_prompts(self.run_dir, training_prompts(self.cfg))

            for sub, src in (("tokenizer", self.tokenizer_dir), ("processor", self.processor_dir)):
                if src is not None and not (self.run_dir / sub).exists():
                    copy_aux_dirs(
                        self.run_dir, *((src, None) if sub == "tokenizer" else (None, src))
                    )
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    def _new_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, self.cfg.train.keep), enable_async_checkpointing=True, create=True
        )
        return ocp.CheckpointManager(self.run_dir / "checkpoints", options=options)

    # ------------------------------------------------------------ checkpoints

    def _data_args(self, restore: bool, step: int | None = None):
        it = self.batches
        if restore and not (self.run_dir / "checkpoints" / str(step) / "data").is_dir():
            return {}
        if _grain_iterator(it):
            import grain

            cls = grain.checkpoint.CheckpointRestore if restore else grain.checkpoint.CheckpointSave
            return {"data": cls(it)}
        if hasattr(it, "get_state") and hasattr(it, "set_state") and jax.process_count() == 1:
            return {
                "data": ocp.args.JsonRestore() if restore else ocp.args.JsonSave(it.get_state())
            }
        return {}

    def save(self, state: dict, force: bool = False) -> None:
        """Queue an async checkpoint of `state` (returns before the write finishes)."""
        step = int(state["step"])
        meta = {
            "step": step,
            "skipped": int(state["skipped"]),
            "total_steps": self.total_steps,
            "config": to_dict(self.cfg),
        }
        train = {k: state[k] for k in TRAIN_ITEM if k in state}
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(SFTProgram.full_params(state)),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
            **self._data_args(restore=False),
        )
        self.manager.save(step, args=args, force=force)

    def _restore_step(self, step: int) -> dict:
        a = self.program.abstract_state
        model = SFTProgram.full_params(a)
        train = {k: a[k] for k in TRAIN_ITEM if k in a}
        # Every item is checked before orbax reads any: a truncated file then costs one
        # warning line, not a restore that fails amid its own background reads.
        step_dir = self.run_dir / "checkpoints" / str(step)
        check_fits(step_dir / "model", check_orbax_item(step_dir / "model"), model)
        stored = check_orbax_item(step_dir / "train")
        check_master(step_dir / "train", stored, train.get("master"))
        if (step_dir / "data").is_dir():
            check_orbax_item(step_dir / "data")
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(model),
            train=ocp.args.StandardRestore(train),
            **self._data_args(restore=True, step=step),
        )
        restored = self.manager.restore(step, args=args)
        if "data" in restored and not _grain_iterator(self.batches):
            self.batches.set_state(restored["data"])
        params, frozen = split_trainable(restored["model"], self.cfg.train.trainable)
        return {"params": params, "frozen": frozen, **restored["train"]}

    def restore_latest(self) -> dict | None:
        """The newest checkpoint that restores; corrupt ones are moved aside
        (`<step>.corrupt`) and reported in one warning line each, naming the step
        resumed from instead. A checkpoint that does not fit the config is the
        config's fault: an error, and nothing is moved."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        corrupt: list[tuple[int, str]] = []
        for step in steps:
            try:
                state = self._restore_step(step)
            except CheckpointMismatch:  # moving it aside would lose a good checkpoint
                raise
            except (CheckpointError, ValueError, OSError, KeyError) as e:  # orbax's read errors
                corrupt.append((step, (str(e).strip().splitlines() or [type(e).__name__])[0]))
                self._quarantine(step)
                continue
            where = self.run_dir / "checkpoints"
            for bad, why in corrupt:
                self.print(
                    f"warning: checkpoint step {bad} does not restore ({why[:300]}); moved to "
                    f"{where / f'{bad}.corrupt'}, resuming from step {step}"
                )
            if not corrupt:
                self.print(f"resumed from {where / str(step)}")
            return state
        if steps:
            step, why = corrupt[0]
            raise CheckpointError(
                f"{self.run_dir}: no checkpoint restores (steps {steps} moved to <step>.corrupt; "
                f"step {step}: {why[:300]})"
            )
        return None

    def _quarantine(self, step: int) -> None:
        self.manager.close()
        src = self.run_dir / "checkpoints" / str(step)
        if jax.process_index() == 0 and src.exists():
            dst = src.with_name(f"{step}.corrupt")
            if dst.exists():
                shutil.rmtree(dst)
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.manager = self._new_manager()

    # ------------------------------------------------------------ the loop

    def initial_state(self) -> dict:
        if self.cfg.train.resume:
            state = self.restore_latest()
            if state is not None:
                return state
        params = self.init_params
        if params is None and self.cfg.train.init:
            model = load_model(self.cfg.train.init, self.mesh)[0]
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        if params is None:
            model = init_model(self.model_cfg, self.mesh, self.cfg.seed)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return self.program.init_state(params)

    def _on_sigterm(self, signum, frame) -> None:
        self.print("SIGTERM: finishing this step, writing a checkpoint, exiting")
        self._stop = True

    def _should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self._stop
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self._stop], np.int32))
        return bool(np.any(flags))

    def run(self) -> TrainResult:
        """Train from the current state to `total_steps` (or until SIGTERM)."""
        state = self.initial_state()
        start = int(state["step"])
        tcfg = self.cfg.train
        logger = None
        handler_set = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if handler_set else None
        losses: list[Any] = []
        step = start
        try:
            while step < self.total_steps:
                local = next(self.batches)
                batch = global_batch(local, self.program)
                state, metrics = self.program(state, batch)
                step += 1
                losses.append(metrics["loss"])
                if logger is None:
                    logger = self._logger()
                tokens = int(np.prod(batch["input_ids"].shape))
                flops = 0.0
                # this host's batch times the hosts: their shapes are equal, and a
                # Qwen-VL tower's attention spans are taken from this host's images
                if logger.peak:
                    flops = jax.process_count() * step_flops(
                        self.model_cfg, local, self.cfg.train.trainable
                    )
                if self.on_step is not None:
                    self.on_step(step, metrics, local, state)
                lr, skipped = 0.0, 0
                if step % max(1, tcfg.log_every) == 0 or step == self.total_steps:
                    skipped = int(state["skipped"])
                    lr = self.program.lr_at(step - skipped)
                logger.log(step, metrics, tokens, lr, skipped, flops)
                if step == start + 1:
                    jax.block_until_ready(metrics)
                    logger.reset_clock()  # the first step includes compilation
                stop = self._should_stop()
                every = tcfg.checkpoint_every
                if stop or step == self.total_steps or (every > 0 and step % every == 0):
                    self.save(state, force=stop or step == self.total_steps)
                if stop:
                    break
            self.manager.wait_until_finished()
        finally:
            if handler_set:
                signal.signal(signal.SIGTERM, old)
            if logger is not None:
                logger.close()
        return TrainResult(
            losses=[float(x) for x in losses],
            start_step=start,
            step=step,
            skipped=int(state["skipped"]),
            preempted=self._stop and step < self.total_steps,
            state=state,
            program=self.program,
        )

    def _logger(self) -> MetricsLogger:
        peak = 0.0
        if self.measure_peak:
            peak = measure_matmul_peak(self.model_cfg.decoder.dtype, mesh=self.mesh)
        return MetricsLogger(
            self.total_steps,
            self.cfg.train.log_every,
            self.run_dir / "tb",
            peak_flops=peak,
            print_fn=self.print,
            jsonl_path=self.run_dir / "metrics.jsonl",
        )

    def close(self) -> None:
        self.manager.close()
