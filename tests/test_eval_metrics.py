"""Confidence intervals: Wilson against hand computation; paired CIs cover the truth."""

import math

import numpy as np
import pytest

from insightv_jax.errors import InsightVError
from insightv_jax.eval.metrics import ItemResult, compare, paired_ci, summarize, wilson


def test_wilson_matches_hand_computation():
    # 8/10, z = 1.96: p = .8, z^2/n = .38416; centre = (.8 + .19208) / 1.38416,
    # half = 1.96 * sqrt(.016 + .009604) / 1.38416 (published: 0.4902, 0.9433)
    lo, hi = wilson(8, 10, z=1.96)
    centre, half = 0.99208 / 1.38416, 1.96 * math.sqrt(0.025604) / 1.38416
    assert lo == pytest.approx(centre - half, abs=1e-9) and hi == pytest.approx(centre + half)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson(0, 10)  # never below 0, and not degenerate like the Wald interval
    assert lo == 0.0 and hi == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(50, 100)[0] == pytest.approx(1 - wilson(50, 100)[1])


def test_mcnemar_interval_by_hand():
    # 100 questions: 20 only a right, 5 only b right -> diff .15,
    # var = (25 - 15^2/100) / 100^2 = 22.75e-4
    a = [True] * 20 + [False] * 5 + [True] * 50 + [False] * 25
    b = [False] * 20 + [True] * 5 + [True] * 50 + [False] * 25
    diff, lo, hi = paired_ci(a, b, method="mcnemar", z=1.96)
    half = 1.96 * math.sqrt(22.75e-4)
    assert diff == pytest.approx(0.15) and (lo, hi) == pytest.approx((0.15 - half, 0.15 + half))
    bdiff, blo, bhi = paired_ci(a, b, n_boot=4000, seed=1)
    assert bdiff == pytest.approx(0.15) and abs(blo - lo) < 0.02 and abs(bhi - hi) < 0.02
    with pytest.raises(InsightVError, match="same items"):
        paired_ci(a, b[:-1])


@pytest.mark.parametrize("method", ["bootstrap", "mcnemar"])
def test_paired_ci_covers_the_true_difference(method):
    # per question: both right .55, only a .15, only b .05, neither .25 -> true diff .10
    rng = np.random.default_rng(123)
    sims, n, covered, widths = 300, 300, 0, []
    for _ in range(sims):
        kind = rng.choice(4, size=n, p=[0.55, 0.15, 0.05, 0.25])
        a, b = np.isin(kind, [0, 1]), np.isin(kind, [0, 2])
        _, lo, hi = paired_ci(a, b, method=method, n_boot=1000, seed=int(rng.integers(1 << 30)))
        covered += lo <= 0.10 <= hi
        widths.append(hi - lo)
    assert 0.91 <= covered / sims <= 0.99
    # pairing helps: narrower than the unpaired normal interval of two accuracies (~.150)
    unpaired = 2 * 1.96 * math.sqrt((0.7 * 0.3 + 0.6 * 0.4) / n)
    assert np.mean(widths) < 0.9 * unpaired


def _results(flags, bench="b", cats=None, fallbacks=()):
    return [
        ItemResult(
            str(i), bench, (cats or ["x"] * len(flags))[i], "mc", "", "", "A", c, i in fallbacks
        )  # fmt: skip
        for i, c in enumerate(flags)
    ]


def test_summarize_and_compare_per_category():
    a = _results([1, 1, 1, 0, 1, 0], cats=list("ppqqqq"), fallbacks={3})
    b = _results([1, 0, 0, 0, 1, 1], cats=list("ppqqqq"))
    s = summarize(a)["b"]
    assert (s["n"], s["correct"], s["fallbacks"]) == (6, 4, 1)
    assert s["ci95"] == pytest.approx(list(wilson(4, 6)))
    assert s["categories"]["p"]["accuracy"] == 1.0 and s["categories"]["q"]["correct"] == 2
    c = compare(a, b, n_boot=500)["b"]
    assert c["diff"] == pytest.approx(1 / 6) and (c["a_only"], c["b_only"]) == (2, 1)
    assert c["categories"]["p"]["diff"] == pytest.approx(0.5)
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and not c["significant"]
    with pytest.raises(InsightVError, match="same questions"):
        compare(a, b[:-1])
