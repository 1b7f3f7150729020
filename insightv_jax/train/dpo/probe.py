"""What a DPO run did: log-probs of pairs and chains under a policy, the reference
log-probs, the preference statistics and KL of `round_probe`, held-out rewards.

These passes take pair-layout batches (`PairData.batches`) even in a run with
`data.packing`: they run once per run, outside the training loop, and only the
training step packs (the per-token pass cannot take packed batches)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from insightv_jax.config import ConfigError, DPOConfig, RunConfig
from insightv_jax.jsonl import read_jsonl
from insightv_jax.train.dpo.data import PairData, full_params_of
from insightv_jax.train.dpo.program import DPOProgram
from insightv_jax.train.losses import dpo_pair_losses
from insightv_jax.train.steps import SFTProgram


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
