"""The device check (`launch/device_check.sh`): what this project does on one
accelerator, measured in about five minutes and written as it goes.

Sections, in the order they run, each written to `OUT/<section>.json` the
moment it finishes (a run cut short still leaves what it measured):
  env     versions (jax, jaxlib, its plugin, torch, transformers), devices, the card
  peak    measured matmul peaks (bf16; fp32 at JAX's default and highest
          precision) and the card's data-sheet dense bf16 peak
  train   `insightv bench train --size 1b`: a ~1B Llama-shaped decoder and a
          LLaVA-shaped VLM in bf16 against transformers (SDPA) on the same GPU
  sample  `insightv bench sample --size 1b`: decode at batch 1 and 8 against
          transformers' generate on the same GPU
  parity  fp32 logits against transformers, under
          `jax.default_matmul_precision("highest")` and JAX's default (TF32)
  tests   the test files that exercise attention, sharding, training steps and
          sampling, run on the accelerator (pass/fail counts, failures named)
plus `summary.json` (each section's status, rewritten as each ends).

The sections run one after another in a worker process. Each has its own time
guard, kept by this process: a section past its guard, or one that kills the
worker, is recorded with an `error` line and the worker is restarted for the
sections left; an exception is recorded by the worker itself. A failed `env`
(no accelerator, say) skips the rest. `--cpu` runs every section at toy sizes
on the CPU, torch on the CPU as the peer: the rehearsal that the tests run.

The worker needs jax, flax, optax, orbax-checkpoint, transformers and torch,
and neither grain, tensorflow-datasets nor tensorboardX.
"""

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

SECTIONS = ("env", "peak", "train", "sample", "parity", "tests")
# seconds a section may take (the budget, five minutes on the accelerator, cuts the later
# ones shorter), and at toy sizes on a CPU (compilation dominates there)
GUARDS = {"env": 45, "peak": 30, "train": 160, "sample": 90, "parity": 60, "tests": 90}
CPU_GUARDS = {"env": 60, "peak": 30, "train": 150, "sample": 120, "parity": 90, "tests": 90}
# the files whose tests exercise the paths an accelerator changes
GPU_TESTS = (
    "tests/test_attention.py",
    "tests/test_sharding.py",
    "tests/test_train_steps.py",
    "tests/test_sampler.py",
    "tests/test_decoder_parity.py",
    "tests/test_interface.py",
)
CPU_TESTS = ("tests/test_interface.py::test_attention_backend_resolves_per_platform",)
FP32 = [f"model.{p}.{k}=float32" for p in ("decoder", "vision") for k in ("param_dtype", "dtype")]
MARK = "@@device-check@@"
STATUS_KEYS = ("section", "mode", "ok", "seconds", "error", "traceback", "partial")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------- sections


def section_env(ctx: dict) -> dict:
    """Versions, devices and the card; an error when the check expects an
    accelerator and JAX found none."""
    import importlib.metadata as md
    import importlib.util
    import platform

    import jax
    import torch

    def installed(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:
            return False

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    packages = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                "jax-cuda12-pjrt", "libtpu", "flax", "optax", "orbax-checkpoint", "transformers",
                "torch", "numpy")  # fmt: skip
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    out = {
        "python": platform.python_version(),
        "versions": {name: version(name) for name in packages},
        "backend": jax.default_backend(),
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind} for d in devices],
        "card": devices[0].device_kind,
        "device_memory_gib": round(stats.get("bytes_limit", 0) / 2**30, 1) or None,
        "torch_cuda": torch.version.cuda,
        "torch_sees_gpu": torch.cuda.is_available(),
        "data_packages_installed": {
            name: installed(name) for name in ("grain", "tensorflow_datasets", "tensorboardX")
        },
    }
    if not ctx["cpu"] and out["backend"] == "cpu":
        ctx["partial"](out)  # the versions say why
        raise RuntimeError("no accelerator: JAX runs on the CPU (run with --cpu for the CPU mode)")
    return out


def section_peak(ctx: dict) -> dict:
    """bf16 and fp32 matmul peaks measured here, and the data-sheet bf16 peak."""
    import jax

    from insightv_jax.train.metrics import measure_matmul_peak, nominal_bf16_peak

    n = 256 if ctx["cpu"] else 8192  # a GPU needs ~1 TFLOP a product for its launch to be noise
    bf16 = measure_matmul_peak("bfloat16", n=n, reps=10)
    fp32 = measure_matmul_peak("float32", n=n, reps=10)
    with jax.default_matmul_precision("highest"):
        fp32_highest = measure_matmul_peak("float32", n=n, reps=10)
    ctx["peak"] = bf16
    nominal = nominal_bf16_peak(jax.devices()[0].device_kind)
    return {
        "n": n,
        "bf16_tflops": round(bf16 / 1e12, 2),
        "fp32_default_tflops": round(fp32 / 1e12, 2),
        "fp32_highest_tflops": round(fp32_highest / 1e12, 2),
        "nominal_bf16_tflops": round(nominal / 1e12, 1) if nominal else None,
        "bf16_measured_over_nominal": round(bf16 / nominal, 3) if nominal else None,
    }


def section_train(ctx: dict) -> dict:
    """`bench train` at the check's size (toy on a CPU), the peer uncompiled;
    one model at a time, so that one failing (out of memory, say) leaves the
    other measured."""
    from insightv_jax.hf.peer import torch_device
    from insightv_jax.train.benchmark import bench_train, release

    seconds, steps = (0.0, 1) if ctx["cpu"] else (2.0, 3)  # on a CPU: the code path only
    out, errors = {}, []
    for name in ("decoder", "vlm"):
        try:
            out.update(bench_train(seconds, False, ctx["size"], ctx["overrides"], ctx.get("peak"),
                                   steps=steps, names=[name]))  # fmt: skip
            ctx["peak"] = out["matmul_peak_gflops"] * 1e9  # measured once
        except Exception as e:
            out[name] = {"error": _one_line(e)}
            errors.append(f"{name}: {_one_line(e)}")
            release(torch_device())
        ctx["partial"](out)
    if errors:
        out["error_summary"] = "; ".join(errors)
    return out


def section_sample(ctx: dict) -> dict:
    """`bench sample` at the check's size: decode at batch 1 and 8 vs generate."""
    from insightv_jax.bench import bench_sample

    return bench_sample(ctx["size"], progress=ctx["partial"])


def section_parity(ctx: dict) -> dict:
    """fp32 logits of the check's decoder and VLM cut to two layers each, ours
    against transformers holding the same weights."""
    from insightv_jax.hf.peer import logits_parity, torch_device
    from insightv_jax.models.factory import construct
    from insightv_jax.train.benchmark import size_configs

    layers = ["model.decoder.num_layers=2", "model.vision.num_layers=2"]
    out = {"dtype": "float32", "layers": 2}
    for name, cfg in size_configs(ctx["size"], FP32 + layers + ctx["overrides"]).items():
        model = construct(cfg.model, seed=0)
        out[name] = logits_parity(model, cfg.model, torch_device())
        del model
    # transformers' own fp32 differs from ours by reduction order: 1e-4 is what the
    # CPU parity tests allow, at logits of this size
    out["ok_highest"] = all(out[k]["max_abs_diff_highest"] <= 1e-4 for k in ("decoder", "vlm"))
    return out


def section_tests(ctx: dict) -> dict:
    """pytest on `ctx["tests"]` with JAX on the accelerator (fp32 products at
    the highest precision, as the tests' tolerances assume); counts from the
    verbose report, so a run stopped at its limit still counts what finished."""
    import re

    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    if not ctx["cpu"]:
        env["JAX_PLATFORMS"] = "cuda,cpu"  # tests/conftest.py keeps a platform that is set
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *ctx["tests"]]
    limit = max(10.0, ctx["deadline"] - time.time() - 5)  # its counts, before the guard ends it
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        text, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, timed_out = None, True
    results = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M)
    counts = {k.lower(): sum(r == k for _, r in results) for k in ("PASSED", "FAILED", "SKIPPED")}
    counts["errors"] = sum(r == "ERROR" for _, r in results)
    out = {
        "files": list(ctx["tests"]),
        **counts,
        "failed_tests": [t for t, r in results if r in ("FAILED", "ERROR")],
        "returncode": rc,
        "timed_out": timed_out,
        "tail": text.strip().splitlines()[-25:],
    }
    if timed_out or rc not in (0, 5) or counts["failed"] or counts["errors"]:
        out["error_summary"] = f"{counts['failed']} failed, {counts['errors']} errors" + (
            f", stopped after {limit:.0f} s" if timed_out else ""
        )
    return out


RUN = {
    "env": section_env,
    "peak": section_peak,
    "train": section_train,
    "sample": section_sample,
    "parity": section_parity,
    "tests": section_tests,
}


# ---------------------------------------------------------------- records


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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


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
            error, tb = _one_line(e), traceback.format_exc().strip().splitlines()[-12:]
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
    p = argparse.ArgumentParser(prog="device_check", description=__doc__.splitlines()[0])
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
