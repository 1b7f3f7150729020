"""The top-level config of a command (`RunConfig`) and the device mesh."""

import dataclasses

from insightv_jax.config.base import ConfigError
from insightv_jax.config.data import DataConfig
from insightv_jax.config.dpo import DPOConfig
from insightv_jax.config.eval import EvalConfig
from insightv_jax.config.model import ModelConfig
from insightv_jax.config.pipeline import PipelineConfig
from insightv_jax.config.rl import RLConfig
from insightv_jax.config.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. One axis may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The top-level config of a command: model, mesh and the stage sections."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    seed: int = 0

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.pipeline.validate()
        self.eval.validate()
        self.dpo.validate()
        self.rl.validate()
        if self.data.packing and self.model.is_vlm:
            raise ConfigError(
                f"data.packing: model.kind={self.model.kind} lays images in fixed per-row "
                "slots, which cannot hold several records; pack text or Qwen-VL models"
            )
