"""Accuracy with 95% confidence intervals, per benchmark and per category.

One system: the Wilson score interval. Two systems on the same questions: a
paired interval for the difference of accuracies, by bootstrap over questions
(default) or the McNemar-style normal approximation from the discordant pairs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from insightv_jax.errors import InsightVError

Z95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """One scored answer. `fallback`: the MC letter was a seeded guess.

    Two-agent and given-chain answers also judge the chain they were given:
    `chain_correct` is whether the chain's own answer is right (None where it was
    not judged, e.g. results saved before chains were judged) and `chain_kind`
    where a given chain's deliberate error is visible ("text", "image"; None for
    an uncorrupted chain or one of unknown kind).
    """

    id: str
    benchmark: str
    category: str
    kind: str
    raw: str  # the model's text
    value: str  # the extracted answer
    answer: str  # the ground truth
    correct: bool
    fallback: bool = False
    chain: str | None = None  # two-agent: the reasoning chain
    chain_correct: bool | None = None
    chain_kind: str | None = None


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n ((0, 1) when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def paired_ci(
    a: Sequence[bool],
    b: Sequence[bool],
    method: str = "bootstrap",
    n_boot: int = 2000,
    seed: int = 0,
    z: float = Z95,
) -> tuple[float, float, float]:
    """(acc(a) - acc(b), low, high): a 95% interval for the difference of two
    systems' accuracies on the same questions (a[i], b[i] answer question i)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise InsightVError(f"paired_ci: {a.size} vs {b.size} answers (must be the same items)")
    n = a.size
    if n == 0:
        return 0.0, -1.0, 1.0
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    diff = (n10 - n01) / n
    if method == "mcnemar":
        var = (n10 + n01 - (n10 - n01) ** 2 / n) / (n * n)
        half = z * math.sqrt(max(var, 0.0))
        return diff, max(-1.0, diff - half), min(1.0, diff + half)
    if method != "bootstrap":
        raise InsightVError(f"paired_ci: method {method!r} is not bootstrap or mcnemar")
    # Resampling questions only moves the counts of the three per-question
    # differences (+1, -1, 0), so a multinomial draw is an exact bootstrap.
    probs = np.array([n10, n01, n - n10 - n01], float) / n
    counts = np.random.default_rng(seed).multinomial(n, probs, size=n_boot)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return diff, float(lo), float(hi)


def accuracy(results: Sequence[ItemResult]) -> dict:
    """n, correct, accuracy, Wilson 95% CI and fallback count of a set of results."""
    n = len(results)
    k = sum(r.correct for r in results)
    lo, hi = wilson(k, n)
    return {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else 0.0,
        "ci95": [lo, hi],
        "fallbacks": sum(r.fallback for r in results),
    }


def _groups(results: Sequence[ItemResult]) -> dict[str, dict[str, list[ItemResult]]]:
    """benchmark -> category -> results (benchmark order as first seen)."""
    out: dict[str, dict[str, list[ItemResult]]] = {}
    for r in results:
        out.setdefault(r.benchmark, {}).setdefault(r.category, []).append(r)
    return out


def summarize(results: Sequence[ItemResult]) -> dict:
    """Per benchmark: accuracy with CI and fallbacks, and the same per category."""
    summary = {}
    for bench, cats in _groups(results).items():
        every = [r for rs in cats.values() for r in rs]
        entry = accuracy(every)
        if len(cats) > 1 or "" not in cats:
            entry["categories"] = {c: accuracy(rs) for c, rs in sorted(cats.items())}
        summary[bench] = entry
    return summary


def _paired_entry(ra: list[ItemResult], rb: list[ItemResult], method, n_boot, seed) -> dict:
    diff, lo, hi = paired_ci([r.correct for r in ra], [r.correct for r in rb], method, n_boot, seed)
    return {
        "n": len(ra),
        "diff": diff,
        "ci95": [lo, hi],
        "a_only": sum(x.correct and not y.correct for x, y in zip(ra, rb)),
        "b_only": sum(y.correct and not x.correct for x, y in zip(ra, rb)),
        "significant": lo > 0 or hi < 0,
    }


def compare(
    a: Sequence[ItemResult],
    b: Sequence[ItemResult],
    method: str = "bootstrap",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired accuracy difference a - b per benchmark and per category.

    Both systems must have answered exactly the same (benchmark, id) items.
    """
    by_key = {(r.benchmark, r.id): r for r in b}
    keys_a = [(r.benchmark, r.id) for r in a]
    if set(keys_a) != set(by_key) or len(keys_a) != len(by_key):
        raise InsightVError("compare: the two systems did not answer the same questions")
    out = {}
    for bench, cats in _groups(a).items():
        every = [r for rs in cats.values() for r in rs]
        entry = _paired_entry(every, [by_key[bench, r.id] for r in every], method, n_boot, seed)
        entry["method"] = method
        if len(cats) > 1 or "" not in cats:
            entry["categories"] = {
                c: _paired_entry(rs, [by_key[bench, r.id] for r in rs], method, n_boot, seed)
                for c, rs in sorted(cats.items())
            }
        out[bench] = entry
    return out
