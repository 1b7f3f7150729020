"""`insightv dpo`: one DPO run from `train.init` on a pair file (`train_dpo`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import numpy as np

from insightv_jax.checkpoint import aux_dirs
from insightv_jax.config import ConfigError, RunConfig
from insightv_jax.jsonl import append_jsonl, read_jsonl, write_jsonl
from insightv_jax.train.dpo.data import (
    PairData,
    full_params_of,
    usable_records,
)
from insightv_jax.train.dpo.probe import (
    chain_token_logps,
    evaluate_heldout,
    final_epoch_means,
    format_probe,
    policy_logps,
    precompute_ref_logps,
    ref_array,
    round_probe,
)
from insightv_jax.train.dpo.program import DPOProgram, PairBatches, WithRefLogps


def step_budget(train, pairs: int) -> int:
    """Optimizer steps of a DPO run: `train.steps`, else `train.epochs` passes over
    `pairs` pairs. The loader repeats the shuffled pairs before it batches, so a
    last partial batch fills up from the next pass: rounding up leaves no pair out."""
    return train.steps or math.ceil(train.epochs * pairs / train.global_batch)


def _ref_file_matches(path: Path, truncate: bool) -> bool:
    """Whether a reference log-prob file exists and scored its pairs the way this
    run does (from the divergence or whole): otherwise it is recomputed."""
    rows = read_jsonl(path) if path.exists() else []
    return bool(rows) and all(r.get("ref_truncated", False) == truncate for r in rows)


def train_dpo(
    cfg: RunConfig,
    pairs_path: Path,
    root: Path,
    print_fn=print,
    chains: list[dict] | None = None,
) -> dict:
    """One DPO run from `train.init` on a pair file; returns the final metrics.

    With `dpo.ref_logps=precomputed`, pairs without `ref_logps` get them from
    the reference (`dpo.reference`, default `train.init`) once, written to
    `RUN/pairs_ref.jsonl`; a restart reuses that file and the latest checkpoint.
    The run takes `train.steps` steps, else `train.epochs` passes over the usable
    pairs (`step_budget`, printed before training).

    `data.packing`: `train.global_batch` stays the pairs per optimizer step, and
    each step holds exactly the pairs the unpacked run's step holds, packed into
    rows of the largest bucket (`data.pairs.PackedPairLoader`; a pair's two sides
    share a row, so a pair longer than the largest bucket is a bad record). The
    loss stays the mean over the step's pairs (plus `dpo.gamma` times the chosen
    tokens' mean CE), so a packed run's per-step losses equal the unpacked run's;
    the rows a step are derived from the pairs' lengths and printed. Only the
    training step packs: the reference precompute, the probe and the held-out
    pass score pairs in the pair layout.

    After the last update `round_probe` compares the start and the end policy on
    the pairs (the same batches for both) and, given `chains` (conversation
    records whose responses were sampled from the start policy), measures the
    per-token KL between them; written to RUN/probe.json and returned beside the
    means of the last epoch's training steps.
    """
    _check_dpo(cfg)
    cfg, tok, proc = _with_policy_model(cfg, print_fn)
    records = read_jsonl(pairs_path)  # a bad pair file fails before the run dir exists
    run = Path(cfg.train.workdir)
    run.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ConfigError(f"{pairs_path}: no preference pairs")
    data = PairData.for_checkpoint(cfg, cfg.model, tok, root)
    records, chains, total = _usable_pairs(cfg, records, chains, data, pairs_path, print_fn)
    metrics_path = run / "metrics.jsonl"
    # the loader is built after the trainer exists: precomputing needs its program
    trainer = _dpo_trainer(cfg, total, tok, proc, metrics_path, print_fn)
    try:
        program, mesh = trainer.program, trainer.mesh
        records, train_path, ref_params = _reference_logps(
            cfg, program, mesh, records, data, pairs_path, run, print_fn
        )
        need_ref = cfg.dpo.loss != "ref_free"
        ref = ref_array(records) if need_ref else np.zeros((len(records), 2))
        start, start_chains = _start_policy(
            cfg, program, mesh, records, chains, data, ref, ref_params
        )
        if cfg.dpo.ref_logps == "precomputed":
            ref_params = None  # not kept in memory while training
        trainer.batches = _training_batches(
            cfg, train_path, root, data, program, ref_params, total, print_fn
        )
        result = trainer.run()
        held, probe = {}, {}
        if not result.preempted:
            baseline = (start, ref, start_chains)
            probe, held = _end_probe(cfg, program, result.state, records, chains, data, baseline,
                                     mesh, run, print_fn)  # fmt: skip
    finally:
        trainer.close()
    gb = cfg.train.global_batch
    last = final_epoch_means(read_jsonl(metrics_path) if metrics_path.exists() else [],
                             max(math.ceil(len(records) / gb), 1))  # fmt: skip
    last.update({f"heldout_{k}": v for k, v in held.items()})
    state = "preempted at" if result.preempted else "finished"
    print_fn(
        f"{state} step {result.step}/{total}; skipped {result.skipped} non-finite steps; "
        f"run directory {trainer.run_dir}"
    )
    return {"step": result.step, "total": total, "preempted": result.preempted, **last, **probe}


def _check_dpo(cfg: RunConfig) -> None:
    """The settings a DPO run refuses before it reads anything."""
    if not cfg.train.init:
        raise ConfigError("dpo: train.init must name the policy to start from")
    if cfg.data.group_by_length:
        raise ConfigError("dpo: data.group_by_length applies to SFT data, not preference pairs")
    if cfg.dpo.dpop_lambda < 0 or (cfg.dpo.dpop_lambda and cfg.dpo.loss != "sigmoid"):
        raise ConfigError(
            f"dpo.dpop_lambda={cfg.dpo.dpop_lambda} must be >= 0 and needs dpo.loss=sigmoid"
        )


def _with_policy_model(cfg: RunConfig, print_fn) -> tuple[RunConfig, Path, Path | None]:
    """`cfg` with the start policy's model config, and its (tokenizer, processor) dirs."""
    from insightv_jax.train import model_config_for_run

    cfg = dataclasses.replace(cfg, model=model_config_for_run(cfg, print_fn))
    tok, proc = aux_dirs(cfg.train.init)
    if tok is None:
        raise ConfigError(f"{cfg.train.init}: checkpoint has no tokenizer (needed for pairs)")
    return cfg, tok, proc


def _usable_pairs(
    cfg: RunConfig, records, chains, data: PairData, pairs_path: Path, print_fn
) -> tuple[list[dict], list[dict], int]:
    """The usable pairs and chains, and the step budget (printed)."""
    from insightv_jax.data.pairs import FitsPackedRow, PairTransform, check_pair
    from insightv_jax.data.validate import check_record

    bad_rule = cfg.data.on_bad_record
    check = check_pair
    if cfg.data.packing:  # the packed loader's own check: its pairs are the ones counted
        check = FitsPackedRow(PairTransform(data.transform, data.truncate), max(data.buckets))
    records = usable_records(records, check, data, bad_rule, "pair", print_fn)
    # a chain too long for the buckets only leaves the KL estimate, never fails the run
    chains = usable_records(chains or [], check_record, data, "skip", "chain", print_fn)
    gb = cfg.train.global_batch
    if len(records) < gb and not cfg.train.steps:
        raise ConfigError(f"{pairs_path}: {len(records)} usable pairs < train.global_batch={gb}")
    total = step_budget(cfg.train, len(records))
    budget = f"train.steps={cfg.train.steps}" if cfg.train.steps else f"{cfg.train.epochs} epochs"
    print_fn(f"DPO on {len(records)} pairs: {budget} = {total} steps of {gb} pairs")
    return records, chains, total


def _dpo_trainer(cfg: RunConfig, total: int, tok, proc, metrics_path: Path, print_fn):
    """The Trainer of a DPO run (no batches yet), appending each step's metrics to
    `metrics_path`."""
    from insightv_jax.train.trainer import Trainer

    def on_step(step, metrics, local, state):
        if jax.process_index() == 0:
            row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            append_jsonl(metrics_path, row)

    program_cls = functools.partial(DPOProgram, dpo=cfg.dpo)
    return Trainer(
        cfg, iter(()), total_steps=total, tokenizer_dir=tok, processor_dir=proc,
        on_step=on_step, print_fn=print_fn, measure_peak=False, program_cls=program_cls,
    )  # fmt: skip


def _reference_logps(
    cfg: RunConfig, program, mesh, records, data: PairData, pairs_path: Path, run: Path, print_fn
) -> tuple[list[dict], Path, dict | None]:
    """(records with reference log-probs, the pair file to train on, the reference
    parameters when they were loaded). Precomputed log-probs go to RUN/pairs_ref.jsonl
    unless the pair file carries them; on-the-fly runs score the records here (for the
    probe) and keep the reference parameters."""
    d, size = cfg.dpo, cfg.dpo.logprob_batch
    ref_path = d.reference or cfg.train.init
    need_ref = d.loss != "ref_free"
    ref_params = None
    train_path = pairs_path
    # reference log-probs the pair file carries count only if they were scored the
    # same way (truncated at the divergence or not)
    carried = all(
        "ref_logps" in r and bool(r.get("ref_truncated", False)) == data.truncate for r in records
    )
    if need_ref and d.ref_logps == "precomputed" and not carried:
        train_path = run / "pairs_ref.jsonl"
        if not _ref_file_matches(train_path, data.truncate):
            ref_params = full_params_of(ref_path, mesh)
            print_fn(f"reference log-probs for {len(records)} pairs -> {train_path}")
            rows = precompute_ref_logps(program, ref_params, records, data, size)
            write_jsonl(train_path, rows)
        records = read_jsonl(train_path)
    elif need_ref and d.ref_logps == "on_the_fly":
        ref_params = full_params_of(ref_path, mesh)
        records = precompute_ref_logps(program, ref_params, records, data, size)  # the probe's
    return records, train_path, ref_params


def _start_policy(
    cfg: RunConfig, program, mesh, records, chains, data: PairData, ref, ref_params
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """The start policy's summed log-probs on the pairs (the reference's when it is
    the reference) and its per-token log-probs on the sampled chains."""
    size = cfg.dpo.logprob_batch
    need_ref = cfg.dpo.loss != "ref_free"
    ref_is_start = need_ref and (cfg.dpo.reference or cfg.train.init) == cfg.train.init
    start = ref if ref_is_start else None
    start_chains = None
    if start is None or chains:
        params = ref_params if ref_is_start else None
        if params is None:
            params = full_params_of(cfg.train.init, mesh)
        if start is None:
            start = policy_logps(program, params, records, data, size)
        if chains:
            start_chains = chain_token_logps(program, params, chains, data, size)
    return start, start_chains


def _training_batches(cfg: RunConfig, train_path: Path, root: Path, data: PairData, program,
                      ref_params, total: int, print_fn):  # fmt: skip
    """The resumable batches the trainer draws: pair-layout batches of
    `train.global_batch` pairs, or with `data.packing` the same pairs per step
    packed (`data.pairs.PackedPairLoader`, a plan for the run's `total` steps);
    with on-the-fly reference log-probs when `ref_params` is given."""
    from insightv_jax.data.pairs import PackedPairLoader, pair_loader
    from insightv_jax.data.sources import JsonlSource

    source = JsonlSource(train_path, root)
    limits = data.transform.limits(max(data.buckets))
    if cfg.data.packing:
        # rows a step: a multiple of the micro-batches times the batch-sharding ways,
        # so each micro-batch splits evenly over the devices
        ways = program.mesh.shape["data"] * program.mesh.shape["fsdp"]
        loader = PackedPairLoader(
            source, data.transform, pairs_per_step=cfg.train.global_batch, steps=total,
            buckets=data.buckets, seed=cfg.data.shuffle_seed,
            on_bad_record=cfg.data.on_bad_record, limits=limits, pad_id=data.pad_id,
            truncate=data.truncate, row_multiple=cfg.train.micro_batches * ways,
        )  # fmt: skip
        print_fn(
            f"packed: {cfg.train.global_batch} pairs a step in {loader.rows} rows of "
            f"{loader.capacity} tokens, up to {loader.pairs_per_row} pairs a row "
            f"({loader.fill:.0%} of token slots real)"
        )
        batches = loader
    else:
        loader = pair_loader(
            source, data.transform,
            batch_size=cfg.train.global_batch // jax.process_count(),
            buckets=data.buckets, seed=cfg.data.shuffle_seed, num_epochs=None,
            on_bad_record=cfg.data.on_bad_record, limits=limits,
            pad_id=data.pad_id, truncate=data.truncate,
        )  # fmt: skip
        batches = PairBatches(loader)
    if ref_params is not None:
        batches = WithRefLogps(batches, program, ref_params)
    return batches


def _end_probe(
    cfg: RunConfig, program, state, records, chains, data: PairData, baseline, mesh, run: Path,
    print_fn,
) -> tuple[dict, dict]:  # fmt: skip
    """`round_probe` of the trained policy against `baseline` (start log-probs,
    reference log-probs, start chain log-probs), written to RUN/probe.json, and the
    held-out rewards when `dpo.eval_pairs` is set."""
    start, ref, start_chains = baseline
    size = cfg.dpo.logprob_batch
    params = program.full_params(state)
    end = policy_logps(program, params, records, data, size)
    end_chains = chain_token_logps(program, params, chains, data, size) if chains else None
    probe = round_probe(start, end, ref, cfg.dpo, start_chains, end_chains)
    (run / "probe.json").write_text(json.dumps(probe, indent=1) + "\n")
    print_fn(format_probe(probe))
    held = {}
    if cfg.dpo.eval_pairs:
        held = evaluate_heldout(cfg, program, state, data, mesh, print_fn)
    return probe, held


def run_dpo(cfg: RunConfig) -> dict:
    """`insightv dpo`: DPO on `dpo.pairs` (images relative to `data.image_root`
    or the pair file's folder)."""
    from insightv_jax.parallel import initialize_distributed

    initialize_distributed()
    if not cfg.dpo.pairs:
        raise ConfigError("dpo.pairs: no preference-pair file given")
    pairs = Path(cfg.dpo.pairs)
    root = Path(cfg.data.image_root) if cfg.data.image_root else pairs.parent
    return train_dpo(cfg, pairs, root)
