"""What a DPO run reads: pair records as pair-layout batches (`PairData`), JSONL
files, the usable records, a checkpoint's parameters and auxiliary folders."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flax import nnx

from insightv_jax.config import ConfigError, RunConfig
from insightv_jax.errors import DataError
from insightv_jax.train.dpo.program import pair_batch


@dataclasses.dataclass
class PairData:
    """What turns pair records into batches: transform, buckets, pad id, image root,
    and whether pairs are scored from where they diverge (`dpo.truncate_at_divergence`)."""

    transform: object  # record -> example (data.transforms.ChatTransform)
    buckets: tuple[int, ...]
    pad_id: int
    root: Path
    truncate: bool = False

    @classmethod
    def for_checkpoint(cls, cfg: RunConfig, model_cfg, tokenizer_dir: Path, root: Path):
        from insightv_jax.data.conversation import detect_template, load_tokenizer
        from insightv_jax.data.transforms import ChatTransform
        from insightv_jax.models.factory import batch_images

        tok = load_tokenizer(tokenizer_dir)
        template = detect_template(tok)
        if template is None:
            raise ConfigError(f"{tokenizer_dir}: no known chat template (llama3/chatml/minimal)")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        transform = ChatTransform(tokenizer_dir, template, model_cfg, root, batch_images(model_cfg))
        return cls(
            transform, tuple(cfg.data.buckets), int(pad), Path(root),
            truncate=cfg.dpo.truncate_at_divergence,
        )  # fmt: skip

    def batches(self, records: list[dict], size: int) -> Iterator[tuple[int, dict]]:
        """(number of real pairs, pair-layout batch) over `records` in order; the
        last batch is padded with copies of its last pair to `size` rows."""
        from insightv_jax.data.pairs import PairTransform

        tf = PairTransform(self.transform, self.truncate)
        for i in range(0, len(records), size):
            chunk = records[i : i + size]
            yield len(chunk), self._collate([tf(r) for r in chunk], size, chunk)

    def sequence_batches(self, convs: list[dict], size: int) -> Iterator[tuple[int, dict]]:
        """(number of real sequences, pair-layout batch) over single conversation
        records (LLaVA `conversations`, response = the last turn) in order, two
        per row: sequences 2i and 2i + 1 of a batch sit on row i's two sides, so
        the pair passes score them. Up to `2 * size` sequences a batch."""
        for i in range(0, len(convs), 2 * size):
            chunk = convs[i : i + 2 * size]
            seqs = [self.transform(c) for c in chunk]
            seqs += seqs[-1:] * (len(seqs) % 2)  # an odd last sequence gets a partner
            rows = [
                {"chosen": a, "rejected": b, "scores": np.zeros(2, np.float32)}
                for a, b in zip(seqs[::2], seqs[1::2])
            ]
            yield len(chunk), self._collate(rows, size, chunk)

    def _collate(self, examples: list[dict], size: int, records: list[dict]) -> dict:
        """Pair examples -> a pair-layout batch of `size` rows (last row repeated)."""
        from insightv_jax.data.pairs import PairCollate

        examples = examples + [examples[-1]] * (size - len(examples))
        try:
            images = getattr(self.transform, "batch_images", None)
            batch = PairCollate(self.buckets, self.pad_id, images)(examples)
        except DataError as e:
            ids = ", ".join(str(r.get("id")) for r in records)
            raise DataError(f"records {ids}: {e} (raise data.buckets)") from None
        return pair_batch(batch)


def full_params_of(path: str | Path, mesh) -> dict:
    """A checkpoint's parameters as a pure dict sharded on `mesh`."""
    from insightv_jax.checkpoint import load_model

    model = load_model(path, mesh)[0]
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def usable_records(
    records: list[dict], check, data: PairData, on_bad_record: str, what: str, print_fn
) -> list[dict]:
    """The records `check(rec, root, limits)` passes (the loader's own validation,
    so a count of them is the count the loader trains on). Bad ones are left out
    with one line naming the first, or raise with `on_bad_record=fail`."""
    limits = data.transform.limits(max(data.buckets))
    good, bad = [], []
    for rec in records:
        reason = check(rec, data.root, limits)
        if reason is None:
            good.append(rec)
        else:
            bad.append((rec.get("id"), reason))
    if bad and on_bad_record == "fail":
        raise DataError(f"{what} {bad[0][0]}: {bad[0][1]} (data.on_bad_record=fail)")
    if bad:
        print_fn(f"skipping {len(bad)} of {len(records)} {what}s (first: {bad[0][0]}: {bad[0][1]})")
    return good
