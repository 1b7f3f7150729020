"""The device check's sections: each takes the run's context (mode, size,
overrides, test files, its deadline, a `partial(result)` callback that keeps
what it measured so far) and returns its figures; an exception is its error,
an `error_summary` key a failure that still has figures (failed tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
ROOT = Path(__file__).resolve().parents[2]


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


def _peer_on_the_accelerator(ctx: dict) -> None:
    """A 1B peer on a CPU would measure nothing worth its minutes: refuse it."""
    from insightv_jax.hf.peer import torch_device

    if not ctx["cpu"] and torch_device() == "cpu":
        raise RuntimeError("torch sees no GPU: the transformers peer would run on the CPU")


def section_train(ctx: dict) -> dict:
    """`bench train` at the check's size (toy on a CPU), the peer uncompiled;
    one model at a time, so that one failing (out of memory, say) leaves the
    other measured."""
    from insightv_jax.hf.peer import torch_device
    from insightv_jax.train.benchmark import bench_train, release

    _peer_on_the_accelerator(ctx)
    seconds, steps = (0.0, 1) if ctx["cpu"] else (2.0, 3)  # on a CPU: the code path only
    out, errors = {}, []
    for name in ("decoder", "vlm"):
        try:
            out.update(bench_train(seconds, False, ctx["size"], ctx["overrides"], ctx.get("peak"),
                                   steps=steps, names=[name]))  # fmt: skip
            ctx["peak"] = out["matmul_peak_gflops"] * 1e9  # measured once
        except Exception as e:
            out[name] = {"error": one_line(e)}
            errors.append(f"{name}: {one_line(e)}")
            release(torch_device())
        ctx["partial"](out)
    if errors:
        out["error_summary"] = "; ".join(errors)
    return out


def section_sample(ctx: dict) -> dict:
    """`bench sample` at the check's size: decode at batch 1 and 8 vs generate."""
    from insightv_jax.bench import bench_sample

    _peer_on_the_accelerator(ctx)
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


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"
