"""The `train:` section: supervised fine-tuning (optimiser, schedule, batch, checkpoints)."""

import dataclasses
from typing import Literal

from insightv_jax.config.base import ConfigError

TRAINABLE_PARTS = ("vision", "projector", "llm")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Supervised fine-tuning (the `train:` section): optimiser, schedule, batch,
    checkpointing and logging. Defaults follow docs/method.md.

    Precision is set by the model's `param_dtype` / `dtype` and by
    `master_weights` (docs/design.md, "Precision"). With `master_weights: true`
    every trainable parameter held below fp32 (e.g. `model.decoder.param_dtype:
    bfloat16`) gets an fp32 master copy: the forward and backward read the bf16
    parameters, AdamW's moments are fp32 and the update is applied to the fp32
    copy, which is then rounded back into the bf16 parameters. Without it, bf16
    parameters take bf16 moments and bf16 updates, and updates smaller than half
    a bf16 step of a weight are lost (the loss drifts from fp32 training's).
    Parameters already fp32 need no copy: for them the option changes nothing.
    """

    lr: float = 1e-5
    warmup_fraction: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = 1
    steps: int = 0  # > 0: train exactly this many steps (overrides epochs)
    global_batch: int = 8  # sequences per optimizer step, over all hosts
    micro_batches: int = 1  # gradient accumulation: global_batch split in this many
    seq_len: int = 2048  # padded sequence length (bucket) used by plan and bench
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    trainable: tuple[str, ...] = ("projector", "llm")
    remat: Literal["none", "full", "dots", "dots_no_batch"] | None = None  # None: model's
    master_weights: bool = False  # fp32 master copy + fp32 AdamW state for sub-fp32 params
    loss_chunk: int = 1024  # tokens (per batch shard) per cross-entropy chunk: bounds fp32 logits
    checkpoint_every: int = 500  # steps; 0 = only the final checkpoint
    keep: int = 3  # checkpoints kept
    log_every: int = 10
    workdir: str = "runs/sft"  # the run directory
    init: str | None = None  # model dir, run dir or HF folder; None = random init (preset)
    data: str | None = None  # training data (read by the data loader); None = toy data
    tokenizer: str | None = None  # tokenizer folder when training a preset from scratch
    resume: bool = True  # continue from the latest checkpoint in workdir if there is one

    def validate(self) -> None:
        for part in self.trainable:
            if part not in TRAINABLE_PARTS:
                raise ConfigError(f"train.trainable: {part!r} is not one of {TRAINABLE_PARTS}")
        if self.global_batch < 1 or self.micro_batches < 1:
            raise ConfigError("train.global_batch and train.micro_batches must be >= 1")
        if self.global_batch % self.micro_batches:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by "
                f"train.micro_batches={self.micro_batches}"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.loss_chunk < 1:
            raise ConfigError("train.loss_chunk must be >= 1")
