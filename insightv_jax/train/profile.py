"""Where a jitted step's time goes: XLA ops grouped by kind from a profiler trace.

`op_breakdown(step)` runs `step()` under `jax.profiler.trace` (Perfetto JSON
output), sums the device-side op durations by op kind (`dot.12` and `dot.40`
are both "dot"; `ynn_fusion` is a YNNPACK matmul fusion, `*copy*`/`transpose*`
are layout copies, `wrapped_broadcast` materialised constants) and returns the
kinds with their milliseconds per step and share. This is what `insightv bench
train` prints beside the throughput when a target is missed.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable

# trace events that are runtime bookkeeping, not XLA ops
_HOST = ("Thunk", "$", "Pjit", "Common", "while", "SlinkyThreadPool")


def op_breakdown(step: Callable[[], object], steps: int = 3, top: int = 12) -> dict:
    """Milliseconds per step by op kind over `steps` traced calls of `step()`
    (which must block until its results are ready); `step` is warmed up first."""
    import jax

    step()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        files = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))
        if not files:
            return {"error": "the profiler wrote no Perfetto trace"}
        with gzip.open(files[-1]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(_HOST):
            by_kind[re.sub(r"\.\d+$", "", e["name"])] += e["dur"]
    total = sum(by_kind.values())
    rows = [
        {"op": k, "ms_per_step": round(us / steps / 1e3, 2), "share": round(us / total, 3)}
        for k, us in by_kind.most_common(top)
    ]
    return {"ops_ms_per_step": round(total / steps / 1e3, 1), "top": rows}
