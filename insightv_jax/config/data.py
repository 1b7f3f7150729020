"""The `data:` section: how the loader reads the training data."""

import dataclasses
from typing import Literal

from insightv_jax.config.base import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How the loader reads the training data (`train.data` names the dataset):
    a .json / .jsonl file or a tfds ArrayRecord directory (see data/loader.py)."""

    split: str = "train"  # split of a tfds directory
    image_root: str | None = None  # None: the dataset file's folder
    max_length: int = 2048  # tokens after <image> expansion; longer records are bad
    buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # padded lengths
    shuffle_seed: int = 0
    workers: int = 0  # grain worker processes (0 = in the training process)
    # In-process read threads and records buffered ahead. grain's default (16 threads,
    # 500 records) busy-polls and steals a CPU-only run's cores; an accelerator host
    # with idle cores can raise both.
    read_threads: int = 1
    prefetch: int = 64
    on_bad_record: Literal["skip", "fail"] = "fail"
    # > 0: batches of records of similar length (less padding), sorted within
    # windows of this many global batches after the seeded shuffle; 0 = off
    group_by_length: int = 0
    # SFT: several records per row of the largest bucket, kept apart by segment
    # ids (data/packing.py): first-fit over `packing_window` open rows
    packing: bool = False
    packing_window: int = 8

    def validate(self) -> None:
        if self.packing and self.group_by_length:
            raise ConfigError(
                "data.packing and data.group_by_length both batch by length; pick one"
            )
        if self.packing_window < 1:
            raise ConfigError(f"data.packing_window={self.packing_window} must be >= 1")
        if self.group_by_length < 0:
            raise ConfigError(f"data.group_by_length={self.group_by_length} must be >= 0")
        if not self.buckets or max(self.buckets) < self.max_length:
            raise ConfigError(
                f"data.buckets={list(self.buckets)} must include a bucket >= "
                f"data.max_length={self.max_length}"
            )
        if self.workers < 0:
            raise ConfigError(f"data.workers={self.workers} must be >= 0")
        if self.read_threads < 0 or self.prefetch < 0:
            raise ConfigError(
                f"data.read_threads={self.read_threads} and data.prefetch={self.prefetch} must be >= 0"
            )
