"""ArrayRecord output through a tensorflow-datasets builder (no TensorFlow needed).

Read it back with `tfds.builder_from_directory(dir).as_data_source(split)` or
`insightv_jax.data.sources.ArrayRecordSource`. Structured fields (conversations,
scene, query) are stored as JSON text; the image as PNG bytes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tensorflow_datasets as tfds

from insightv_jax.data.synthetic.generate import SPLITS, generate_splits
from insightv_jax.data.synthetic.scenes import DEFAULT_KNOBS, Knobs
from insightv_jax.data.synthetic.writer import item_png, to_record

JSON_FIELDS = ("conversations", "scene", "query")


@dataclasses.dataclass
class SynthConfig(tfds.core.BuilderConfig):
    n: int = 100
    seed: int = 0
    knobs: Knobs = dataclasses.field(default_factory=Knobs)
    weights: dict | None = None


class InsightvSynthetic(tfds.core.GeneratorBasedBuilder):
    """The procedural visual-reasoning suite as a tfds dataset."""

    VERSION = tfds.core.Version("1.0.0")

    # tfds looks for a checksums file next to the builder's code through
    # `importlib_resources`, which is not installed; this builder downloads nothing.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        text = {k: tfds.features.Text() for k in ("id", "question", "answer", "family")}
        text.update({k: tfds.features.Text() for k in JSON_FIELDS})
        features = tfds.features.FeaturesDict(
            {**text, "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png")}
        )
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        cfg: SynthConfig = self.builder_config
        splits = generate_splits(cfg.n, cfg.seed, cfg.knobs, cfg.weights)
        return {s: self._generate_examples(splits[s]) for s in SPLITS}

    def _generate_examples(self, items):
        for item in items:
            rec = to_record(item)
            example = {k: rec[k] for k in ("id", "question", "answer", "family")}
            example.update({k: json.dumps(rec[k], sort_keys=True) for k in JSON_FIELDS})
            example["image"] = item_png(item)
            yield item.id, example


def write_arrayrecord(
    out: str | Path, n: int, seed: int, knobs: Knobs = DEFAULT_KNOBS, weights: dict | None = None
) -> Path:
    """Build the dataset under `out`; returns the directory that holds dataset_info.json."""
    tfds.disable_progress_bar()
    cfg = SynthConfig(name=f"n{n}_seed{seed}", n=n, seed=seed, knobs=knobs, weights=weights)
    builder = InsightvSynthetic(data_dir=str(out), config=cfg, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
    )
    return Path(builder.data_dir)
