"""How the demo runs SFT jobs (in the process, or side by side as pinned
subprocesses), sends in-process output to its stream, and shares a compile cache."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from insightv_jax.config import RunConfig, from_dict
from insightv_jax.demo.preset import REPO, one_thread_env
from insightv_jax.errors import InsightVError


class SFTJobs:
    """`Demo`'s SFT jobs (a mixin: it uses the demo's `spec`, `ws`, `out` and `say`)."""

    def _sft_jobs(self, jobs: dict[str, dict]) -> None:
        """Run SFT configs; with `parallel` >= 2, side by side as 1-thread
        subprocesses pinned one per core (independent jobs: more throughput than one 2-thread process)."""
        from insightv_jax.train import run_sft

        parallel = int(self.spec.get("parallel", 1))
        cfg_dir = self.ws / "configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        if parallel < 2 or len(jobs) < 2:
            for name, d in jobs.items():
                (cfg_dir / f"{name}.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
                steps = d["train"].get("steps")
                budget = f"{steps} steps" if steps else f"{d['train'].get('epochs', 1)} epoch(s)"
                self.say(f"  sft {name}: {budget}")
                with redirect(self.out):
                    run_sft(from_dict(RunConfig, d))
                check_finished(name, d)
            return
        pending = list(jobs)
        running: dict[int, tuple[str, subprocess.Popen, threading.Thread]] = {}
        failed = []
        while pending or running:
            for core in range(parallel):
                if core not in running and pending:
                    name = pending.pop(0)
                    path = cfg_dir / f"{name}.yaml"
                    path.write_text(yaml.safe_dump(jobs[name], sort_keys=False))
                    running[core] = (name, *self._spawn(name, path, core))
            time.sleep(0.5)
            for core, (name, proc, pump) in list(running.items()):
                if proc.poll() is not None:
                    pump.join()
                    del running[core]
                    if proc.returncode:
                        failed.append(f"{name} (exit {proc.returncode})")
        if failed:
            raise InsightVError(f"demo SFT failed: {', '.join(failed)}; see {self.ws}/logs/")
        for name, d in jobs.items():
            check_finished(name, d)

    def _spawn(self, name: str, path: Path, core: int | None):
        """An `insightv sft` subprocess: one thread pinned to `core`, or (None) all cores."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # progress lines as they come
        cmd = [sys.executable, "-m", "insightv_jax.cli", "sft", "--config", str(path)]
        if core is not None:
            env = one_thread_env(env)
            if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
                cmd = ["taskset", "-c", str(core), *cmd] if has_taskset() else cmd
        logs = self.ws / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        where = "all cores" if core is None else f"core {core}"
        self.say(f"  sft {name}: started on {where}, log {logs / (name + '.log')}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, cwd=str(REPO))  # fmt: skip
        pump = threading.Thread(target=self._pump, args=(name, proc, logs / f"{name}.log"))
        pump.start()
        return proc, pump

    def _pump(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        with open(log, "a") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if line.startswith(("step ", "finished", "error", "Traceback")):
                    self.say(f"  {name} | {line.rstrip()}")


def check_finished(name: str, d: dict) -> None:
    """An SFT stopped early (SIGTERM / preemption) must not count as done."""
    from insightv_jax.checkpoint import latest_step

    steps = int(d["train"].get("steps") or 0)
    if steps and latest_step(d["train"]["workdir"]) < steps:
        raise InsightVError(f"demo SFT {name} stopped before step {steps}; rerun to continue")


def has_taskset() -> bool:
    from shutil import which

    return which("taskset") is not None


class redirect:
    """Send in-process stage output (print) to the demo's stream."""

    def __init__(self, out):
        self.out = out

    def __enter__(self):
        import contextlib

        self._ctx = contextlib.redirect_stdout(self.out)
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@contextlib.contextmanager
def compile_cache(folder: Path):
    """JAX's persistent compilation cache in `folder` while the block runs, for this
    process and the stages it spawns, unless the user chose one already
    (JAX_COMPILATION_CACHE_DIR); the previous setting is restored afterwards.

    The demo's processes compile the same programs again — the model init, the
    SFT steps of agents that share a shape, samplers across DPO rounds and eval —
    and a cached program is the same program, so results do not change."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_dir = jax.config.jax_compilation_cache_dir
    saved_min = jax.config.jax_persistent_cache_min_compile_time_secs
    folder = Path(saved_env[keys[0]] or folder)
    folder.mkdir(parents=True, exist_ok=True)
    # programs that compile in well under a second are cheaper to rebuild than to read
    min_secs = saved_env[keys[1]] or "0.5"
    os.environ.update({keys[0]: str(folder), keys[1]: min_secs})
    cc.set_cache_dir(str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_secs))
    cc.reset_cache()
    try:
        yield folder
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cc.set_cache_dir(saved_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved_min)
        cc.reset_cache()
