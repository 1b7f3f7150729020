"""Two processes × 4 CPU devices (jax.distributed, gloo collectives on 127.0.0.1)
train the same steps as one process × 8 devices: same losses, and the orbax
checkpoint is written by both processes (per-process data-iterator state)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from insightv_jax.config import MeshConfig
from insightv_jax.parallel import make_mesh
from insightv_jax.train.toy_data import toy_batches, toy_run_config
from insightv_jax.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
COMMON = ("train.steps=6", "train.checkpoint_every=0", "train.micro_batches=2")

WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from insightv_jax.parallel import initialize_distributed, make_mesh
from insightv_jax.config import MeshConfig
initialize_distributed()
assert jax.process_count() == 2 and len(jax.devices()) == 8
from insightv_jax.train.toy_data import toy_batches, toy_run_config
from insightv_jax.train.trainer import Trainer
cfg = toy_run_config({workdir!r}, *{common!r})
trainer = Trainer(cfg, toy_batches(), mesh=make_mesh(MeshConfig(1, 4, 2)), measure_peak=False)
result = trainer.run()
trainer.close()
with open({out!r} + str(jax.process_index()), "w") as f:
    json.dump(result.losses, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, eight_devices):
    port = _free_port()
    script = WORKER.format(
        root=str(ROOT),
        cache=os.environ["JAX_COMPILATION_CACHE_DIR"],
        workdir=str(tmp_path / "multi"),
        common=COMMON,
        out=str(tmp_path / "losses"),
    )
    procs = []
    for pid in range(2):
        env = {
            **__import__("os").environ,
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
            "JAX_PLATFORMS": "cpu",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(script)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    cfg = toy_run_config(str(tmp_path / "single"), *COMMON)
    trainer = Trainer(cfg, toy_batches(), mesh=make_mesh(MeshConfig(1, 4, 2)), measure_peak=False)
    single = trainer.run().losses
    trainer.close()

    for pid in range(2):
        multi = json.loads((tmp_path / f"losses{pid}").read_text())
        np.testing.assert_allclose(multi, single, rtol=1e-5)
    data = tmp_path / "multi" / "checkpoints" / "6" / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # each process checkpointed its own shard's iterator position
    assert json.loads((data / "process_1-of-2.json").read_text())
