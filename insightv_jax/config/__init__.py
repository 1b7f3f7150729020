"""Typed, frozen configuration: dataclasses loaded from YAML with `key=value` overrides.

Every section is a frozen dataclass that lives beside its stage's concerns
(model.py, train.py, data.py, pipeline.py, eval.py, dpo.py, rl.py; run.py holds the
top-level `RunConfig` and the mesh). `from_dict` (coerce.py) checks every key and
type and fails with a one-line `ConfigError` that names the offending key, so a
typo in a YAML file or on the command line never silently becomes a default;
io.py reads YAML (with `include:`), applies overrides and saves configs.

Import from here: `from insightv_jax.config import RunConfig, load_config`.
"""

from insightv_jax.config.base import DTYPES, ConfigError
from insightv_jax.config.coerce import from_dict, to_dict
from insightv_jax.config.data import DataConfig
from insightv_jax.config.dpo import DPOConfig
from insightv_jax.config.eval import (
    DECODINGS,
    BenchmarkConfig,
    EvalConfig,
    EvalSampling,
    SystemConfig,
)
from insightv_jax.config.io import (
    apply_overrides,
    deep_merge,
    load_config,
    read_with_includes,
    read_yaml,
    save_yaml,
)
from insightv_jax.config.model import (
    DecoderConfig,
    LlavaConfig,
    ModelConfig,
    QwenVLConfig,
    RopeScaling,
    VisionConfig,
)
from insightv_jax.config.pipeline import SUMMARY_MIX_KEYS, PipelineConfig
from insightv_jax.config.qwen_vision import QwenVisionConfig
from insightv_jax.config.rl import RLConfig
from insightv_jax.config.run import MeshConfig, RunConfig
from insightv_jax.config.train import TRAINABLE_PARTS, TrainConfig

# The public home of these types stays `insightv_jax.config`: messages that name a
# type (`model.vision: 5 is not a insightv_jax.config.VisionConfig | None`) and
# pickles read the same as before the sections had modules of their own.
for _cls in (
    ConfigError, RopeScaling, DecoderConfig, MeshConfig, VisionConfig, LlavaConfig, ModelConfig,
    QwenVisionConfig, QwenVLConfig,
    TrainConfig, DataConfig, PipelineConfig, BenchmarkConfig, SystemConfig, EvalSampling,
    EvalConfig, DPOConfig, RLConfig, RunConfig,
):  # fmt: skip
    _cls.__module__ = __name__
del _cls

__all__ = [
    "DECODINGS",
    "DTYPES",
    "SUMMARY_MIX_KEYS",
    "TRAINABLE_PARTS",
    "BenchmarkConfig",
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "DecoderConfig",
    "EvalConfig",
    "EvalSampling",
    "LlavaConfig",
    "MeshConfig",
    "ModelConfig",
    "PipelineConfig",
    "QwenVLConfig",
    "QwenVisionConfig",
    "RLConfig",
    "RopeScaling",
    "RunConfig",
    "SystemConfig",
    "TrainConfig",
    "VisionConfig",
    "apply_overrides",
    "deep_merge",
    "from_dict",
    "load_config",
    "read_with_includes",
    "read_yaml",
    "save_yaml",
    "to_dict",
]
