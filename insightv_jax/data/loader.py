"""The grain training pipeline: validate, seeded shuffle, per-host shard,
tokenise, pad to length buckets, batch; iterator state for exact resume.

    loader = Loader(source, transform, batch_size=8, buckets=(64, 128), seed=0)
    batch = next(loader)            # dict of numpy arrays (the training-batch contract)
    state = loader.get_state()      # save with the checkpoint ...
    loader.set_state(state)         # ... and resume exactly there

`transform` is any picklable module-level callable `record -> {input_ids (L,),
labels (L,), [pixel_values (I, tiles, 3, H, W), image_sizes (I, 2)]}` (grain
pickles it into workers). Every record is validated up front in the main
process: `on_bad_record="fail"` raises naming the first bad record's id,
`"skip"` leaves bad records out and reports them in `loader.report`.

`group_by_length=K` batches records of similar length (less padding, as HF's
`group_by_length`): after the seeded shuffle, each window of K global batches is
sorted by length and cut into batches, whose order is reshuffled every epoch;
every host pads a step's rows to the same bucket. Without grouping, several hosts
also pad each step to the bucket of the global batch's longest record (the
per-record lengths are measured once at start, as for grouping).

`packing=True` packs several records per row of the largest bucket instead,
kept apart by `segment_ids` with per-record `positions` (`data.packing`: the
plan is fixed once from the lengths, first-fit over `packing_window` open rows;
batches hold `batch_size` rows).

Resume needs the same pipeline: seed, batch size, buckets, shard and worker
count (with workers, grain slices records across processes, so batches differ
from an in-process run while staying deterministic).
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from insightv_jax.data.packing import PackCollate, PackedBatches, packed_batches
from insightv_jax.data.sources import open_source
from insightv_jax.data.validate import (
    Limits,
    Report,
    check_record,
    estimated_length,
    validate_source,
)
from insightv_jax.errors import DataError

IGNORE = -100
# a Qwen-VL example's videos (the processor's names), laid out by Collate's `images`
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class Subset:
    """`source` restricted to `indices` (the records that passed validation)."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def bucket_length(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `n` tokens."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise DataError(f"sequence of {n} tokens is longer than the largest bucket {max(buckets)}")


def _stack_padded(arrays: list[np.ndarray], shape: tuple[int, ...], value, dtype) -> np.ndarray:
    """Stack arrays into one (len(arrays), *shape) array, each padded at the end of every axis."""
    out = np.full((len(arrays), *shape), value, dtype)
    for row, a in zip(out, arrays):
        row[tuple(slice(0, d) for d in a.shape)] = a
    return out


class Collate:
    """Pads a list of transformed examples into one batch (picklable).

    `images`: how a model other than LLaVA lays out its examples' images once
    the rows are padded, `(examples, input_ids, attention_mask) -> arrays`
    (the transform's `batch_images`; Qwen-VL's `models.qwen_vl.BatchImages`)."""

    def __init__(
        self, buckets: tuple[int, ...], pad_id: int = 0, batch_size: int | None = None, images=None
    ):
        self.buckets, self.pad_id, self.batch_size = tuple(buckets), pad_id, batch_size
        self.images = images

    def __call__(self, examples: list[dict], min_length: int = 0) -> dict[str, np.ndarray]:
        longest = max(min_length, *(len(e["input_ids"]) for e in examples))
        length = bucket_length(longest, self.buckets)
        ids = [np.asarray(e["input_ids"]) for e in examples]
        batch = {
            "input_ids": _stack_padded(ids, (length,), self.pad_id, np.int32),
            "labels": _stack_padded([e["labels"] for e in examples], (length,), IGNORE, np.int32),
            "attention_mask": _stack_padded(
                [np.ones(len(i), np.int32) for i in ids], (length,), 0, np.int32
            ),
        }
        image_keys = ("pixel_values", "image_sizes", "image_grid_thw", *VIDEO_KEYS)
        if self.images is not None:
            batch.update(self.images(examples, batch["input_ids"], batch["attention_mask"]))
            examples = [{k: v for k, v in e.items() if k not in image_keys} for e in examples]
        elif "pixel_values" in examples[0]:
            pix = [e["pixel_values"] for e in examples]
            shape = tuple(max(p.shape[d] for p in pix) for d in range(pix[0].ndim))
            batch["pixel_values"] = _stack_padded(pix, shape, 0.0, np.float32)
            sizes = [e["image_sizes"] for e in examples]
            batch["image_sizes"] = _stack_padded(sizes, (shape[0], 2), 0, np.int32)
        for key in examples[0].keys() - batch.keys():  # extra per-example fields, stacked
            batch[key] = np.stack([np.asarray(e[key]) for e in examples])
        return batch


def shard_options(shard_index: int | None = None, shard_count: int | None = None):
    """Explicit shard options (tests simulate hosts) or one shard per JAX process."""
    if shard_index is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)


def length_grouped_batches(
    lengths: list[int], global_batch: int, window: int, seed: int
) -> list[list[int]]:
    """Global batches of similar length (as `group_by_length` in HF Trainer): a
    seeded shuffle, then each window of `window` batches sorted by length and cut
    into batches. Incomplete batches are dropped; the batch order is shuffled later."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    n = len(order) - len(order) % global_batch
    span = global_batch * window
    out = []
    for start in range(0, n, span):
        chunk = order[start : min(start + span, n)]
        chunk = chunk[np.argsort(np.asarray(lengths)[chunk], kind="stable")]
        out += [chunk[i : i + global_batch].tolist() for i in range(0, len(chunk), global_batch)]
    return out


class GroupedBatches:
    """A map source whose items are one host's rows of a length-grouped global
    batch: (records, the global batch's longest record length)."""

    def __init__(self, source, batches: list[list[int]], lengths: list[int], shard):
        self.source = source
        self.batches = [b[shard.shard_index :: shard.shard_count] for b in batches]
        self.longest = [max(lengths[i] for i in b) for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return [self.source[j] for j in self.batches[i]], self.longest[i]


class CollateGroup:
    """Transforms a grouped batch's records and pads them to (at least) the
    bucket of the global batch's longest record, so every host pads alike."""

    def __init__(self, transform, collate):
        self.transform, self.collate = transform, collate

    def __call__(self, item) -> dict[str, np.ndarray]:
        records, longest = item
        return self.collate([self.transform(r) for r in records], min_length=longest)


class HostRows:
    """A global batch of record indices -> (this host's rows, the global batch's
    longest record length). The rows are the host's strided share, as grain's
    per-record sharding gives; the length lets every host pad to one bucket."""

    def __init__(self, source, lengths: list[int], shard_index: int, shard_count: int):
        self.source, self.lengths = source, lengths
        self.shard_index, self.shard_count = shard_index, shard_count

    def __call__(self, indices) -> tuple[list, int]:
        idx = [int(i) for i in indices]
        rows = idx[self.shard_index :: self.shard_count]
        return [self.source[i] for i in rows], max(self.lengths[i] for i in idx)


def _padded_alike(ds, transform, batch_fn, read, workers: int) -> grain.IterDataset:
    """(host rows, global longest) items -> batches padded alike on every host."""
    it = ds.map(CollateGroup(transform, batch_fn)).to_iter_dataset(read)
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def build_dataset(
    source,
    transform,
    *,
    batch_size: int,
    buckets: tuple[int, ...],
    seed: int = 0,
    num_epochs: int | None = 1,
    shard=None,
    workers: int = 0,
    read_threads: int = 1,
    prefetch: int = 64,
    pad_id: int = 0,
    collate=None,
    drop_remainder: bool = True,
    group_by_length: int = 0,
    lengths: list[int] | None = None,
    packing: bool = False,
    packing_window: int = 8,
) -> grain.IterDataset:
    """The grain pipeline over `source` (already validated): shuffle -> shard -> map -> batch.

    `group_by_length` > 0 (with per-record `lengths`): batches of similar length,
    fixed once by `length_grouped_batches`, in a fresh order each epoch."""
    shard = shard or shard_options()
    batch_fn = collate or Collate(buckets, pad_id, images=getattr(transform, "batch_images", None))
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    if packing:
        if collate is not None:
            raise DataError("packing lays its rows out itself (PackCollate); drop the collate")
        if lengths is None or len(lengths) != len(source):
            raise DataError("packing needs one length per record")
        capacity = max(buckets)
        batches = packed_batches(
            lengths, capacity, batch_size * shard.shard_count, packing_window, seed
        )
        if not batches:
            raise DataError(f"{len(source)} records fill fewer than one global batch of "
                            f"{batch_size * shard.shard_count} packed rows")  # fmt: skip
        ds = grain.MapDataset.source(PackedBatches(source, batches, shard)).seed(seed).shuffle()
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        images = getattr(transform, "batch_images", None)
        it = ds.map(PackCollate(transform, capacity, pad_id, images)).to_iter_dataset(read)
        if workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        return it
    if group_by_length > 0:
        if lengths is None or len(lengths) != len(source):
            raise DataError("group_by_length needs one length per record")
        batches = length_grouped_batches(
            lengths, batch_size * shard.shard_count, group_by_length, seed
        )
        if not batches:
            raise DataError(f"{len(source)} records < one global batch of "
                            f"{batch_size * shard.shard_count}")  # fmt: skip
        groups = GroupedBatches(source, batches, lengths, shard)
        ds = grain.MapDataset.source(groups).seed(seed).shuffle()
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        return _padded_alike(ds, transform, batch_fn, read, workers)
    if shard.shard_count > 1 and lengths is not None and drop_remainder:
        # several hosts: cut global batches of shuffled record indices (the same
        # order as the per-record path below) so each host knows the bucket of the
        # whole global batch; otherwise hosts could pad one step to different shapes
        ds = grain.MapDataset.range(len(source)).seed(seed).shuffle()
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        ds = ds.batch(batch_size * shard.shard_count, drop_remainder=True)
        ds = ds.map(HostRows(source, lengths, shard.shard_index, shard.shard_count))
        return _padded_alike(ds, transform, batch_fn, read, workers)
    ds = grain.MapDataset.source(source).seed(seed).shuffle()
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    n = len(ds)
    if shard.drop_remainder and num_epochs is not None:
        n -= n % shard.shard_count  # every host gets the same number of records
    ds = ds[shard.shard_index : n : shard.shard_count]
    ds = ds.map(transform)
    it = ds.to_iter_dataset(read).batch(
        batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn
    )
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


class GrainBatches:
    """Iteration and resume state of a loader whose batches come from a grain
    iterator `self._it` (grain's own state: the position to resume from)."""

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)


class Loader(GrainBatches):
    """A validated, resumable batch iterator over one source."""

    def __init__(
        self,
        source,
        transform,
        *,
        batch_size: int,
        buckets: tuple[int, ...],
        seed: int = 0,
        num_epochs: int | None = 1,
        shard=None,
        workers: int = 0,
        read_threads: int = 1,
        prefetch: int = 64,
        on_bad_record: str = "fail",
        limits: Limits | None = None,
        pad_id: int = 0,
        collate=None,
        drop_remainder: bool = True,
        check=check_record,
        group_by_length: int = 0,
        packing: bool = False,
        packing_window: int = 8,
    ):
        if on_bad_record not in ("skip", "fail"):
            raise DataError(f"on_bad_record={on_bad_record!r} is not skip or fail")
        limits = limits or Limits(max_length=max(buckets))
        self.report: Report = validate_source(source, limits, check=check)
        if self.report.bad and on_bad_record == "fail":
            rid, reason = self.report.bad[0]
            raise DataError(f"bad record {rid}: {reason} (on_bad_record=fail)")
        if not self.report.good:
            raise DataError("no valid records to load")
        shard = shard or shard_options()
        lengths = None  # for length grouping, and for equal padding across hosts
        if packing or group_by_length > 0 or (shard.shard_count > 1 and drop_remainder):
            # exact when the transform can count (ChatTransform.length)
            root = Path(getattr(source, "root", "."))
            measure = getattr(transform, "length", None) or (
                lambda rec: estimated_length(rec, root, limits)
            )
            lengths = [measure(source[i]) for i in self.report.good]
        self.dataset = build_dataset(
            Subset(source, self.report.good),
            transform,
            batch_size=batch_size,
            buckets=buckets,
            seed=seed,
            num_epochs=num_epochs,
            shard=shard,
            workers=workers,
            read_threads=read_threads,
            prefetch=prefetch,
            pad_id=pad_id,
            collate=collate,
            drop_remainder=drop_remainder,
            group_by_length=group_by_length,
            lengths=lengths,
            packing=packing,
            packing_window=packing_window,
        )
        self._it = iter(self.dataset)

    @property
    def counts(self) -> dict:
        """Records seen, used and skipped, with the skip reasons."""
        r = self.report
        return {
            "total": r.total,
            "used": len(r.good),
            "skipped": len(r.bad),
            "reasons": r.reasons(),
        }


def loader_from_config(
    cfg,
    path: str,
    transform,
    *,
    batch_size: int,
    image_tokens=16,
    count_tokens=None,
    count_conversation=None,
    video_tokens=16,
    num_epochs: int | None = None,
    shard=None,
    pad_id: int = 0,
    **kw,
) -> Loader:
    """A `Loader` from a `DataConfig` (config/data.py) and the dataset path (`train.data`).

    `batch_size` is per host; `image_tokens`/`count_tokens` make validation's
    length check match the transform's tokenisation, `count_conversation` makes it exact;
    `video_tokens` None refuses records with videos (a model that takes none).
    """
    source = open_source(path, split=cfg.split, root=cfg.image_root)
    limits = Limits(max_length=cfg.max_length, image_tokens=image_tokens, video_tokens=video_tokens)
    if count_tokens is not None:
        limits = Limits(
            cfg.max_length, image_tokens, count_tokens, 1, count_conversation, video_tokens
        )
    return Loader(
        source,
        transform,
        batch_size=batch_size,
        buckets=tuple(cfg.buckets),
        seed=cfg.shuffle_seed,
        num_epochs=num_epochs,
        shard=shard,
        workers=cfg.workers,
        read_threads=cfg.read_threads,
        prefetch=cfg.prefetch,
        on_bad_record=cfg.on_bad_record,
        limits=limits,
        pad_id=pad_id,
        group_by_length=cfg.group_by_length,
        packing=cfg.packing,
        packing_window=cfg.packing_window,
        **kw,
    )
