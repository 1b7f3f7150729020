"""The device check (launch/device_check.sh, insightv_jax/device_check/): its
CPU mode runs every section at toy sizes and writes one JSON file per section;
its guard records a section that overruns or kills the worker and goes on.

The CPU mode runs as on the GPU image, with grain, tensorflow-datasets and
tensorboardX refused (tests/model_only/sitecustomize.py): it is also the
model-only install's test, since its sections import, build, train and sample
the models through the same code a training run uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from insightv_jax.device_check import guard
from insightv_jax.device_check.sections import SECTIONS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cpu_mode_writes_one_json_per_section(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    # as on the GPU image: no grain, tensorflow-datasets or tensorboardX (tests/model_only/)
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT / "tests" / "model_only"))
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "device_check.sh"), "--cpu", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = {n: json.loads((out / f"{n}.json").read_text()) for n in SECTIONS}
    failed = {n: s["error"] for n, s in rows.items() if not s["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:])
    assert {p.name for p in out.iterdir()} == {f"{n}.json" for n in SECTIONS} | {
        "summary.json",
        "device_check.log",
    }
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and list(summary["sections"]) == list(SECTIONS)
    assert all(s["mode"] == "cpu" and s["seconds"] > 0 for s in rows.values())

    env_, peak = rows["env"], rows["peak"]
    assert env_["backend"] == "cpu" and env_["versions"]["jax"] and env_["card"]
    assert not any(env_["data_packages_installed"].values())  # the check ran without them
    assert peak["bf16_tflops"] > 0 and peak["nominal_bf16_tflops"] is None  # no data sheet

    train = rows["train"]
    assert train["size"] == "toy" and train["peer_device"] == "cpu"
    for model in ("decoder", "vlm"):
        row = train[model]
        assert row["dtype"] == "bfloat16"
        assert row["jax_tokens_per_s"] > 0 and row["torch_eager_tokens_per_s"] > 0
        assert row["ratio_vs_eager"] > 0 and 0 < row["jax_mfu"]
        # both sides start from random weights on the same batch: an LM loss near ln(512)
        assert abs(row["jax_loss"] - row["torch_loss"]) < 0.5, row

    sample = rows["sample"]
    for batch in (1, 8):
        row = sample[f"batch_{batch}"]
        assert row["decode_tokens_per_s"] > 0 and row["hf_decode_tokens_per_s"] > 0

    parity = rows["parity"]
    assert parity["ok_highest"]
    for model in ("decoder", "vlm"):
        assert parity[model]["max_abs_diff_highest"] <= 1e-4 < parity[model]["max_abs_logit"]

    tests = rows["tests"]
    assert tests["passed"] >= 1 and tests["failed"] == 0 and tests["errors"] == 0


class _Stand(guard._Check):
    """The guard watching a stand-in worker: `script` runs with the sections
    left as its argument, as the worker would run them."""

    script = ""

    def worker_command(self):
        return [sys.executable, "-c", self.script, ",".join(self.left)]


def _check(tmp_path, script: str, budget: float):
    args = guard.parse(["--out", str(tmp_path), "--cpu", "--budget", str(budget)])
    check = _Stand(args)
    check.script = script
    return check.run()


def test_guard_records_an_overrun_then_skips_the_rest_when_env_fails(tmp_path):
    # env starts and never ends: killed at its guard (the budget, 4 s, + 2 s of grace)
    script = f"import time; print('{guard.MARK} start env', flush=True); time.sleep(60)"
    summary = _check(tmp_path, script, budget=4)
    assert summary["ok"] is False
    assert summary["sections"]["env"]["error"] == "timed out after 4 s"
    assert summary["seconds"] < 30
    for name in SECTIONS[1:]:
        row = json.loads((tmp_path / f"{name}.json").read_text())
        assert row["ok"] is False and row["error"] == "skipped: the env section failed"


def test_guard_records_a_dead_worker_keeps_its_partial_figures_and_goes_on(tmp_path):
    # env passes; peak writes a partial record, then the worker dies; the worker
    # started again for the sections left dies before it starts one
    mark = guard.MARK
    script = "\n".join(
        [
            "import sys",
            "from pathlib import Path",
            "from insightv_jax.device_check.guard import record",
            f"out, left = Path({str(tmp_path)!r}), sys.argv[1].split(',')",
            "if left[0] == 'env':",
            f"    print('{mark} start env', flush=True)",
            "    record(out, 'env', 'cpu', 0.1, {'backend': 'cpu'})",
            f"    print('{mark} done env', flush=True)",
            f"    print('{mark} start peak', flush=True)",
            "    record(out, 'peak', 'cpu', 0.1, {'bf16_tflops': 1.0, 'partial': True}, 'cut')",
            "print('out of memory', file=sys.stderr, flush=True)",
            "sys.exit(3)",
        ]
    )
    summary = _check(tmp_path, script, budget=60)
    assert summary["sections"]["env"] == {"ok": True, "seconds": 0.1, "error": None}
    peak = json.loads((tmp_path / "peak.json").read_text())
    assert peak["ok"] is False and peak["error"] == "worker died (exit 3): out of memory"
    assert peak["bf16_tflops"] == 1.0  # what it measured before it died
    assert list(summary["sections"]) == list(SECTIONS)
    for name in SECTIONS[2:]:
        assert summary["sections"][name]["error"] == "worker died (exit 3): out of memory"


def test_bench_size_is_for_train_and_sample_only(capsys):
    from insightv_jax import cli

    assert cli.main(["bench", "dpo", "--size", "toy"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: bench dpo takes no --size (only sample, train)"


def test_without_an_accelerator_env_fails_and_the_rest_is_skipped(tmp_path):
    assert guard.main(["--out", str(tmp_path), "--sections", "env,peak"]) == 1
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["ok"] is False and env["error"].startswith("RuntimeError: no accelerator")
    assert env["backend"] == "cpu" and env["versions"]["jaxlib"]  # what was found, kept
    peak = json.loads((tmp_path / "peak.json").read_text())
    assert peak["error"] == "skipped: the env section failed"
