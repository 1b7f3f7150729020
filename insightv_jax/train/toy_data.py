"""A small deterministic batch source for tests, benchmarks and smoke runs.

Synthetic token sequences in the training batch format (`input_ids`,
`attention_mask`, `labels`), served by a grain pipeline so that the iterator
has real `get_state()` / `set_state()` and resumes exactly (grain is imported
by `toy_batches` alone: the benchmarks take `ToySource`'s rows without it).
Each sample is a "prompt" (unsupervised) followed by an "answer" that
continues a per-sample arithmetic pattern (learnable), then right padding.
"""

from __future__ import annotations

import jax
import numpy as np

from insightv_jax.config import load_config


class ToySource:
    """`n` synthetic samples of length `seq_len` over a `vocab`-token vocabulary."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, int(index)))
        T, V = self.seq_len, self.vocab
        length = int(rng.integers(T // 2, T + 1))
        prompt = int(rng.integers(1, max(2, length // 2)))
        start, stride = (int(x) for x in rng.integers(1, V, size=2))
        ids = np.zeros(T, np.int32)
        ids[:prompt] = rng.integers(1, V, size=prompt)
        ids[prompt:length] = (start + stride * np.arange(length - prompt)) % (V - 1) + 1
        mask = (np.arange(T) < length).astype(np.int32)
        labels = np.where((np.arange(T) >= prompt) & (mask == 1), ids, -100).astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TakeRows:
    """Keep this process's rows of a global batch (rows split in process order);
    a callable, which grain's `map` takes as it takes its own transforms."""

    def __init__(self, index: int, count: int):
        self.index, self.count = index, count

    def __call__(self, batch):
        return {k: np.array_split(v, self.count)[self.index] for k, v in batch.items()}


def toy_batches(
    n: int = 32,
    seq_len: int = 16,
    vocab: int = 64,
    global_batch: int = 8,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """An endless grain iterator of this process's share of each global batch."""
    import grain

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not split over {count} processes")
    ds = grain.MapDataset.source(ToySource(n, seq_len, vocab, seed))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None).batch(global_batch, drop_remainder=True)
    if count > 1:
        ds = ds.map(TakeRows(index, count))
    return iter(ds.to_iter_dataset())


# A tiny decoder for tests and smoke runs (compiles in about a second).
TOY_MODEL = [
    "model.decoder.vocab_size=64",
    "model.decoder.hidden_size=32",
    "model.decoder.intermediate_size=64",
    "model.decoder.num_layers=2",
    "model.decoder.num_heads=4",
    "model.decoder.num_kv_heads=2",
]


def toy_run_config(workdir: str, *overrides: str):
    """A RunConfig for the toy decoder writing to `workdir` (k=v overrides on top)."""
    base = TOY_MODEL + [
        "train.global_batch=8",
        "train.loss_chunk=8",
        "train.lr=1e-2",
        "train.warmup_fraction=0.1",
        "train.log_every=1000",
        f"train.workdir={workdir}",
    ]
    return load_config(None, base + list(overrides))
