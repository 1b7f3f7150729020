"""DPO of the reasoning agent (METHOD.md §5): the sharded step, the log-prob
pass, reference log-probs, and `insightv dpo`.

A DPO batch is a dict of arrays in pair layout: `input_ids`, `attention_mask`,
`labels` (B, 2, T) and optional `pixel_values` (B, 2, I, tiles, 3, H, W) /
`image_sizes` (B, 2, I, 2) — index 0 the chosen side, 1 the rejected side —
plus `ref_logps` (B, 2) summed reference log-probs. Keeping a pair's two
sequences on one row keeps them on one device and in one micro-batch; inside
the step the batch is reshaped to (2B, T) and run through ONE forward.

Reference log-probs are precomputed once by `precompute_ref_logps` (the
log-prob pass of the reference model, written into the pair records), so no
second model sits in memory while training; `dpo.ref_logps=on_the_fly` keeps
the reference parameters and runs the same pass before every step instead.

`train_dpo` also probes the run: the preference loss on its own pairs before
the first and after the last update (same batches), the end reward accuracy and
margin, how far the chosen and rejected log-probs moved, and, given chains
sampled from the start policy, the per-token KL of the trained policy from it
(`round_probe`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from insightv_jax.config import ConfigError, DPOConfig, RunConfig
from insightv_jax.errors import DataError
from insightv_jax.jsonl import append_jsonl, read_jsonl, write_jsonl
from insightv_jax.train.losses import (
    IGNORE,
    chunked_sequence_nll,
    chunked_token_nll,
    dpo_pair_losses,
    shift_labels,
)
from insightv_jax.train.optim import merge
from insightv_jax.train.steps import BATCH_KEYS, SFTProgram


def pair_batch(batch: dict) -> dict:
    """A `data.pairs.pair_loader` batch -> the pair layout (numpy)."""
    out = {
        k: np.stack([np.asarray(batch["chosen"][k]), np.asarray(batch["rejected"][k])], axis=1)
        for k in BATCH_KEYS
        if k in batch["chosen"]
    }
    if "ref_logps" in batch:
        out["ref_logps"] = np.asarray(batch["ref_logps"], np.float32)
    return out


def _rows(x: jax.Array) -> jax.Array:
    """(B, 2, ...) -> (2B, ...): pair i becomes rows 2i (chosen), 2i+1 (rejected)."""
    return x.reshape((-1,) + x.shape[2:])


class DPOProgram(SFTProgram):
    """The DPO step and the log-prob pass of one model on one mesh (see SFTProgram)."""

    def __init__(self, *args, dpo: DPOConfig | None = None, **kw):
        super().__init__(*args, **kw)
        self.dpo = dpo or DPOConfig()
        self._passes: dict = {}

    def _sequence_nll(self, model, mb: dict) -> tuple[jax.Array, jax.Array]:
        """(summed NLL, label tokens) per side, both (B, 2): one forward of 2B rows."""
        rows = {k: _rows(mb[k]) for k in BATCH_KEYS if k in mb}
        hidden = self._hidden(model, rows)
        nll, count = chunked_sequence_nll(
            hidden, shift_labels(rows["labels"]), model.logits, self.cfg.loss_chunk
        )
        return nll.reshape(-1, 2), count.reshape(-1, 2)

    # ----------------------------------------------------------- the step

    def _totals(self, batch: dict) -> dict:
        valid = (shift_labels(batch["labels"]) != IGNORE).astype(jnp.float32)
        return {
            "pairs": jnp.asarray(batch["labels"].shape[0], jnp.float32),
            "chosen_tokens": jnp.sum(valid[:, 0]),
            "tokens": jnp.sum(valid),
        }

    def _micro_loss(self, trainable, frozen, mb, totals):
        d = self.dpo
        nll, _ = self._sequence_nll(self._model(trainable, frozen), mb)
        logps = -nll
        ref = mb.get("ref_logps")
        if ref is None:
            if d.loss != "ref_free":
                raise ConfigError("dpo: the batch has no ref_logps (precompute them first)")
            ref = jnp.zeros_like(logps)
        per_pair, rw_c, rw_r = dpo_pair_losses(
            logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1],
            beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing,
            dpop_lambda=d.dpop_lambda,
        )  # fmt: skip
        chosen_nll = jnp.sum(nll[:, 0])
        share = jnp.sum(per_pair) / totals["pairs"]
        share += d.gamma * chosen_nll / jnp.maximum(totals["chosen_tokens"], 1.0)
        sums = {
            "pref": jnp.sum(per_pair),
            "chosen_nll": chosen_nll,
            "correct": jnp.sum((rw_c > rw_r).astype(jnp.float32)),
            "margin": jnp.sum(rw_c - rw_r),
            "logp_chosen": jnp.sum(logps[:, 0]),
            "logp_rejected": jnp.sum(logps[:, 1]),
            "kl": jnp.sum(ref.astype(jnp.float32) - logps),
        }
        return share, sums

    def _metrics(self, sums: dict, totals: dict) -> dict:
        n = totals["pairs"]
        ce = sums["chosen_nll"] / jnp.maximum(totals["chosen_tokens"], 1.0)
        return {
            "loss": sums["pref"] / n + self.dpo.gamma * ce,
            "pref_loss": sums["pref"] / n,
            "chosen_ce": ce,
            "reward_accuracy": sums["correct"] / n,
            "reward_margin": sums["margin"] / n,
            "logp_chosen": sums["logp_chosen"] / n,
            "logp_rejected": sums["logp_rejected"] / n,
            # mean over sequences of log π_ref − log π on the pairs (off-policy KL proxy)
            "kl_proxy": sums["kl"] / (2 * n),
            "tokens": totals["tokens"],
        }

    # ----------------------------------------------------- the log-prob passes

    def _logprob_pass(self, params: dict, batch: dict) -> dict:
        model = nnx.merge(self.graphdef, params, self.rest)
        nll, count = self._sequence_nll(model, batch)
        return {"sum": -nll, "mean": -nll / jnp.maximum(count, 1.0), "tokens": count}

    def _token_pass(self, params: dict, batch: dict) -> dict:
        model = nnx.merge(self.graphdef, params, self.rest)
        rows = {k: _rows(batch[k]) for k in BATCH_KEYS if k in batch}
        targets = shift_labels(rows["labels"])
        nll = chunked_token_nll(
            self._hidden(model, rows), targets, model.logits, self.cfg.loss_chunk
        )
        shape = batch["labels"].shape
        return {"logp": (-nll).reshape(shape), "scored": (targets != IGNORE).reshape(shape)}

    def _pass_fn(self, name: str, fn: Callable, batch: dict):
        """`fn` jitted for this batch's shapes (compiled once per shape)."""
        key = (name, tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())))
        if key not in self._passes:
            p_sh = merge(self.shardings["params"], self.shardings["frozen"])
            self._passes[key] = jax.jit(
                fn,
                in_shardings=(p_sh, self.batch_shardings(batch)),
                out_shardings=NamedSharding(self.mesh, PartitionSpec()),
            )
        return self._passes[key]

    def logprob_fn(self, batch: dict):
        """The jitted log-prob pass for this batch's shapes: (full params, batch) ->
        {sum, mean, tokens} over response tokens, each (B, 2)."""
        return self._pass_fn("sums", self._logprob_pass, batch)

    def _run_pass(self, name: str, fn: Callable, params: dict, batch: dict) -> dict:
        batch = {k: np.asarray(v) for k, v in batch.items() if k in BATCH_KEYS}
        shardings = self.batch_shardings(batch)
        arrays = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            out = self._pass_fn(name, fn, batch)(params, arrays)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    def logprobs(self, params: dict, batch: dict) -> dict:
        """Summed and token-mean response log-probs of a pair batch (numpy, (B, 2))."""
        return self._run_pass("sums", self._logprob_pass, params, batch)

    def token_logprobs(self, params: dict, batch: dict) -> dict:
        """Per-token log-probs of a pair batch (numpy): `logp` (B, 2, T), where
        position t scores token t + 1, and `scored` (B, 2, T), the label positions."""
        return self._run_pass("tokens", self._token_pass, params, batch)


class WithRefLogps:
    """Batches with `ref_logps` from the reference parameters (on-the-fly mode)."""

    def __init__(self, batches: Iterator[dict], program: DPOProgram, ref_params: dict):
        self.batches, self.program, self.ref = batches, program, ref_params

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        batch["ref_logps"] = self.program.logprobs(self.ref, batch)["sum"]
        return batch

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)


class PairBatches:
    """A pair loader as an iterator of pair-layout batches (resumable)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return pair_batch(next(self.loader))

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state) -> None:
        self.loader.set_state(state)


# ------------------------------------------------------------ pair data


@dataclasses.dataclass
class PairData:
    """What turns pair records into batches: transform, buckets, pad id, image root,
    and whether pairs are scored from where they diverge (`dpo.truncate_at_divergence`)."""

    transform: object  # record -> example (data.transforms.ChatTransform)
    buckets: tuple[int, ...]
    pad_id: int
    root: Path
    truncate: bool = False

    @classmethod
    def for_checkpoint(cls, cfg: RunConfig, model_cfg, tokenizer_dir: Path, root: Path):
        from insightv_jax.data.conversation import load_tokenizer
        from insightv_jax.data.transforms import ChatTransform
        from insightv_jax.sample.prompting import detect_template

        tok = load_tokenizer(tokenizer_dir)
        template = detect_template(tok)
        if template is None:
            raise ConfigError(f"{tokenizer_dir}: no known chat template (llama3/chatml/minimal)")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        transform = ChatTransform(tokenizer_dir, template, model_cfg, root)
        return cls(
            transform, tuple(cfg.data.buckets), int(pad), Path(root),
            truncate=cfg.dpo.truncate_at_divergence,
        )  # fmt: skip

    def batches(self, records: list[dict], size: int) -> Iterator[tuple[int, dict]]:
        """(number of real pairs, pair-layout batch) over `records` in order; the
        last batch is padded with copies of its last pair to `size` rows."""
        from insightv_jax.data.pairs import PairTransform

        tf = PairTransform(self.transform, self.truncate)
        for i in range(0, len(records), size):
            chunk = records[i : i + size]
            yield len(chunk), self._collate([tf(r) for r in chunk], size, chunk)

    def sequence_batches(self, convs: list[dict], size: int) -> Iterator[tuple[int, dict]]:
        """(number of real sequences, pair-layout batch) over single conversation
        records (LLaVA `conversations`, response = the last turn) in order, two
        per row: sequences 2i and 2i + 1 of a batch sit on row i's two sides, so
        the pair passes score them. Up to `2 * size` sequences a batch."""
        for i in range(0, len(convs), 2 * size):
            chunk = convs[i : i + 2 * size]
            seqs = [self.transform(c) for c in chunk]
            seqs += seqs[-1:] * (len(seqs) % 2)  # an odd last sequence gets a partner
            rows = [
                {"chosen": a, "rejected": b, "scores": np.zeros(2, np.float32)}
                for a, b in zip(seqs[::2], seqs[1::2])
            ]
            yield len(chunk), self._collate(rows, size, chunk)

    def _collate(self, examples: list[dict], size: int, records: list[dict]) -> dict:
        """Pair examples -> a pair-layout batch of `size` rows (last row repeated)."""
        from insightv_jax.data.pairs import PairCollate

        examples = examples + [examples[-1]] * (size - len(examples))
        try:
            batch = PairCollate(self.buckets, self.pad_id)(examples)
        except DataError as e:
            ids = ", ".join(str(r.get("id")) for r in records)
            raise DataError(f"records {ids}: {e} (raise data.buckets)") from None
        return pair_batch(batch)


def policy_logps(
    program: DPOProgram, params: dict, records: list[dict], data: PairData, size: int
) -> np.ndarray:
    """Summed response log-probs (chosen, rejected) of every pair under `params`:
    (len(records), 2) float64, in record order, batches of `size` pairs."""
    out = [program.logprobs(params, batch)["sum"][:n] for n, batch in data.batches(records, size)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 2))


def precompute_ref_logps(
    program: DPOProgram, ref_params: dict, records: list[dict], data: PairData, size: int
) -> list[dict]:
    """The records with `ref_logps` {chosen, rejected} from the reference's log-prob
    pass, and `ref_truncated`: whether they score from the divergence (`data.truncate`)."""
    sums = policy_logps(program, ref_params, records, data, size)
    return [
        {**rec, "ref_logps": {"chosen": c, "rejected": r}, "ref_truncated": data.truncate}
        for rec, (c, r) in zip(records, sums.tolist())
    ]


def ref_array(records: list[dict]) -> np.ndarray:
    """The records' `ref_logps` as (len(records), 2) (chosen, rejected)."""
    return np.asarray(
        [[r["ref_logps"]["chosen"], r["ref_logps"]["rejected"]] for r in records], np.float64
    ).reshape(-1, 2)


def chain_token_logps(
    program: DPOProgram, params: dict, convs: list[dict], data: PairData, size: int
) -> list[np.ndarray]:
    """Per-token log-probs of each conversation's response under `params`: one
    array per record, in record order (`PairData.sequence_batches`)."""
    out = []
    for n, batch in data.sequence_batches(convs, size):
        res = program.token_logprobs(params, batch)
        logp = res["logp"].reshape(-1, res["logp"].shape[-1])
        scored = res["scored"].reshape(logp.shape)
        out += [logp[i][scored[i]].astype(np.float64) for i in range(n)]
    return out


def preference_stats(logps: np.ndarray, ref: np.ndarray, dpo: DPOConfig) -> dict:
    """The configured preference loss (DPOP penalty included, no CE term), the plain
    DPO term, reward accuracy (margin > 0; ties count as wrong) and mean margin β·Δ of
    pairs with summed log-probs `logps` and reference `ref`, both (n, 2)."""
    columns = (jnp.asarray(x) for x in (logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1]))
    losses = dpo_pair_losses(
        *columns, beta=dpo.beta, loss=dpo.loss, label_smoothing=dpo.label_smoothing,
        dpop_lambda=dpo.dpop_lambda,
    )  # fmt: skip
    per_pair, rw_c, rw_r = (np.asarray(x, np.float64) for x in losses)
    margin = rw_c - rw_r
    # the plain DPO term alone, -log σ(β·Δ): below ln 2 exactly when the margins lean
    # right, whatever a DPOP penalty adds to the configured loss
    plain = np.logaddexp(0.0, -margin) if dpo.loss == "sigmoid" else per_pair
    return {
        "pref_loss": float(per_pair.mean()),
        "dpo_loss": float(plain.mean()),
        "reward_accuracy": float(np.mean(margin > 0)),
        "reward_margin": float(margin.mean()),
    }


def kl_stats(start: list[np.ndarray], end: list[np.ndarray]) -> dict:
    """Per-token KL of the trained policy π from the start policy π_ref, on chains
    sampled from the start policy: with x = log π − log π_ref per token,
    `kl_per_token` = mean(−x) estimates KL(π_ref‖π) (the plain estimator: it can
    come out negative) and `kl_k3_per_token` = mean(eˣ − x − 1) the same with
    less variance (Schulman's k3, never negative). The chains were sampled at the
    round's temperature / top-p, not from π_ref itself, so both are estimates
    under that sampling distribution."""
    if not start:
        return {}
    x = np.concatenate(end) - np.concatenate(start)
    return {
        "kl_per_token": float(np.mean(-x)),
        "kl_k3_per_token": float(np.mean(np.expm1(x) - x)),
        "kl_tokens": int(x.size),
    }


def round_probe(
    start: np.ndarray,
    end: np.ndarray,
    ref: np.ndarray,
    dpo: DPOConfig,
    start_chains: list[np.ndarray] | None = None,
    end_chains: list[np.ndarray] | None = None,
) -> dict:
    """What a DPO run did to its own pairs (summed log-probs (n, 2) under the start
    and end policies and the reference) and, optionally, to chains sampled from the
    start policy (per-token log-probs under both): the preference loss before the
    first and after the last update, the end reward accuracy and margin, and the
    mean change of the chosen / rejected log-probs (a falling chosen log-prob is
    likelihood displacement)."""
    first, last = preference_stats(start, ref, dpo), preference_stats(end, ref, dpo)
    return {
        "probe_pairs": len(end),
        "pref_loss_start": first["pref_loss"],
        "pref_loss_end": last["pref_loss"],
        "dpo_loss_end": last["dpo_loss"],
        "reward_accuracy_end": last["reward_accuracy"],
        "reward_margin_end": last["reward_margin"],
        "logp_chosen_change": float(np.mean(end[:, 0] - start[:, 0])),
        "logp_rejected_change": float(np.mean(end[:, 1] - start[:, 1])),
        **kl_stats(start_chains or [], end_chains or []),
    }


def heldout_rewards(
    program: DPOProgram,
    policy_params: dict,
    ref_params: dict,
    records: list[dict],
    data: PairData,
    size: int,
    beta: float,
) -> dict:
    """Implicit-reward accuracy on held-out pairs: the fraction whose margin
    beta * ((pi_c - ref_c) - (pi_r - ref_r)) is > 0 (ties count as wrong), and the mean margin."""
    pol = policy_logps(program, policy_params, records, data, size)
    ref = policy_logps(program, ref_params, records, data, size)
    m = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    return {
        "pairs": len(m),
        "reward_accuracy": float(np.mean(m > 0)),
        "mean_margin": float(m.mean()),
    }


def full_params_of(path: str | Path, mesh) -> dict:
    """A checkpoint's parameters as a pure dict sharded on `mesh`."""
    from insightv_jax.checkpoint import load_model

    model = load_model(path, mesh)[0]
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ------------------------------------------------------------ insightv dpo


_MFU = re.compile(r" MFU [0-9.]+%")


def _without_mfu(print_fn: Callable[[str], None]) -> Callable[[str], None]:
    """`print_fn` minus the training log's MFU field: DPO measures no matmul peak
    (and its pair-layout steps are not the SFT FLOP count the logger assumes), so
    the field would always read a meaningless `MFU 0.0%`."""
    return lambda line: print_fn(_MFU.sub("", line))


def usable_records(
    records: list[dict], check, data: PairData, on_bad_record: str, what: str, print_fn
) -> list[dict]:
    """The records `check(rec, root, limits)` passes (the loader's own validation,
    so a count of them is the count the loader trains on). Bad ones are left out
    with one line naming the first, or raise with `on_bad_record=fail`."""
    limits = data.transform.limits(max(data.buckets))
    good, bad = [], []
    for rec in records:
        reason = check(rec, data.root, limits)
        if reason is None:
            good.append(rec)
        else:
            bad.append((rec.get("id"), reason))
    if bad and on_bad_record == "fail":
        raise DataError(f"{what} {bad[0][0]}: {bad[0][1]} (data.on_bad_record=fail)")
    if bad:
        print_fn(f"skipping {len(bad)} of {len(records)} {what}s (first: {bad[0][0]}: {bad[0][1]})")
    return good


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


def format_probe(p: dict) -> str:
    line = (
        f"probe on {p['probe_pairs']} pairs: preference loss {p['pref_loss_start']:.4f} -> "
        f"{p['pref_loss_end']:.4f}, reward accuracy {p['reward_accuracy_end']:.3f}, "
        f"margin {p['reward_margin_end']:+.3f}, log-prob change chosen "
        f"{p['logp_chosen_change']:+.3f} rejected {p['logp_rejected_change']:+.3f}"
    )
    if "kl_per_token" in p:
        line += (
            f"; KL(start||end) per token {p['kl_per_token']:.5f} "
            f"(k3 {p['kl_k3_per_token']:.5f}) over {p['kl_tokens']} sampled tokens"
        )
    return line


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

    After the last update `round_probe` compares the start and the end policy on
    the pairs (the same batches for both) and, given `chains` (conversation
    records whose responses were sampled from the start policy), measures the
    per-token KL between them; written to RUN/probe.json and returned beside the
    means of the last epoch's training steps.
    """
    from insightv_jax.checkpoint import aux_dirs
    from insightv_jax.data.pairs import check_pair, pair_loader
    from insightv_jax.data.sources import JsonlSource
    from insightv_jax.data.validate import check_record
    from insightv_jax.train import _model_config_of
    from insightv_jax.train.trainer import Trainer

    print_fn = _without_mfu(print_fn)
    if not cfg.train.init:
        raise ConfigError("dpo: train.init must name the policy to start from")
    if cfg.data.group_by_length:
        raise ConfigError("dpo: data.group_by_length applies to SFT data, not preference pairs")
    if cfg.dpo.dpop_lambda < 0 or (cfg.dpo.dpop_lambda and cfg.dpo.loss != "sigmoid"):
        raise ConfigError(
            f"dpo.dpop_lambda={cfg.dpo.dpop_lambda} must be >= 0 and needs dpo.loss=sigmoid"
        )
    model_cfg = _model_config_of(cfg.train.init)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    d = cfg.dpo
    tok, proc = aux_dirs(cfg.train.init)
    if tok is None:
        raise ConfigError(f"{cfg.train.init}: checkpoint has no tokenizer (needed for pairs)")
    records = read_jsonl(pairs_path)  # a bad pair file fails before the run dir exists
    run = Path(cfg.train.workdir)
    run.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ConfigError(f"{pairs_path}: no preference pairs")
    data = PairData.for_checkpoint(cfg, model_cfg, tok, root)
    bad_rule = cfg.data.on_bad_record
    records = usable_records(records, check_pair, data, bad_rule, "pair", print_fn)
    # a chain too long for the buckets only leaves the KL estimate, never fails the run
    chains = usable_records(chains or [], check_record, data, "skip", "chain", print_fn)
    gb = cfg.train.global_batch
    if len(records) < gb and not cfg.train.steps:
        raise ConfigError(f"{pairs_path}: {len(records)} usable pairs < train.global_batch={gb}")
    total = step_budget(cfg.train, len(records))
    budget = f"train.steps={cfg.train.steps}" if cfg.train.steps else f"{cfg.train.epochs} epochs"
    print_fn(f"DPO on {len(records)} pairs: {budget} = {total} steps of {gb} pairs")
    metrics_path = run / "metrics.jsonl"

    def on_step(step, metrics, local, state):
        if jax.process_index() == 0:
            row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            append_jsonl(metrics_path, row)

    program_cls = functools.partial(DPOProgram, dpo=d)
    # the loader is built after the trainer exists: precomputing needs its program
    trainer = Trainer(
        cfg, iter(()), total_steps=total, tokenizer_dir=tok, processor_dir=proc,
        on_step=on_step, print_fn=print_fn, measure_peak=False, program_cls=program_cls,
    )  # fmt: skip
    try:
        program, mesh, size = trainer.program, trainer.mesh, d.logprob_batch
        ref_path = d.reference or cfg.train.init
        need_ref = d.loss != "ref_free"
        ref_params = None
        train_path = pairs_path
        # reference log-probs the pair file carries count only if they were scored the
        # same way (truncated at the divergence or not)
        carried = all(
            "ref_logps" in r and bool(r.get("ref_truncated", False)) == data.truncate
            for r in records
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
        ref = ref_array(records) if need_ref else np.zeros((len(records), 2))
        # the start policy on the pairs (its log-probs are the reference's when it
        # is the reference) and on the sampled chains
        ref_is_start = need_ref and ref_path == cfg.train.init
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
            del params
        if d.ref_logps == "precomputed":
            ref_params = None  # not kept in memory while training
        loader = pair_loader(
            JsonlSource(train_path, root), data.transform, batch_size=gb // jax.process_count(),
            buckets=data.buckets, seed=cfg.data.shuffle_seed, num_epochs=None,
            on_bad_record=bad_rule, limits=data.transform.limits(max(data.buckets)),
            pad_id=data.pad_id, truncate=data.truncate,
        )  # fmt: skip
        batches = PairBatches(loader)
        if ref_params is not None:
            batches = WithRefLogps(batches, program, ref_params)
        trainer.batches = batches
        result = trainer.run()
        held, probe = {}, {}
        if not result.preempted:
            params = program.full_params(result.state)
            end = policy_logps(program, params, records, data, size)
            end_chains = chain_token_logps(program, params, chains, data, size) if chains else None
            probe = round_probe(start, end, ref, d, start_chains, end_chains)
            (run / "probe.json").write_text(json.dumps(probe, indent=1) + "\n")
            print_fn(format_probe(probe))
            if d.eval_pairs:
                held = evaluate_heldout(cfg, program, result.state, data, mesh, print_fn)
    finally:
        trainer.close()
    last = final_epoch_means(read_jsonl(metrics_path) if metrics_path.exists() else [],
                             max(math.ceil(len(records) / gb), 1))  # fmt: skip
    last.update({f"heldout_{k}": v for k, v in held.items()})
    state = "preempted at" if result.preempted else "finished"
    print_fn(
        f"{state} step {result.step}/{total}; skipped {result.skipped} non-finite steps; "
        f"run directory {trainer.run_dir}"
    )
    return {"step": result.step, "total": total, "preempted": result.preempted, **last, **probe}


def final_epoch_means(rows: list[dict], per_epoch: int) -> dict:
    """Means of the DPO metrics over the last `per_epoch` steps (one pass over the
    pairs; a single step's batch is too noisy to summarise a round). The trainer's
    log rows share metrics.jsonl; only the per-step DPO rows carry `reward_accuracy`."""
    steps = [r for r in rows if "reward_accuracy" in r][-per_epoch:]
    if not steps:
        return {}
    out = {k: sum(r[k] for r in steps) / len(steps) for k in steps[-1] if k != "step"}
    return {"step": steps[-1]["step"], **out}


def evaluate_heldout(cfg: RunConfig, program, state, data: PairData, mesh, print_fn) -> dict:
    """`dpo.eval_pairs`: held-out reward accuracy of the trained policy against
    the reference; written to RUN/heldout.json."""
    records = read_jsonl(Path(cfg.dpo.eval_pairs))
    if not records:
        raise ConfigError(f"dpo.eval_pairs={cfg.dpo.eval_pairs}: no preference pairs")
    ref_params = full_params_of(cfg.dpo.reference or cfg.train.init, mesh)
    policy = SFTProgram.full_params(state)
    out = heldout_rewards(
        program, policy, ref_params, records, data, cfg.dpo.logprob_batch, cfg.dpo.beta
    )
    (Path(cfg.train.workdir) / "heldout.json").write_text(json.dumps(out, indent=1) + "\n")
    print_fn(
        f"held-out pairs: {out['pairs']}, reward accuracy {out['reward_accuracy']:.3f}, "
        f"mean margin {out['mean_margin']:+.3f}"
    )
    return out


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
