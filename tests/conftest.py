"""Test setup: 8 fake CPU devices (set before jax is imported), a compilation
cache shared by this session's processes, and shared fixtures for tiny Hugging
Face reference models."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

# A fresh cache per test session, shared with the subprocesses the tests start
# (they read JAX_COMPILATION_CACHE_DIR). Not kept across sessions: executables
# reloaded from an earlier session's cache aborted the CPU runtime mid-step.
_CACHE = tempfile.mkdtemp(prefix="insightv-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

try:  # grain workers read absl flags
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover - absl always ships with jax
    pass

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def eight_devices():
    devices = jax.devices()
    assert len(devices) == 8, "tests expect 8 fake CPU devices (see conftest.py)"
    return devices
