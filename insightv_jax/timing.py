"""Wall-clock timing of blocking calls, for the benchmarks (`insightv bench`)."""

from __future__ import annotations

import time

import numpy as np


def timed_in_turn(*steps, min_seconds: float, min_steps: int = 3, stat=np.median) -> list[float]:
    """Seconds per call of each blocking `step()`, `stat` (median by default)
    over at least `min_steps` rounds and `min_seconds` a step, after one
    warm-up call each. Several steps are called in turn, round after round:
    the two sides of a ratio then see the same moments of a shared machine
    (whose memory speed drifts from second to second) instead of one block
    each, a few seconds apart."""
    for step in steps:
        step()
    times: list[list[float]] = [[] for _ in steps]
    t_end = time.perf_counter() + min_seconds * len(steps)
    while len(times[0]) < min_steps or time.perf_counter() < t_end:
        for step, own in zip(steps, times):
            t0 = time.perf_counter()
            step()
            own.append(time.perf_counter() - t0)
    return [float(stat(own)) for own in times]


def timed(step, min_seconds: float, min_steps: int = 3, stat=np.median) -> float:
    """Seconds per call of the blocking `step()` (see `timed_in_turn`)."""
    return timed_in_turn(step, min_seconds=min_seconds, min_steps=min_steps, stat=stat)[0]
