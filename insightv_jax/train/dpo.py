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
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from insightv_jax.config import ConfigError, DPOConfig, RunConfig
from insightv_jax.errors import DataError
from insightv_jax.train.losses import (
    IGNORE,
    chunked_sequence_nll,
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

    # ----------------------------------------------------- the log-prob pass

    def _logprob_pass(self, params: dict, batch: dict) -> dict:
        model = nnx.merge(self.graphdef, params, self.rest)
        nll, count = self._sequence_nll(model, batch)
        return {"sum": -nll, "mean": -nll / jnp.maximum(count, 1.0), "tokens": count}

    def logprob_fn(self, batch: dict):
        """The jitted log-prob pass for this batch's shapes: (full params, batch) ->
        {sum, mean, tokens} over response tokens, each (B, 2)."""
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._passes:
            p_sh = merge(self.shardings["params"], self.shardings["frozen"])
            self._passes[key] = jax.jit(
                self._logprob_pass,
                in_shardings=(p_sh, self.batch_shardings(batch)),
                out_shardings=NamedSharding(self.mesh, PartitionSpec()),
            )
        return self._passes[key]

    def logprobs(self, params: dict, batch: dict) -> dict:
        """Summed and token-mean response log-probs of a pair batch (numpy, (B, 2))."""
        batch = {k: np.asarray(v) for k, v in batch.items() if k in BATCH_KEYS}
        shardings = self.batch_shardings(batch)
        arrays = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            out = self.logprob_fn(batch)(params, arrays)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


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
    """What turns pair records into batches: transform, buckets, pad id, image root."""

    transform: object  # record -> example (data.transforms.ChatTransform)
    buckets: tuple[int, ...]
    pad_id: int
    root: Path

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
        return cls(transform, tuple(cfg.data.buckets), int(pad), Path(root))

    def batches(self, records: list[dict], size: int) -> Iterator[tuple[int, dict]]:
        """(number of real pairs, pair-layout batch) over `records` in order; the
        last batch is padded with copies of its last pair to `size` rows."""
        from insightv_jax.data.pairs import PairCollate, PairTransform

        tf, collate = PairTransform(self.transform), PairCollate(self.buckets, self.pad_id)
        for i in range(0, len(records), size):
            chunk = records[i : i + size]
            examples = [tf(r) for r in chunk]
            examples += [examples[-1]] * (size - len(chunk))
            try:
                batch = collate(examples)
            except DataError as e:
                ids = ", ".join(str(r.get("id")) for r in chunk)
                raise DataError(f"pairs {ids}: {e} (raise data.buckets)") from None
            yield len(chunk), pair_batch(batch)


def precompute_ref_logps(
    program: DPOProgram, ref_params: dict, records: list[dict], data: PairData, size: int
) -> list[dict]:
    """The records with `ref_logps` {chosen, rejected} from the reference's log-prob pass."""
    out = []
    batches = data.batches(records, size)
    for start, (n, batch) in zip(range(0, len(records), size), batches):
        sums = program.logprobs(ref_params, batch)["sum"]
        for rec, (c, r) in zip(records[start : start + n], sums[:n].tolist()):
            out.append({**rec, "ref_logps": {"chosen": float(c), "rejected": float(r)}})
    return out


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
    margins = []
    for n, batch in data.batches(records, size):
        pol = np.asarray(program.logprobs(policy_params, batch)["sum"])[:n]
        ref = np.asarray(program.logprobs(ref_params, batch)["sum"])[:n]
        margins += (beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))).tolist()
    m = np.asarray(margins)
    return {
        "pairs": len(m),
        "reward_accuracy": float(np.mean(m > 0)),
        "mean_margin": float(m.mean()),
    }


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file (a pair file, a run's own records); a missing
    file or a bad line is a one-line DataError naming the file and line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    rows = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: not a JSON object")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write atomically (a crash leaves the old file or none, never half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def full_params_of(path: str | Path, mesh) -> dict:
    """A checkpoint's parameters as a pure dict sharded on `mesh`."""
    from insightv_jax.checkpoint import load_model

    model = load_model(path, mesh)[0]
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ------------------------------------------------------------ insightv dpo


def aux_dirs(path: str | Path) -> tuple[Path | None, Path | None]:
    """(tokenizer dir, processor dir) of a model dir, run dir or HF folder."""
    src = Path(path)
    if (src / "config.json").is_file():
        tok = src if (src / "tokenizer_config.json").is_file() else None
        return tok, src if (src / "preprocessor_config.json").is_file() else None
    tok = src / "tokenizer" if (src / "tokenizer").is_dir() else None
    return tok, src / "processor" if (src / "processor").is_dir() else None


def train_dpo(cfg: RunConfig, pairs_path: Path, root: Path, print_fn=print) -> dict:
    """One DPO run from `train.init` on a pair file; returns the final metrics.

    With `dpo.ref_logps=precomputed`, pairs without `ref_logps` get them from
    the reference (`dpo.reference`, default `train.init`) once, written to
    `RUN/pairs_ref.jsonl`; a restart reuses that file and the latest checkpoint.
    """
    from insightv_jax.data.pairs import pair_loader
    from insightv_jax.data.sources import JsonlSource
    from insightv_jax.train import _model_config_of
    from insightv_jax.train.trainer import Trainer

    if not cfg.train.init:
        raise ConfigError("dpo: train.init must name the policy to start from")
    if cfg.data.group_by_length:
        raise ConfigError("dpo: data.group_by_length applies to SFT data, not preference pairs")
    model_cfg = _model_config_of(cfg.train.init)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    tok, proc = aux_dirs(cfg.train.init)
    if tok is None:
        raise ConfigError(f"{cfg.train.init}: checkpoint has no tokenizer (needed for pairs)")
    records = read_jsonl(pairs_path)  # a bad pair file fails before the run dir exists
    run = Path(cfg.train.workdir)
    run.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ConfigError(f"{pairs_path}: no preference pairs")
    per_epoch = len(records) // cfg.train.global_batch
    if per_epoch < 1 and not cfg.train.steps:
        raise ConfigError(
            f"{pairs_path}: {len(records)} pairs < train.global_batch={cfg.train.global_batch}"
        )
    total = cfg.train.steps or cfg.train.epochs * per_epoch
    data = PairData.for_checkpoint(cfg, model_cfg, tok, root)
    metrics_path = run / "metrics.jsonl"

    def on_step(step, metrics, local, state):
        if jax.process_index() == 0:
            row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    program_cls = functools.partial(DPOProgram, dpo=cfg.dpo)
    # the loader is built after the trainer exists: precomputing needs its program
    trainer = Trainer(
        cfg, iter(()), total_steps=total, tokenizer_dir=tok, processor_dir=proc,
        on_step=on_step, print_fn=print_fn, measure_peak=False, program_cls=program_cls,
    )  # fmt: skip
    try:
        program = trainer.program
        ref_params = None
        need_ref = cfg.dpo.loss != "ref_free"
        if need_ref and (cfg.dpo.ref_logps == "on_the_fly" or "ref_logps" not in records[0]):
            ref_params = full_params_of(cfg.dpo.reference or cfg.train.init, trainer.mesh)
        train_path = pairs_path
        if need_ref and cfg.dpo.ref_logps == "precomputed" and ref_params is not None:
            train_path = run / "pairs_ref.jsonl"
            if not train_path.exists():
                print_fn(f"reference log-probs for {len(records)} pairs -> {train_path}")
                rows = precompute_ref_logps(
                    program, ref_params, records, data, cfg.dpo.logprob_batch
                )
                write_jsonl(train_path, rows)
            ref_params = None  # not kept in memory while training
        loader = pair_loader(
            JsonlSource(train_path, root), data.transform,
            batch_size=cfg.train.global_batch // jax.process_count(), buckets=data.buckets,
            seed=cfg.data.shuffle_seed, num_epochs=None, on_bad_record=cfg.data.on_bad_record,
            limits=data.transform.limits(max(data.buckets)), pad_id=data.pad_id,
        )  # fmt: skip
        batches = PairBatches(loader)
        if ref_params is not None:
            batches = WithRefLogps(batches, program, ref_params)
        trainer.batches = batches
        result = trainer.run()
        held = {}
        if cfg.dpo.eval_pairs and not result.preempted:
            held = evaluate_heldout(cfg, program, result.state, data, trainer.mesh, print_fn)
    finally:
        trainer.close()
    last = final_epoch_means(read_jsonl(metrics_path) if metrics_path.exists() else [],
                             max(per_epoch, 1))  # fmt: skip
    last.update({f"heldout_{k}": v for k, v in held.items()})
    state = "preempted at" if result.preempted else "finished"
    print_fn(
        f"{state} step {result.step}/{total}; skipped {result.skipped} non-finite steps; "
        f"run directory {trainer.run_dir}"
    )
    return {"step": result.step, "total": total, "preempted": result.preempted, **last}


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
