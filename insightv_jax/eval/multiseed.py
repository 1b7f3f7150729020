"""Orderings over several seeds: a mean paired difference with a CI over questions and seeds.

Each seed is a whole replicate of a pipeline (same questions, another training seed);
its evaluation leaves `predictions.jsonl` rows `{system, id, correct, ...}`. For an
ordering "a > b" the statistic is the mean over seeds of acc_s(a) − acc_s(b). Its 95 %
CI comes from a paired bootstrap that resamples questions within each seed (the same
resampled questions for a and b, independently per seed) and averages the seeds'
differences; the seeds themselves are fixed, so the CI is over questions given these
seeds, and the per-seed differences are reported beside it to show their spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from insightv_jax.jsonl import read_jsonl


def read_correct(predictions: str | Path) -> dict[str, dict[str, bool]]:
    """system -> question id -> correct, from a predictions.jsonl file."""
    out: dict[str, dict[str, bool]] = {}
    for row in read_jsonl(predictions):
        key = f"{row.get('benchmark', '')}/{row['id']}"  # ids repeat across benchmarks
        out.setdefault(row["system"], {})[key] = bool(row["correct"])
    return out


def ordering(
    seeds: Sequence[dict[str, dict[str, bool]]],
    a: str,
    b: str,
    n_boot: int = 2000,
    rng_seed: int = 0,
) -> dict:
    """Mean over seeds of acc(a) − acc(b) on the questions both answered, its
    bootstrap 95 % CI, and each seed's difference. Seeds lacking a or b are left out."""
    pairs = []
    for per_system in seeds:
        if a in per_system and b in per_system:
            ids = sorted(set(per_system[a]) & set(per_system[b]))
            if not ids:
                continue
            xa = np.array([per_system[a][i] for i in ids], np.float64)
            xb = np.array([per_system[b][i] for i in ids], np.float64)
            pairs.append(xa - xb)
    if not pairs:
        return {"a": a, "b": b, "seeds": 0}
    rng = np.random.default_rng(rng_seed)
    per_seed = [float(d.mean()) for d in pairs]
    boot = np.zeros(n_boot)
    for d in pairs:
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boot += d[idx].mean(axis=1)
    boot /= len(pairs)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    mean = float(np.mean(per_seed))
    return {
        "a": a, "b": b, "seeds": len(pairs), "n": [int(len(d)) for d in pairs],
        "diff": mean, "ci95": [float(lo), float(hi)], "per_seed": per_seed,
        "holds": bool(lo > 0),
    }  # fmt: skip


def format_orderings(rows: list[dict]) -> str:
    """One line per ordering: mean difference, CI, per-seed values, holds or not."""
    lines = ["ordering (mean over seeds of acc(a) - acc(b), points; 95% CI: paired bootstrap "
             "over questions within each seed)"]  # fmt: skip
    for r in rows:
        if not r["seeds"]:
            lines.append(f"  {r['a']} > {r['b']}: not evaluated")
            continue
        each = " / ".join(f"{100 * x:+.1f}" for x in r["per_seed"])
        verdict = "holds" if r["holds"] else "does not hold"
        lines.append(
            f"  {r['a']} > {r['b']}: {100 * r['diff']:+.1f} ({100 * r['ci95'][0]:+.1f} .. "
            f"{100 * r['ci95'][1]:+.1f}) over {r['seeds']} seeds [{each}]: {verdict}"
        )
    return "\n".join(lines)
