"""The demo's stage list and presets (configs/demo/<preset>.yaml)."""

from __future__ import annotations

from pathlib import Path

from insightv_jax.config import ConfigError, deep_merge, read_with_includes

STAGES = ("synth", "tokenizer", "base", "data", "agents", "chains", "summary", "dpo", "rl",
          "eval", "export")  # fmt: skip
AGENTS = ("cot", "reason")  # trained side by side, with the same schedule
REPO = Path(__file__).resolve().parents[2]
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def one_thread_env(env: dict) -> dict:
    """`env` with XLA:CPU limited to one thread (a subprocess that shares the cores)."""
    return {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD}".strip()}


def preset_path(preset: str) -> Path:
    """configs/demo/<preset>.yaml (or a path to a preset file)."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        return path
    path = REPO / "configs" / "demo" / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: demo preset {preset!r} not found")
    return path


def load_preset(preset: str, overrides: dict | None = None) -> dict:
    """The preset as a dict (relative config paths resolved), `overrides` merged in."""
    path = preset_path(preset)
    # bad YAML: a one-line ConfigError; `include:` extends another preset
    spec = deep_merge(read_with_includes(path), overrides or {})
    for key in ("sft_config", "suite", "pipeline", "eval", "base"):
        if key not in spec:
            raise ConfigError(f"{path}: demo preset has no '{key}' section")
    sft = Path(spec["sft_config"])
    spec["sft_config"] = str(sft if sft.is_absolute() else (path.parent / sft).resolve())
    return spec
