"""Sequence packing: several records per row of the largest bucket, kept apart
by segment ids, so that a long-tailed length distribution pads little.

The plan is fixed once from the records' lengths (exact: the transform's
`length`): a seeded shuffle, then first-fit over a window of open rows -- each
record goes to the first of the (at most `window`) open rows it fits, a new row
opens when none has room, and the oldest row closes when more than `window` are
open. The rows are cut into global batches; grain shuffles their order each
epoch and its iterator state resumes exactly (`Loader.get_state`), as for
length-grouped batches.

A packed row (the batch contract, see docs/design.md):
    input_ids, attention_mask  the records' tokens back to back, then padding
    segment_ids                k on the k-th record's tokens (1, 2, ...), 0 on padding
    positions                  per record, restarting at 0: (B, T), or for
                               Qwen-VL rows with images M-RoPE's (B, 3, T), each
                               record's ids computed alone and concatenated
    labels                     the records' labels, with each record's first
                               label IGNORE

Targets are next-token labels (`train.losses.shift_labels`: position t is
scored against labels[t + 1]), and a record's first label is never a target
when it is run alone. Blanking it keeps the last token of record k from being
scored against the first token of record k + 1, so a packed row has exactly
the label tokens of its records run unpacked, and their losses (sums over
label tokens, divided by the batch's label-token count) are equal.

DPO (`pair_steps`, `data.pairs.PackedPairLoader`) packs pairs, never splitting
one: a pair's chosen and rejected sides are consecutive segments of one row.
Its plan keeps the unpacked run's steps (the same pairs per optimizer step, in
the pair loader's order), each step's pairs first-fit into as many rows as the
most demanding step needs, so its losses equal the unpacked run's.

`packing_efficiency` measures what packing buys: the fraction of a batch's
token slots that hold real tokens, with and without packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from insightv_jax.errors import DataError

IGNORE = -100


def first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int, window: int):
    """Rows of record indices: the records taken in `order`, each placed in
    the first of at most `window` open rows with room for it (a new row when
    none has), the oldest open row closing when a new one would make
    `window` + 1. Deterministic; rows come out in the order they close."""
    if window < 1:
        raise DataError(f"packing window={window} must be >= 1")
    rows: list[list[int]] = []
    open_rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise DataError(f"record {i}: {n} tokens do not fit a packed row of {capacity}")
        slot = next((j for j, r in enumerate(room) if r >= n), None)
        if slot is None:
            if len(open_rows) == window:  # the oldest row is as full as it gets
                rows.append(open_rows.pop(0))
                room.pop(0)
            open_rows.append([])
            room.append(capacity)
            slot = len(open_rows) - 1
        open_rows[slot].append(int(i))
        room[slot] -= n
    return rows + open_rows


def packed_batches(
    lengths: Sequence[int], capacity: int, global_batch: int, window: int, seed: int
) -> list[list[list[int]]]:
    """Global batches of `global_batch` packed rows (each a list of record
    indices) of the records in a seeded shuffle (`first_fit`); an incomplete
    last batch is dropped."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows = first_fit(lengths, order, capacity, window)
    n = len(rows) - len(rows) % global_batch
    return [rows[i : i + global_batch] for i in range(0, n, global_batch)]


class PackedBatches:
    """A map source whose items are one host's packed rows of a global batch
    (lists of records), the host's strided share as grain's sharding gives."""

    def __init__(self, source, batches: list[list[list[int]]], shard):
        self.source = source
        self.batches = [b[shard.shard_index :: shard.shard_count] for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[list]:
        return [[self.source[j] for j in row] for row in self.batches[i]]


class PackCollate:
    """Transforms a batch of packed rows' records and lays them out as one
    packed batch of rows `capacity` long (picklable; see the module docstring).

    `images`: the transform's `batch_images` (Qwen-VL's `BatchImages`), which
    lays the rows' images out per row and gives each record's M-RoPE ids; None
    for text. LLaVA's per-row image slots cannot hold several records' images:
    an example with `pixel_values` and no `images` is a DataError."""

    def __init__(self, transform, capacity: int, pad_id: int = 0, images=None):
        self.transform, self.capacity, self.pad_id = transform, capacity, pad_id
        self.images = images

    def __call__(self, rows: list[list]) -> dict[str, np.ndarray]:
        examples = [[self.transform(r) for r in row] for row in rows]
        return self.collate(examples)

    def collate(self, rows: list[list[dict]]) -> dict[str, np.ndarray]:
        """One packed batch of transformed examples, a list of records per row."""
        B, T = len(rows), self.capacity
        batch = {
            "input_ids": np.full((B, T), self.pad_id, np.int32),
            "labels": np.full((B, T), IGNORE, np.int32),
            "attention_mask": np.zeros((B, T), np.int32),
            "segment_ids": np.zeros((B, T), np.int32),
        }
        spans = []  # (row, start, end, example) per record
        for b, row in enumerate(rows):
            at = 0
            for k, e in enumerate(row, start=1):
                n = len(e["input_ids"])
                if at + n > T:
                    raise DataError(
                        f"packed row {b}: record {k} ends at token {at + n}, past the row's "
                        f"{T} (the transform's length disagrees with its output)"
                    )
                if "pixel_values" in e and self.images is None:
                    raise DataError(
                        "data.packing: a record with LLaVA images (fixed per-row image slots) "
                        "cannot share a row; packing takes text and Qwen-VL records"
                    )
                batch["input_ids"][b, at : at + n] = e["input_ids"]
                batch["labels"][b, at + 1 : at + n] = np.asarray(e["labels"])[1:]
                batch["attention_mask"][b, at : at + n] = 1
                batch["segment_ids"][b, at : at + n] = k
                spans.append((b, at, at + n, e))
                at += n
        flat = [e for row in rows for e in row]
        vision = {}
        if self.images is not None:
            vision = self.images(flat, batch["input_ids"], batch["attention_mask"])
        batch.update(vision)
        # Per-record positions replace the whole-row ids the layout computed.
        if "positions" in vision:
            positions = np.zeros((B, 3, T), np.int32)
            for b, lo, hi, e in spans:
                positions[b, :, lo:hi] = self.images.record_positions(e)
        else:
            positions = np.zeros((B, T), np.int32)
            for b, lo, hi, _ in spans:
                positions[b, lo:hi] = np.arange(hi - lo)
        batch["positions"] = positions
        return batch


def pack_pairs(
    rows: list[list[dict]], capacity: int, pairs_per_row: int, pad_id: int = 0, images=None
) -> dict[str, np.ndarray]:
    """A packed DPO batch of transformed pair examples (`data.pairs.PairTransform`'s
    {chosen, rejected, [ref_logps]}), a list of pairs per row: pair j of a row
    is segments 2j + 1 (chosen) and 2j + 2 (rejected), laid out as
    `PackCollate` lays records, plus `pair_mask` (B, pairs_per_row) marking
    the real pair slots and, when every pair has them, `ref_logps`
    (B, pairs_per_row, 2) (0 in empty slots). See `train.dpo.program`."""
    if any(len(row) > pairs_per_row for row in rows):
        raise DataError(f"a packed row holds more than pairs_per_row={pairs_per_row} pairs")
    sides = [[e[s] for e in row for s in ("chosen", "rejected")] for row in rows]
    batch = PackCollate(None, capacity, pad_id, images).collate(sides)
    mask = np.zeros((len(rows), pairs_per_row), np.float32)
    ref = np.zeros((len(rows), pairs_per_row, 2), np.float32)
    for b, row in enumerate(rows):
        mask[b, : len(row)] = 1.0
        for j, e in enumerate(row):
            ref[b, j] = e.get("ref_logps", 0.0)
    batch["pair_mask"] = mask
    if all("ref_logps" in e for row in rows for e in row):
        batch["ref_logps"] = ref
    return batch


def pair_steps(
    lengths: Sequence[int],
    capacity: int,
    pairs_per_step: int,
    steps: int,
    seed: int,
    row_multiple: int = 1,
) -> tuple[list[list[list[int]]], int, int]:
    """The packed DPO plan: (per step, its rows of pair indices; rows a step;
    pair slots a row), fixed at start for `steps` optimizer steps.

    Step s takes the `pairs_per_step` pairs the unpacked pair loader's step s
    takes, in its order (grain's seeded shuffle of the indices, a fresh one each
    pass, the passes back to back), and first-fits them into rows of `capacity`
    tokens, a pair (`lengths[i]`: its chosen plus rejected tokens) whole in one
    row (all of a step's rows stay open: `data.packing_window` does not apply).
    So a packed run's steps hold the unpacked run's pairs and its losses equal
    the unpacked ones. Static shapes: every step gets the rows of the
    step that needs the most (rounded up to `row_multiple`; the extra rows
    empty), every row as many pair slots as the fullest row holds."""
    import grain  # the data pipeline's; not needed to import the packer

    if pairs_per_step < 1 or steps < 1 or row_multiple < 1:
        raise DataError(f"pair_steps: pairs_per_step={pairs_per_step}, steps={steps} and "
                        f"row_multiple={row_multiple} must be >= 1")  # fmt: skip
    if not len(lengths):
        raise DataError("pair_steps: no pairs to pack")
    order = grain.MapDataset.range(len(lengths)).seed(seed).shuffle().repeat(None)
    plan = []
    for s in range(steps):
        pairs = [int(order[s * pairs_per_step + k]) for k in range(pairs_per_step)]
        plan.append(first_fit(lengths, pairs, capacity, window=pairs_per_step))
    rows = max(len(step) for step in plan)
    rows += -rows % row_multiple
    return plan, rows, max(len(row) for step in plan for row in step)


class PackedPairSteps:
    """A map source whose item s is this host's rows of step s of a `pair_steps`
    plan (lists of pair records; empty rows pad a step to `rows`), the host's
    strided share of the step's rows."""

    def __init__(self, source, plan: list[list[list[int]]], rows: int, shard):
        if rows % shard.shard_count:
            raise DataError(
                f"{rows} packed rows a step do not split over {shard.shard_count} hosts"
            )
        self.source, self.plan, self.rows = source, plan, rows
        self.shard_index, self.shard_count = shard.shard_index, shard.shard_count

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, s: int) -> list[list]:
        step = self.plan[s] + [[]] * (self.rows - len(self.plan[s]))
        return [[self.source[i] for i in row] for row in step[self.shard_index :: self.shard_count]]


class PackPairs:
    """Transforms a step's rows of pair records (`data.pairs.PairTransform`) and
    lays them out with `pack_pairs` (picklable)."""

    def __init__(self, transform, capacity: int, pairs_per_row: int, pad_id: int = 0, images=None):
        self.transform, self.capacity, self.pairs_per_row = transform, capacity, pairs_per_row
        self.pad_id, self.images = pad_id, images

    def __call__(self, rows: list[list]) -> dict[str, np.ndarray]:
        examples = [[self.transform(r) for r in row] for row in rows]
        return pack_pairs(examples, self.capacity, self.pairs_per_row, self.pad_id, self.images)


def unpacked_fraction(lengths: Sequence[int], batch_size: int, buckets: Sequence[int]) -> float:
    """Real tokens / token slots when records (in the given order) are batched
    `batch_size` at a time, each batch padded to the bucket of its longest."""
    lengths = [int(n) for n in lengths]
    n = len(lengths) - len(lengths) % batch_size
    if n == 0:
        raise DataError(f"{len(lengths)} records < one batch of {batch_size}")
    slots = 0
    for i in range(0, n, batch_size):
        longest = max(lengths[i : i + batch_size])
        bucket = min((b for b in buckets if b >= longest), default=None)
        if bucket is None:
            raise DataError(f"a record of {longest} tokens is longer than the largest bucket")
        slots += batch_size * bucket
    return sum(lengths[:n]) / slots


def packing_efficiency(
    lengths: Sequence[int],
    buckets: Sequence[int],
    batch_size: int = 8,
    window: int = 8,
    seed: int = 0,
) -> dict:
    """The fraction of token slots that hold real tokens for records of these
    `lengths`: batched unpacked (seeded shuffle, each batch padded to the
    bucket of its longest record) and packed (`first_fit` into rows of the
    largest bucket, every row counted, the last one partly filled). Also the
    rows each needs."""
    lengths = [int(n) for n in lengths]
    order = np.random.default_rng(seed).permutation(len(lengths))
    capacity = max(buckets)
    rows = first_fit(lengths, order, capacity, window)
    return {
        "records": len(lengths),
        "tokens": int(sum(lengths)),
        "row_length": capacity,
        "unpacked_fraction": round(
            unpacked_fraction([lengths[i] for i in order], batch_size, buckets), 4
        ),
        "unpacked_rows": len(lengths),
        "packed_fraction": round(sum(lengths) / (len(rows) * capacity), 4),
        "packed_rows": len(rows),
        "records_per_row": round(len(lengths) / len(rows), 2),
    }


def long_tailed_lengths(n: int, max_length: int = 12288, seed: int = 0) -> np.ndarray:
    """`n` token counts drawn log-normally (median ~1.2k, a tail to
    `max_length`, as the paper's 12,288-token reasoning data), clipped to
    [16, max_length]: a length distribution for packing figures, no tokenizer."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(1200.0), 0.9, n), 16, max_length).astype(np.int64)


def packing_figures(
    synthetic_lengths: Sequence[int], buckets: Sequence[int], batch_size: int
) -> dict:
    """`insightv bench data`'s packing section: `packing_efficiency` of the
    synthetic suite's records (their exact token counts, padded to `buckets`)
    and of 4096 `long_tailed_lengths` up to 12,288 tokens (buckets 1k..12k,
    rows of 12,288)."""
    return {
        "synthetic": packing_efficiency(synthetic_lengths, buckets, batch_size),
        "long_tailed_12288": packing_efficiency(
            long_tailed_lengths(4096), (1024, 2048, 4096, 8192, 12288), batch_size
        ),
    }
