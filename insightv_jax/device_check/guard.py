"""The device check's guard: a worker process runs the sections in order and
records each; this process watches it, ends a section that overruns its guard
(or the budget), records a worker's death, and starts a worker again for the
sections left. Every section ends up with a file, figures or an error line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from queue import Empty, Queue

from insightv_jax.device_check.sections import (
    CPU_GUARDS,
    CPU_TESTS,
    GPU_TESTS,
    GUARDS,
    ROOT,
    RUN,
    SECTIONS,
    one_line,
)

MARK = "@@device-check@@"
STATUS_KEYS = ("section", "mode", "ok", "seconds", "error", "traceback", "partial")


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` whole or not at all (a cut run leaves no half file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def record(out: Path, name: str, mode: str, seconds: float, result: dict, error=None, tb=None):
    """One section's file: status, seconds, error line, then its figures. A
    section's own partial record (written while it runs) keeps its figures
    when the guard or a crash ends it."""
    path = out / f"{name}.json"
    if not result and path.is_file():
        try:
            earlier = json.loads(path.read_text())
            if earlier.get("partial"):
                result = {k: v for k, v in earlier.items() if k not in STATUS_KEYS}
        except ValueError:
            pass
    row = {"section": name, "mode": mode, "ok": error is None, "seconds": round(seconds, 1)}
    row["error"] = error
    if tb:
        row["traceback"] = tb
    write_json(path, {**row, **result})


def section_limit(guard: float, until: float) -> float:
    """Seconds a section starting now may take: its guard, within the budget."""
    return max(1.0, min(guard, until - time.time()))


def worker(args) -> int:
    """Run the sections named in `args.sections` in order, announcing each on
    stdout for the parent's guard, and record each one's figures or error."""
    out = Path(args.out)
    tests = args.tests or (CPU_TESTS if args.cpu else GPU_TESTS)
    size = "toy" if args.cpu else "1b"
    ctx = {"cpu": args.cpu, "size": size, "overrides": args.set, "tests": tests}
    mode = "cpu" if args.cpu else "device"
    guards = CPU_GUARDS if args.cpu else GUARDS
    for name in args.sections:
        print(f"{MARK} start {name}", flush=True)
        ctx["deadline"] = time.time() + section_limit(guards[name], args.until)
        t0 = time.perf_counter()

        def partial(result, name=name, t0=t0):
            """What the section measured so far, kept if it is cut short."""
            data = {**result, "partial": True}
            record(out, name, mode, time.perf_counter() - t0, data, "cut short while running")

        ctx["partial"] = partial
        error = None
        try:
            result = RUN[name](ctx)
            error = result.pop("error_summary", None)
            record(out, name, mode, time.perf_counter() - t0, result, error)
        except Exception as e:
            error, tb = one_line(e), traceback.format_exc().strip().splitlines()[-12:]
            record(out, name, mode, time.perf_counter() - t0, {}, error, tb)
        print(f"{MARK} done {name}", flush=True)
        if name == "env" and error:  # nothing else can run (the parent skips the rest)
            break
    return 0


# -------------------------------------------------------------- the guard


def _pump(stream, queue: Queue, sink, tail: deque | None = None) -> None:
    """Forward a worker's stream line by line to `sink` (keeping the last lines
    in `tail`), its markers to `queue`; stdout's end (tail None) says it ended."""
    for line in stream:
        if line.startswith(MARK):
            queue.put(line[len(MARK) :].split())
            continue
        if tail is not None:
            tail.append(line.rstrip())
        sink.write(line)
        sink.flush()
    if tail is None:
        queue.put(["exit"])


def _stop(proc: subprocess.Popen) -> None:
    """Kill the worker and what it started (its own process group)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:  # it has ended already
        pass
    proc.wait()


def _worker_env(cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # JAX's pool never shrinks: the 1B peer in torch needs the rest of the card
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if not cpu:  # a second run on the same machine compiles nothing again
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    if cpu:  # a rehearsal: its figures mean nothing, and XLA compiles twice as fast unoptimised
        env["JAX_PLATFORMS"] = "cpu"
        flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    return env


class _Check:
    """The parent's side: the sections left, the summary, the budget."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.mode = "cpu" if args.cpu else "device"
        self.guards = CPU_GUARDS if args.cpu else GUARDS
        self.start = time.monotonic()
        self.until = time.time() + args.budget  # wall clock: the worker reads it too
        self.left = list(args.sections)
        self.summary = {"mode": self.mode, "argv": list(args.argv), "budget_s": args.budget}
        self.summary["sections"] = {}

    def end(self, name: str, error: str | None = None, seconds: float = 0.0) -> None:
        """`name` is over: record `error` (unless the worker recorded it) and
        rewrite the summary."""
        if error is not None:
            record(self.out, name, self.mode, seconds, {}, error)
        try:
            row = json.loads((self.out / f"{name}.json").read_text())
            status = {k: row.get(k) for k in ("ok", "seconds", "error")}
        except (OSError, ValueError):
            status = {"ok": False, "seconds": None, "error": "no record written"}
        self.summary["sections"][name] = status
        self.summary["seconds"] = round(time.monotonic() - self.start, 1)
        write_json(self.out / "summary.json", self.summary)
        self.left.remove(name)

    def worker_command(self) -> list[str]:
        """The worker process's command line for the sections left."""
        a = self.args
        cmd = [sys.executable, "-m", "insightv_jax.device_check", "--worker", "--out",
               str(self.out), "--sections", ",".join(self.left), f"--until={self.until}"]  # fmt: skip
        cmd += (["--cpu"] if a.cpu else []) + [f"--set={kv}" for kv in a.set]
        return cmd + [f"--tests={t}" for t in a.tests]

    def worker(self) -> None:
        """One worker for the sections left, watched until it ends or is ended."""
        a = self.args
        cmd = self.worker_command()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_worker_env(a.cpu), text=True, bufsize=1,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
        events: Queue = Queue()
        tail: deque = deque(maxlen=15)
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, events, sys.stdout), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, events, sys.stderr, tail),
                                  daemon=True)]  # fmt: skip
        for t in pumps:
            t.start()
        # between sections the worker has until the end of the budget (and a little)
        idle = self.start + a.budget + 30
        current, deadline, limit = None, idle, 0.0
        while True:
            try:
                event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:  # past the current section's guard
                _stop(proc)
                name = current or (self.left[0] if self.left else None)
                if name is not None:
                    self.end(name, f"timed out after {limit:.0f} s", limit)
                return
            if event[0] in ("start", "done") and event[1] not in self.left:
                continue  # not a section this worker was given
            if event[0] == "start":
                current = event[1]
                limit = section_limit(self.guards[current], self.until)
                deadline = time.monotonic() + limit + 2  # the worker's own limit ends first
            elif event[0] == "done":
                self.end(event[1])
                current, deadline = None, idle
                if not self.summary["sections"][event[1]]["ok"] and event[1] == "env":
                    _stop(proc)  # the rest is skipped
                    return
            else:  # the worker's stdout closed: it ended
                rc = proc.wait()
                for t in pumps:
                    t.join(timeout=5)
                if self.left:  # in a section, or before the first: that one is lost
                    last = " | ".join(line for line in list(tail)[-3:] if line)
                    self.end(current or self.left[0], f"worker died (exit {rc}): {last[-400:]}")
                return

    def run(self) -> dict:
        """Workers until every section is recorded; the summary."""
        while self.left:
            budget_left = self.until - time.time()
            env = self.summary["sections"].get("env")
            env_failed = env is not None and not env["ok"]
            if budget_left < 3 or env_failed:
                why = "the env section failed" if env_failed else "the budget is spent"
                for name in list(self.left):
                    self.end(name, f"skipped: {why}")
                break
            self.worker()
        self.summary["ok"] = all(s["ok"] for s in self.summary["sections"].values())
        write_json(self.out / "summary.json", self.summary)
        return self.summary


def parse(argv=None):
    """The command line of `python -m insightv_jax.device_check`."""
    p = argparse.ArgumentParser(
        prog="python -m insightv_jax.device_check",
        description="One accelerator's figures, a JSON file a section (launch/device_check.sh).",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or "device_check_out",
        help="folder for the JSON files ($OUT, else ./device_check_out)",
    )
    p.add_argument("--cpu", action="store_true", help="every section at toy sizes on the CPU")
    p.add_argument(
        "--sections",
        type=lambda s: s.split(","),
        default=list(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check (default 300; 540 with --cpu)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="config override for the train/parity models, e.g. "
        "model.decoder.attention=cudnn (repeatable)",
    )
    p.add_argument(
        "--tests",
        action="append",
        default=[],
        metavar="PATH",
        help="test files or node ids for the tests section (repeatable)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)} (sections: {', '.join(SECTIONS)})")
    args.sections = [s for s in SECTIONS if s in args.sections]  # env first
    if args.budget is None:
        args.budget = 540.0 if args.cpu else 300.0
    if args.until is None:
        args.until = time.time() + args.budget
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    """Parent: run the check and print the summary; `--worker`: run sections."""
    args = parse(argv)
    if args.worker:
        return worker(args)
    summary = _Check(args).run()
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
