"""Checkpoint/resume: SIGKILL + resume is bit-identical (same data order), SIGTERM
writes a final checkpoint, restore onto 8 -> 4 -> 1 devices continues, and a
corrupt latest checkpoint falls back to the previous one."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from insightv_jax.config import MeshConfig
from insightv_jax.parallel import make_mesh
from insightv_jax.train.toy_data import toy_batches, toy_run_config
from insightv_jax.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
COMMON = ("train.steps=12", "train.checkpoint_every=4", "train.keep=3")


def _digest(batch) -> str:
    return hashlib.sha1(np.ascontiguousarray(batch["input_ids"]).tobytes()).hexdigest()[:12]


def _run(workdir, mesh, *, stop_at=None, overrides=()):
    """Train (resuming if possible); returns (result, {step: batch digest}, printed lines)."""
    digests, lines = {}, []

    def on_step(step, metrics, batch, state):
        digests[step] = _digest(batch)
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # a real preemption signal

    cfg = toy_run_config(str(workdir), *COMMON, *overrides)
    trainer = Trainer(
        cfg, toy_batches(), mesh=mesh, on_step=on_step, print_fn=lines.append, measure_peak=False
    )
    try:
        result = trainer.run()
    finally:
        trainer.close()
    return result, digests, lines


@pytest.fixture(scope="module")
def reference(tmp_path_factory, eight_devices):
    """An uninterrupted 12-step run on 8 devices (fsdp 4 × tensor 2)."""
    workdir = tmp_path_factory.mktemp("reference")
    result, digests, _ = _run(workdir, make_mesh(MeshConfig(1, 4, 2)))
    assert result.step == 12 and result.start_step == 0
    return workdir, np.array(result.losses), digests


WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from insightv_jax.config import MeshConfig
from insightv_jax.parallel import make_mesh
from insightv_jax.train.toy_data import toy_batches, toy_run_config
from insightv_jax.train.trainer import Trainer

def on_step(step, metrics, batch, state):
    if step == 6:  # checkpoint 4 is committed, steps 5-6 are lost
        trainer.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)

cfg = toy_run_config({workdir!r}, *{common!r})
trainer = Trainer(cfg, toy_batches(), mesh=make_mesh(MeshConfig(1, 4, 2)), on_step=on_step,
                  measure_peak=False)
trainer.run()
"""


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    _, ref_losses, ref_digests = reference
    workdir = tmp_path / "killed"
    script = WORKER.format(
        root=str(ROOT),
        cache=os.environ["JAX_COMPILATION_CACHE_DIR"],
        workdir=str(workdir),
        common=COMMON,
    )
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    result, digests, lines = _run(workdir, make_mesh(MeshConfig(1, 4, 2)))
    assert result.start_step == 4 and result.step == 12
    assert any("resumed from" in line for line in lines)
    np.testing.assert_array_equal(np.array(result.losses), ref_losses[4:])  # bit-identical
    assert digests == {s: ref_digests[s] for s in range(5, 13)}  # same data order


def test_sigterm_checkpoint_and_restore_on_8_4_1_devices(reference, tmp_path):
    _, ref_losses, ref_digests = reference
    workdir = tmp_path / "remesh"
    devices = jax.devices()
    r8, d8, lines = _run(workdir, make_mesh(MeshConfig(1, 4, 2)), stop_at=4)
    assert r8.preempted and r8.step == 4
    assert any("SIGTERM" in line for line in lines)
    r4, d4, _ = _run(workdir, make_mesh(MeshConfig(1, 2, 2), devices[:4]), stop_at=8)
    assert r4.start_step == 4 and r4.step == 8
    gate = r4.state["params"]["layers"]["mlp"]["gate_proj"]
    assert gate.addressable_shards[0].data.shape == (2, 16, 32)  # resharded onto 2×2
    r1, d1, _ = _run(workdir, make_mesh(MeshConfig(1, 1, 1), devices[:1]))
    assert r1.start_step == 8 and r1.step == 12
    losses = np.array(r8.losses + r4.losses + r1.losses)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert {**d8, **d4, **d1} == ref_digests


def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path, capfd):
    ref_dir, ref_losses, _ = reference
    workdir = tmp_path / "corrupt"
    import shutil

    shutil.copytree(ref_dir, workdir)
    ckpts = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8, 12]
    data = [p for p in (ckpts / "12" / "model").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for f in data:  # truncate the array data files
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capfd.readouterr()
    result, _, lines = _run(workdir, make_mesh(MeshConfig(1, 4, 2)))
    # one line names the corrupt step, its file and the step used instead
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1, lines
    assert "checkpoint step 12 does not restore" in warnings[0], warnings
    assert "truncated checkpoint data file" in warnings[0] and "resuming from step 8" in warnings[0]
    # checked before orbax reads: none of its asyncio tracebacks follow (ISSUE #28)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Task exception" not in err, err[-2000:]
    assert (ckpts / "12.corrupt").is_dir()
    assert result.start_step == 8 and result.step == 12
    np.testing.assert_array_equal(np.array(result.losses), ref_losses[8:])
