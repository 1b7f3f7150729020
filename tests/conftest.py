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


# The longest test files (seconds of test time on CI's 2 cores), collected first. `make
# test` runs `--dist loadfile --no-loadscope-reorder`: each worker takes the next file in
# collection order, so the long ones start early and the short ones fill in around them
# (xdist's default order, most tests first, left the demo's single test until last while
# the other worker idled).
LONGEST_FIRST = (
    "test_demo.py", "test_quickstart.py", "test_attention.py", "test_train_resume.py",
    "test_sampler.py", "test_dpo_iterate.py", "test_serve.py", "test_rl_toy.py",
    "test_rl_loop.py", "test_device_check.py", "test_train_steps.py", "test_vlm_sampling.py",
    "test_train_multihost.py", "test_constrain.py", "test_qwen_vl_train.py", "test_dpo_step.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session", autouse=True)
def small_matmul_peak():
    """Training runs report MFU against a matmul peak they measure on 2048-cubed
    products, one per device (~6 s on the 8 fake devices, each time). In-process
    test runs measure it on 256-cubed ones, once per dtype and device count: the
    MFU path still runs, without the benchmark's seconds in every training test.
    Session-scoped, so the session and module fixtures that train see it too."""
    from insightv_jax.train import metrics, trainer

    peaks = {}

    def small(dtype="float32", n=2048, reps=5, mesh=None):
        key = (str(dtype), None if mesh is None else mesh.devices.size)
        if key not in peaks:
            peaks[key] = metrics.measure_matmul_peak(dtype, n=256, reps=2, mesh=mesh)
        return peaks[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "measure_matmul_peak", small)
        yield


@pytest.fixture(scope="session")
def eight_devices():
    devices = jax.devices()
    if jax.default_backend() != "cpu" and len(devices) < 8:  # the device check, on one GPU
        pytest.skip(f"needs 8 devices; {jax.default_backend()} has {len(devices)}")
    assert len(devices) == 8, "tests expect 8 fake CPU devices (see conftest.py)"
    return devices


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` fills once per test session, shared by the xdist
    workers (the first to take the lock builds it; the others wait and read it),
    for session fixtures that train or write what their tests only read."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:  # no xdist: this process is the session
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name  # the session's, beside gw0, gw1
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def micro_llava_agent(tmp_path_factory):
    """(data root, run dir): the tiny LLaVA preset trained by `insightv sft` for
    30 steps on 64 synthetic questions (mesh data 4 x fsdp 2), once a session
    for the tests that need a trained agent with our tokenizer (they only read it)."""

    def build(root):
        from insightv_jax import cli
        from insightv_jax.data import conversation as conv
        from insightv_jax.data.sources import open_source
        from insightv_jax.data.synthetic.writer import write_llava

        write_llava(root / "d", 64, seed=0)
        records = open_source(root / "d" / "train.json").records
        corpus = [t["value"] for r in records for t in r["conversations"]]
        conv.build_tokenizer(corpus * 2, root / "tok", template="minimal", vocab_size=508)
        args = [
            "sft", "--config", "configs/sft/tiny-synthetic.yaml",
            f"train.data={root / 'd' / 'train.json'}", f"train.tokenizer={root / 'tok'}",
            f"train.workdir={root / 'run'}", "train.steps=30", "train.global_batch=16",
            "train.log_every=10", "train.checkpoint_every=0", "mesh.fsdp=2", "mesh.data=4",
        ]  # fmt: skip
        assert cli.main(args) == 0

    root = built_once(tmp_path_factory, "micro_llava_agent", build)
    return root, root / "run"


@pytest.fixture(scope="session")
def qwen_vl_models(tmp_path_factory):
    """{family: (transformers model, ours, folder)} for qwen2_vl and qwen2_5_vl:
    `hf_models.build_qwen_vl`'s tiny random models saved with `save_pretrained`
    into `folder` and loaded by `hf.qwen_vl.load_pretrained`, once a session
    for the Qwen-VL parity, decoding and export tests (none changes them)."""
    from hf_models import build_qwen_vl

    from insightv_jax.hf.qwen_vl import load_pretrained

    out = {}
    for family in ("qwen2_vl", "qwen2_5_vl"):
        hf = build_qwen_vl(family)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        out[family] = (hf, load_pretrained(folder), folder)
    return out
