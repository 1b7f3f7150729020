"""A model-only install: the model, training and sampling code import and run
without the data pipeline's packages (grain, tensorflow-datasets, tensorboardX),
as on an accelerator image that lacks them (launch/device_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter started with tests/model_only/ on PYTHONPATH: its
# sitecustomize refuses the data packages before anything is imported, so a
# module that imports one at its top fails.
CHILD = textwrap.dedent(
    """
    import json, sys

    BLOCKED = {"grain", "tensorflow_datasets", "tfds", "tensorboardX"}
    refused = []
    for name in sorted(BLOCKED):
        try:
            __import__(name)
        except ImportError:
            refused.append(name)

    import numpy as np

    import insightv_jax.models.factory as factory
    import insightv_jax.sample.sampler as sampler_mod
    import insightv_jax.train.benchmark  # the device check's training path
    import insightv_jax.train.steps  # noqa: F401
    import insightv_jax.train.trainer  # noqa: F401
    from insightv_jax.config import load_config
    from insightv_jax.train.toy_data import TOY_MODEL

    cfg = load_config(None, TOY_MODEL)
    model = factory.construct(cfg.model, seed=0)
    logits = model(np.arange(1, 9, dtype=np.int32)[None])
    s = sampler_mod.Sampler(model, pad_id=0)
    out = s.generate([[1, 2, 3]], sampler_mod.SamplingParams(max_new_tokens=4))

    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({
        "refused": refused,
        "loaded": loaded,
        "logits_shape": list(logits.shape),
        "sampled": len(out[0]["tokens"]),
        "finite": bool(np.isfinite(np.asarray(logits)).all()),
    }))
    """
)


def test_model_training_and_sampling_import_without_data_packages():
    path = os.pathsep.join([str(ROOT / "tests" / "model_only"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # the finder did refuse every package, so nothing below could have used one
    assert got["refused"] == ["grain", "tensorboardX", "tensorflow_datasets", "tfds"]
    assert got["loaded"] == []
    assert got["logits_shape"] == [1, 8, 64]
    assert got["sampled"] == 4
    assert got["finite"]
