"""A progress line with throughput and ETA, printed at most once a second."""

from __future__ import annotations

import sys
import time


class Progress:
    """`stage: done/total questions  r q/s  ETA` on stderr (a final line on close)."""

    def __init__(self, stage: str, total: int, done: int = 0, every_s: float = 1.0, file=None):
        self.stage, self.total, self.done = stage, total, done
        self.start_done, self.every_s = done, every_s
        self.file = file or sys.stderr
        self.t0 = self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        """Questions per second over this run (resumed ones excluded)."""
        return (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._print()

    def _print(self) -> None:
        rate = self.rate
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        print(
            f"{self.stage}: {self.done}/{self.total} questions  {rate:.2f} q/s  ETA {eta}",
            file=self.file,
            flush=True,
        )

    def close(self) -> None:
        self._print()
