"""How the summary agent treats the chain it is given: the chain-vs-answer confusion.

Every item answered from a judged chain (`ItemResult.chain_correct` not None)
falls in one cell:

    kept right   the chain is right and so is the answer
    broke right  the chain is right, the answer wrong    (the summary overturned it)
    fixed wrong  the chain is wrong, the answer right    (the summary repaired it)
    kept wrong   the chain is wrong and so is the answer

From those: the chain accuracy, the overturn rate = broke right / chains right
and the fix rate = fixed wrong / chains wrong (None when there is no such chain).
The same figures are given per category and, for chains with a recorded kind of
error (given chains: "text" or "image"), per kind; uncorrupted chains are `clean`.
"""

from __future__ import annotations

from collections.abc import Sequence

from insightv_jax.eval.metrics import ItemResult

CELLS = ("kept_right", "broke_right", "fixed_wrong", "kept_wrong")
CLEAN = "clean"  # the chain_kind key of chains without a deliberate error


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def confusion(results: Sequence[ItemResult]) -> dict:
    """The four cells, chain accuracy, overturn and fix rates of `results` (items
    whose chain was not judged are left out; `n` counts the judged ones)."""
    counts = dict.fromkeys(CELLS, 0)
    for r in results:
        if r.chain_correct is None:
            continue
        cell = ("kept_right", "broke_right") if r.chain_correct else ("fixed_wrong", "kept_wrong")
        counts[cell[0] if r.correct else cell[1]] += 1
    right = counts["kept_right"] + counts["broke_right"]
    wrong = counts["fixed_wrong"] + counts["kept_wrong"]
    return {
        "n": right + wrong,
        "chain_correct": right,
        "chain_accuracy": right / (right + wrong) if right + wrong else 0.0,
        **counts,
        "overturn_rate": _rate(counts["broke_right"], right),
        "fix_rate": _rate(counts["fixed_wrong"], wrong),
    }


def diagnostics(results: Sequence[ItemResult]) -> dict:
    """The confusion of `results` (one benchmark's), with `categories.<cat>` (when
    the items carry categories, as in `metrics.summarize`) and `chain_kinds.<kind>`
    (when any chain has a recorded kind of error) holding the same figures."""
    judged = [r for r in results if r.chain_correct is not None]
    out = confusion(judged)
    cats: dict[str, list[ItemResult]] = {}
    for r in judged:
        cats.setdefault(r.category, []).append(r)
    if len(cats) > 1 or (cats and "" not in cats):
        out["categories"] = {c: confusion(rs) for c, rs in sorted(cats.items())}
    if any(r.chain_kind is not None for r in judged):
        kinds: dict[str, list[ItemResult]] = {}
        for r in judged:
            kinds.setdefault(r.chain_kind or CLEAN, []).append(r)
        out["chain_kinds"] = {k: confusion(rs) for k, rs in sorted(kinds.items())}
    return out


def diagnostics_by_benchmark(results: Sequence[ItemResult]) -> dict[str, dict]:
    """benchmark -> `diagnostics` of its results, for the benchmarks where some
    chain was judged (empty for systems that do not answer from chains)."""
    benches: dict[str, list[ItemResult]] = {}
    for r in results:
        benches.setdefault(r.benchmark, []).append(r)
    return {
        b: diagnostics(rs)
        for b, rs in benches.items()
        if any(r.chain_correct is not None for r in rs)
    }
