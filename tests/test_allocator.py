"""The CLI re-executes itself with mimalloc preloaded (insightv_jax/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from insightv_jax.allocator import allocator_library

# After the re-exec this code runs again, in the new process image.
PROBE = (
    "from insightv_jax.allocator import reexec_with_allocator as r; r(); "
    "print('mimalloc' in open('/proc/self/maps').read())"
)


def _probe(**env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "INSIGHTV_MALLOC")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**full, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


needs_mimalloc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or allocator_library() is None,
    reason="the cmeel-mimalloc wheel is a Linux dependency",
)


@needs_mimalloc
def test_reexec_preloads_mimalloc_once():
    assert _probe() == "True"


@needs_mimalloc
def test_system_choice_keeps_glibc():
    assert _probe(INSIGHTV_MALLOC="system") == "False"


def test_missing_allocator_library_is_a_one_line_error(tmp_path):
    missing = tmp_path / "libnothing.so"
    env = {**os.environ, "INSIGHTV_MALLOC": str(missing)}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run(
        [sys.executable, "-m", "insightv_jax.cli", "--help"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: INSIGHTV_MALLOC={missing}: no such allocator library"
