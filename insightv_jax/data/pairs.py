"""Preference-pair records (DPO) with validation and a pair loader.

A record:
    {"id", "image" (path or list), "prompt" [turns, human first and last],
     "chosen" str, "rejected" str, "answer" str, "chosen_score", "rejected_score",
     "round" int >= 0, optional "ref_logps" {"chosen": float, "rejected": float}}

A pair batch is `{"chosen": batch, "rejected": batch, "scores": (B, 2) f32,
["ref_logps": (B, 2) f32]}` where `chosen`/`rejected` are each a full training
batch (input_ids, attention_mask, labels, pixel_values, image_sizes) padded to
the same length, so one forward function serves both sides.

With `truncate=True` (`dpo.truncate_at_divergence`) the leading lines both
responses share (the chains' common first steps, `<thoughts>` at least) stay in
the sequence, so they condition what follows, but their labels are masked: only
the tokens from the first differing line on are scored. The shared prefix holds
no preference, and its log-prob (identical on both sides) only adds noise to
the chosen-side terms DPOP and the CE anchor see.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from insightv_jax.data.conversation import IGNORE, encode_text
from insightv_jax.data.loader import Collate, GrainBatches, Loader, Subset, shard_options
from insightv_jax.data.packing import PackedPairSteps, PackPairs, pair_steps
from insightv_jax.data.sources import BadRecord
from insightv_jax.data.validate import Limits, check_record, validate_source
from insightv_jax.errors import DataError

REQUIRED = {
    "id": (str,),
    "prompt": (list,),
    "chosen": (str,),
    "rejected": (str,),
    "answer": (str,),
    "chosen_score": (int, float),
    "rejected_score": (int, float),
    "round": (int,),
}


def make_pair(
    rid: str,
    image,
    prompt: list[dict],
    chosen: str,
    rejected: str,
    answer: str,
    chosen_score: float,
    rejected_score: float,
    round: int,
    ref_logps: tuple[float, float] | None = None,
) -> dict:
    """A preference-pair record (the format the pipeline writes and DPO reads)."""
    rec = {
        "id": rid,
        "image": image,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "answer": answer,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "round": round,
    }
    if ref_logps is not None:
        rec["ref_logps"] = {"chosen": float(ref_logps[0]), "rejected": float(ref_logps[1])}
    return rec


def side(rec: dict, which: str) -> dict:
    """The conversation record of one side of a pair (prompt + that response)."""
    conv = [*rec["prompt"], {"from": "gpt", "value": rec[which]}]
    out = {"id": rec["id"], "conversations": conv}
    for key in ("image", "image_arrays", "video"):
        if key in rec:
            out[key] = rec[key]
    return out


def check_pair(rec, root: Path, limits: Limits) -> str | None:
    """The reason a pair record is bad, or None."""
    if isinstance(rec, BadRecord):
        return rec.reason
    for key, types in REQUIRED.items():
        if key not in rec:
            return f"missing key {key!r}"
        if not isinstance(rec[key], types) or isinstance(rec[key], bool):
            return f"{key!r} has type {type(rec[key]).__name__}"
    if rec["round"] < 0:
        return f"round {rec['round']} is negative"
    if rec["chosen"] == rec["rejected"]:
        return "chosen and rejected are identical"
    if rec["chosen_score"] < rec["rejected_score"]:
        return f"chosen_score {rec['chosen_score']} < rejected_score {rec['rejected_score']}"
    ref = rec.get("ref_logps")
    if ref is not None:
        ok = isinstance(ref, dict) and all(
            isinstance(ref.get(k), (int, float)) and math.isfinite(ref[k])
            for k in ("chosen", "rejected")
        )
        if not ok:
            return "ref_logps must be {chosen: float, rejected: float} (finite)"
    for which in ("chosen", "rejected"):
        reason = check_record(side(rec, which), root, limits)
        if reason is not None:
            return f"{which}: {reason}"
    return None


def shared_lines(chosen: str, rejected: str) -> str:
    """The whole leading lines (newlines included) `chosen` and `rejected` share.
    A last line without its newline is never shared: the other side may go on."""
    a, b = chosen.splitlines(keepends=True), rejected.splitlines(keepends=True)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n] and a[n].endswith(("\n", "\r")):
        n += 1
    return "".join(a[:n])


def _common_prefix(*seqs) -> int:
    """The length of the longest prefix all `seqs` share."""
    n = 0
    while all(n < len(s) for s in seqs) and all(s[n] == seqs[0][n] for s in seqs[1:]):
        n += 1
    return n


def mask_shared_prefix(chosen: dict, rejected: dict, prefix_ids) -> int:
    """Mask (in place) the labels of the response tokens both sides share, up to
    the tokens of the shared lines `prefix_ids`; returns how many were masked.

    Taking the common prefix of all three keeps the cut on a line boundary even
    where the tokenizer merges a newline with what follows it (then the cut falls
    a token early, and that token is scored on both sides)."""
    pos = [np.flatnonzero(ex["labels"] != IGNORE) for ex in (chosen, rejected)]
    resp = [ex["labels"][p].tolist() for ex, p in zip((chosen, rejected), pos)]
    k = _common_prefix(resp[0], resp[1], list(prefix_ids))
    for ex, p in zip((chosen, rejected), pos):
        ex["labels"] = ex["labels"].copy()
        ex["labels"][p[:k]] = IGNORE
    return k


class PairTransform:
    """Tokenises both sides of a pair with a record transform (picklable).

    `truncate`: score only from the first line where chosen and rejected differ
    (module docstring); needs a transform with a `tokenizer` (ChatTransform)."""

    def __init__(self, transform, truncate: bool = False):
        self.transform, self.truncate = transform, truncate

    def _encode(self, text: str) -> list[int]:
        tok = getattr(self.transform, "tokenizer", None)
        if tok is None:
            raise DataError(
                f"{type(self.transform).__name__} has no tokenizer: "
                "truncate_at_divergence cannot find the shared lines' tokens"
            )
        return encode_text(tok, text)

    def __call__(self, rec: dict) -> dict:
        out = {"chosen": self.transform(side(rec, "chosen"))}
        out["rejected"] = self.transform(side(rec, "rejected"))
        if self.truncate:
            prefix = shared_lines(rec["chosen"], rec["rejected"])
            if prefix:
                mask_shared_prefix(out["chosen"], out["rejected"], self._encode(prefix))
        out["scores"] = np.asarray([rec["chosen_score"], rec["rejected_score"]], np.float32)
        if rec.get("ref_logps") is not None:
            ref = rec["ref_logps"]
            out["ref_logps"] = np.asarray([ref["chosen"], ref["rejected"]], np.float32)
        return out

    def length(self, rec: dict) -> int:
        """Tokens of the longer side (needs a transform that counts, as ChatTransform)."""
        count = getattr(self.transform, "length", None)
        if count is None:
            raise DataError(f"{type(self.transform).__name__} cannot count tokens (no .length)")
        return max(count(side(rec, s)) for s in ("chosen", "rejected"))

    def packed_length(self, rec: dict) -> int:
        """Tokens of both sides together: what the pair takes of a packed row."""
        count = getattr(self.transform, "length", None)
        if count is None:
            raise DataError(f"{type(self.transform).__name__} cannot count tokens (no .length)")
        return sum(count(side(rec, s)) for s in ("chosen", "rejected"))


class PairCollate:
    """Pads chosen and rejected to one common bucket length (`images`: as
    `Collate`'s)."""

    def __init__(self, buckets: tuple[int, ...], pad_id: int = 0, images=None):
        self.buckets, self.pad_id, self.images = tuple(buckets), pad_id, images

    def __call__(self, examples: list[dict], min_length: int = 0) -> dict:
        longest = max(
            min_length, *(len(e[s]["input_ids"]) for e in examples for s in ("chosen", "rejected"))
        )
        images = self.images
        if images is not None:  # both sides' images padded alike, so that they stack
            images = images.padded_alike([e[s] for e in examples for s in ("chosen", "rejected")])
        common = Collate(
            tuple(b for b in self.buckets if b >= longest) or self.buckets,
            self.pad_id,
            images=images,
        )
        batch = {s: common([e[s] for e in examples]) for s in ("chosen", "rejected")}
        batch["scores"] = np.stack([e["scores"] for e in examples])
        if all("ref_logps" in e for e in examples):
            batch["ref_logps"] = np.stack([e["ref_logps"] for e in examples])
        return batch


def pair_loader(
    source,
    transform,
    *,
    batch_size: int,
    buckets: tuple[int, ...],
    truncate: bool = False,
    **kw,
) -> Loader:
    """A `Loader` over preference pairs: validation with `check_pair`, pair batches
    (`truncate`: see `PairTransform`)."""
    pad_id = kw.pop("pad_id", 0)
    return Loader(
        source,
        PairTransform(transform, truncate),
        batch_size=batch_size,
        buckets=buckets,
        collate=PairCollate(buckets, pad_id, getattr(transform, "batch_images", None)),
        check=check_pair,
        **kw,
    )


class FitsPackedRow:
    """`check_pair`, and under `data.packing` a pair's two sides together within
    one packed row of `capacity` tokens (a pair is never split over rows), so a
    longer pair is a bad record like any other (picklable)."""

    def __init__(self, transform: PairTransform, capacity: int):
        self.transform, self.capacity = transform, capacity

    def __call__(self, rec, root: Path, limits: Limits) -> str | None:
        reason = check_pair(rec, root, limits)
        if reason is None:
            n = self.transform.packed_length(rec)
            if n > self.capacity:
                return (f"chosen + rejected = {n} tokens, more than a packed row of "
                        f"{self.capacity} (the largest of data.buckets)")  # fmt: skip
        return reason


class PackedPairLoader(GrainBatches):
    """Packed DPO batches (`data.packing.pack_pairs`) of a fixed plan: step s
    packs the `pairs_per_step` pairs the unpacked `pair_loader` (same source,
    seed and hosts) gives at step s into `rows` rows of the largest bucket, with
    `pairs_per_row` pair slots each (`data.packing.pair_steps`), for `steps`
    steps. Validation as the pair loader's plus `FitsPackedRow`; resumable
    (`get_state`/`set_state`, grain's iterator state)."""

    def __init__(
        self,
        source,
        transform,
        *,
        pairs_per_step: int,
        steps: int,
        buckets: tuple[int, ...],
        seed: int = 0,
        shard=None,
        on_bad_record: str = "fail",
        limits: Limits | None = None,
        pad_id: int = 0,
        truncate: bool = False,
        row_multiple: int = 1,
        read_threads: int = 1,
        prefetch: int = 64,
    ):
        import grain

        self.capacity = capacity = max(buckets)
        tf = PairTransform(transform, truncate)
        limits = limits or Limits(max_length=capacity)
        self.report = validate_source(source, limits, check=FitsPackedRow(tf, capacity))
        if self.report.bad and on_bad_record == "fail":
            rid, reason = self.report.bad[0]
            raise DataError(f"bad record {rid}: {reason} (on_bad_record=fail)")
        if not self.report.good:
            raise DataError("no valid pairs to load")
        good = Subset(source, self.report.good)
        lengths = [tf.packed_length(good[i]) for i in range(len(good))]
        shard = shard or shard_options()
        # every host's share of a step the same number of rows
        row_multiple = math.lcm(row_multiple, shard.shard_count)
        self.plan, self.rows, self.pairs_per_row = pair_steps(
            lengths, capacity, pairs_per_step, steps, seed, row_multiple
        )
        real = sum(lengths[i] for step in self.plan for row in step for i in row)
        self.fill = real / (len(self.plan) * self.rows * capacity)
        images = getattr(transform, "batch_images", None)
        ds = grain.MapDataset.source(PackedPairSteps(good, self.plan, self.rows, shard))
        ds = ds.map(PackPairs(tf, capacity, self.pairs_per_row, pad_id, images))
        read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._it = iter(ds.to_iter_dataset(read))
