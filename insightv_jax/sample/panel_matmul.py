"""A native fp32 matmul for the few-row products of a CPU decode step.

A decode step multiplies one row per sequence by every weight matrix, so it is
bound by reading the weights. XLA:CPU's matmul (Eigen; XNNPACK, YNNPACK and
oneDNN alike) streams a weight through a few rows well below the rate at which
an XLA sum reads memory; `insightv bench sample` prints both rates (results in
docs/benchmarks.md). `panel_matmul.cc` reads the weight packed in 48-column
panels, each panel one contiguous run of memory, with every core, for the same
products to float rounding.

It is an XLA FFI custom call, compiled on first use by the machine's C++
compiler (`-march=native`) into the user's cache. `decode_transform` packs the
weights only where it applies: the CPU backend, fp32 weights on one device, an
x86-64 CPU with AVX-512; its packed modules then use it for products of at most
8 rows (decode steps), and XLA's matmul for the rest (prefill). Where it cannot
be built, decoding keeps XLA's matmul. `INSIGHTV_PANEL_MATMUL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

PANEL = 48  # columns per panel (3 AVX-512 vectors)
MAX_ROWS = 8  # rows whose outputs stay in registers
ENV_SWITCH = "INSIGHTV_PANEL_MATMUL"
_TARGET = "insightv_panel_matmul"
_SOURCE = Path(__file__).with_name("panel_matmul.cc")


class PackedWeight(nnx.Variable):
    """A (D, F) weight packed as (ceil(F / 48), D, 48) for `matmul`: a decode-time
    copy made by `decode_transform`, never trained or saved."""


@functools.cache
def available() -> bool:
    """Whether the kernel can run here (built and registered on first call)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if jax.default_backend() != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"panel matmul not built: {_reason(e)}; decoding uses XLA's matmul", stacklevel=2
        )
        return False
    if not lib.insightv_panel_matmul_supported():  # compiled without AVX-512
        return False
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.insightv_panel_matmul), "cpu")
    return True


def _build() -> Path:
    """The compiled kernel, cached per source, JAX version and CPU."""
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(f"{jax.__version__} {include} {_cpu_flags()}".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "insightv_jax"
    out = cache / f"panel_matmul-{key.hexdigest()[:16]}.so"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        cxx = os.environ.get("CXX", "c++")
        flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
        subprocess.run(
            [cxx, *flags, f"-I{include}", str(_SOURCE), "-o", str(tmp)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(tmp, out)  # atomic: parallel processes may build at once
    return out


def _reason(error: Exception) -> str:
    """One line on why the build failed: the compiler's first error, if any."""
    if isinstance(error, subprocess.CalledProcessError):
        lines = (error.stderr or b"").decode(errors="replace").splitlines()
        first = next((ln for ln in lines if "error" in ln), lines[0] if lines else "")
        return f"{error.cmd[0]} exited with {error.returncode}" + (
            f" ({first.strip()})" if first else ""
        )
    return str(error)


def _cpu_flags() -> str:
    """The CPU's model and feature flags (a `-march=native` build runs only there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def pack(w: jax.Array) -> jax.Array:
    """(D, F) fp32 -> (ceil(F/48), D, 48): columns in panels, zero-padded."""
    d, f = w.shape
    panels = -(-f // PANEL)
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - f)))
    return w.reshape(d, panels, PANEL).transpose(1, 0, 2)


def applies(rows: int) -> bool:
    """Whether a product of `rows` rows runs on the kernel (decided at trace
    time): at most 8 rows, and no multi-device mesh partitioning the program."""
    mesh = jax.sharding.get_abstract_mesh()
    return rows <= MAX_ROWS and (mesh is None or mesh.empty or mesh.size == 1)


def matmul(x: jax.Array, packed: jax.Array, features: int) -> jax.Array:
    """x (M <= 8, D) fp32 @ the packed (D, F) weight -> (M, features)."""
    rows, panels = x.shape[0], packed.shape[0]
    out = jax.ShapeDtypeStruct((rows, panels * PANEL), jnp.float32)
    y = jax.ffi.ffi_call(_TARGET, out)(x, packed)
    return y if features == panels * PANEL else y[:, :features]
