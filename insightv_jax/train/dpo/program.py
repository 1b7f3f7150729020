"""The DPO step and the log-prob passes on a mesh, and the batch iterators that feed them.

A DPO batch is a dict of arrays in pair layout: `input_ids`, `attention_mask`,
`labels` (B, 2, T) and optional `pixel_values` (B, 2, I, tiles, 3, H, W) /
`image_sizes` (B, 2, I, 2) — index 0 the chosen side, 1 the rejected side —
plus `ref_logps` (B, 2) summed reference log-probs. Keeping a pair's two
sequences on one row keeps them on one device and in one micro-batch; inside
the step the batch is reshaped to (2B, T) and run through ONE forward.

A packed pair batch (`data.packing.pack_pairs`) holds up to P pairs per row
instead: `input_ids`, `attention_mask`, `labels`, `segment_ids`, `positions`
(B, T) (pair j's chosen side is segment 2j + 1, its rejected side 2j + 2),
`pair_mask` (B, P) marking real pairs and `ref_logps` (B, P, 2). Log-probs are
summed per segment (`chunked_segment_nll`); the loss, metrics and log-prob
pass then work on (B, P, 2) as on (B, 2), empty pair slots masked out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from insightv_jax.config import ConfigError, DPOConfig
from insightv_jax.train.losses import (
    IGNORE,
    chunked_segment_nll,
    chunked_sequence_nll,
    chunked_token_nll,
    dpo_pair_losses,
    shift_labels,
)
from insightv_jax.train.optim import merge
from insightv_jax.train.steps import BATCH_KEYS, SFTProgram


def pair_batch(batch: dict) -> dict:
    """A `data.pairs.pair_loader` batch -> the pair layout (numpy)."""
    out = {
        k: np.stack([np.asarray(batch["chosen"][k]), np.asarray(batch["rejected"][k])], axis=1)
        for k in BATCH_KEYS
        if k in batch["chosen"]
    }
    if "ref_logps" in batch:
        out["ref_logps"] = np.asarray(batch["ref_logps"], np.float32)
    return out


def _rows(x: jax.Array) -> jax.Array:
    """(B, 2, ...) -> (2B, ...): pair i becomes rows 2i (chosen), 2i+1 (rejected)."""
    return x.reshape((-1,) + x.shape[2:])


class DPOProgram(SFTProgram):
    """The DPO step and the log-prob pass of one model on one mesh (see SFTProgram)."""

    def __init__(self, *args, dpo: DPOConfig | None = None, **kw):
        super().__init__(*args, **kw)
        self.dpo = dpo or DPOConfig()
        self._passes: dict = {}

    def _sequence_nll(self, model, mb: dict) -> tuple[jax.Array, jax.Array]:
        """(summed NLL, label tokens) per side, both (B, 2): one forward of 2B
        rows; of a packed pair batch, both (B, P, 2): one forward of its rows."""
        if "segment_ids" in mb:
            B, P = mb["pair_mask"].shape
            nll, count = chunked_segment_nll(
                self._hidden(model, mb), shift_labels(mb["labels"]), mb["segment_ids"], 2 * P,
                model.logits, self.cfg.loss_chunk,
            )  # fmt: skip
            return nll.reshape(B, P, 2), count.reshape(B, P, 2)
        rows = {k: _rows(mb[k]) for k in BATCH_KEYS if k in mb}
        hidden = self._hidden(model, rows)
        nll, count = chunked_sequence_nll(
            hidden, shift_labels(rows["labels"]), model.logits, self.cfg.loss_chunk
        )
        return nll.reshape(-1, 2), count.reshape(-1, 2)

    # ----------------------------------------------------------- the step

    def _totals(self, batch: dict) -> dict:
        valid = (shift_labels(batch["labels"]) != IGNORE).astype(jnp.float32)
        if "segment_ids" in batch:  # packed: chosen sides are the odd segments
            chosen = (batch["segment_ids"] % 2 == 1).astype(jnp.float32)
            return {
                "pairs": jnp.sum(batch["pair_mask"].astype(jnp.float32)),
                "chosen_tokens": jnp.sum(valid * chosen),
                "tokens": jnp.sum(valid),
            }
        return {
            "pairs": jnp.asarray(batch["labels"].shape[0], jnp.float32),
            "chosen_tokens": jnp.sum(valid[:, 0]),
            "tokens": jnp.sum(valid),
        }

    def _micro_loss(self, trainable, frozen, mb, totals):
        d = self.dpo
        nll, _ = self._sequence_nll(self._model(trainable, frozen), mb)
        logps = -nll
        ref = mb.get("ref_logps")
        if ref is None:
            if d.loss != "ref_free":
                raise ConfigError("dpo: the batch has no ref_logps (precompute them first)")
            ref = jnp.zeros_like(logps)
        per_pair, rw_c, rw_r = dpo_pair_losses(
            logps[..., 0], logps[..., 1], ref[..., 0], ref[..., 1],
            beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing,
            dpop_lambda=d.dpop_lambda,
        )  # fmt: skip
        # (B,) pairs, or (B, P) pair slots of a packed batch (empty ones masked)
        real = mb["pair_mask"].astype(jnp.float32) if "pair_mask" in mb else 1.0
        chosen_nll = jnp.sum(nll[..., 0])
        share = jnp.sum(per_pair * real) / totals["pairs"]
        share += d.gamma * chosen_nll / jnp.maximum(totals["chosen_tokens"], 1.0)
        sums = {
            "pref": jnp.sum(per_pair * real),
            "chosen_nll": chosen_nll,
            "correct": jnp.sum((rw_c > rw_r).astype(jnp.float32) * real),
            "margin": jnp.sum((rw_c - rw_r) * real),
            "logp_chosen": jnp.sum(logps[..., 0] * real),
            "logp_rejected": jnp.sum(logps[..., 1] * real),
            "kl": jnp.sum((ref.astype(jnp.float32) - logps) * jnp.expand_dims(real, -1)),
        }
        return share, sums

    def _metrics(self, sums: dict, totals: dict) -> dict:
        n = totals["pairs"]
        ce = sums["chosen_nll"] / jnp.maximum(totals["chosen_tokens"], 1.0)
        return {
            "loss": sums["pref"] / n + self.dpo.gamma * ce,
            "pref_loss": sums["pref"] / n,
            "chosen_ce": ce,
            "reward_accuracy": sums["correct"] / n,
            "reward_margin": sums["margin"] / n,
            "logp_chosen": sums["logp_chosen"] / n,
            "logp_rejected": sums["logp_rejected"] / n,
            # mean over sequences of log π_ref − log π on the pairs (off-policy KL proxy)
            "kl_proxy": sums["kl"] / (2 * n),
            "tokens": totals["tokens"],
        }

    # ----------------------------------------------------- the log-prob passes

    def _logprob_pass(self, params: dict, batch: dict) -> dict:
        model = nnx.merge(self.graphdef, params, self.rest)
        nll, count = self._sequence_nll(model, batch)
        return {"sum": -nll, "mean": -nll / jnp.maximum(count, 1.0), "tokens": count}

    def _token_pass(self, params: dict, batch: dict) -> dict:
        if "segment_ids" in batch:
            raise ValueError("token log-probs of a packed pair batch are not supported")
        model = nnx.merge(self.graphdef, params, self.rest)
        rows = {k: _rows(batch[k]) for k in BATCH_KEYS if k in batch}
        targets = shift_labels(rows["labels"])
        nll = chunked_token_nll(
            self._hidden(model, rows), targets, model.logits, self.cfg.loss_chunk
        )
        shape = batch["labels"].shape
        return {"logp": (-nll).reshape(shape), "scored": (targets != IGNORE).reshape(shape)}

    def _pass_fn(self, name: str, fn: Callable, batch: dict):
        """`fn` jitted for this batch's shapes (compiled once per shape)."""
        key = (name, tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())))
        if key not in self._passes:
            p_sh = merge(self.shardings["params"], self.shardings["frozen"])
            self._passes[key] = jax.jit(
                fn,
                in_shardings=(p_sh, self.batch_shardings(batch)),
                out_shardings=NamedSharding(self.mesh, PartitionSpec()),
            )
        return self._passes[key]

    def logprob_fn(self, batch: dict):
        """The jitted log-prob pass for this batch's shapes: (full params, batch) ->
        {sum, mean, tokens} over response tokens, each (B, 2)."""
        return self._pass_fn("sums", self._logprob_pass, batch)

    def _run_pass(self, name: str, fn: Callable, params: dict, batch: dict) -> dict:
        keep = (*BATCH_KEYS, "pair_mask")  # a packed batch's pair slots shape its output
        batch = {k: np.asarray(v) for k, v in batch.items() if k in keep}
        shardings = self.batch_shardings(batch)
        arrays = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            out = self._pass_fn(name, fn, batch)(params, arrays)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    def logprobs(self, params: dict, batch: dict) -> dict:
        """Summed and token-mean response log-probs of a pair batch (numpy, (B, 2))."""
        return self._run_pass("sums", self._logprob_pass, params, batch)

    def token_logprobs(self, params: dict, batch: dict) -> dict:
        """Per-token log-probs of a pair batch (numpy): `logp` (B, 2, T), where
        position t scores token t + 1, and `scored` (B, 2, T), the label positions."""
        return self._run_pass("tokens", self._token_pass, params, batch)


class WithRefLogps:
    """Batches with `ref_logps` from the reference parameters (on-the-fly mode)."""

    def __init__(self, batches: Iterator[dict], program: DPOProgram, ref_params: dict):
        self.batches, self.program, self.ref = batches, program, ref_params

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        batch["ref_logps"] = self.program.logprobs(self.ref, batch)["sum"]
        return batch

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)


class PairBatches:
    """A pair loader as an iterator of pair-layout batches (resumable)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return pair_batch(next(self.loader))

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state) -> None:
        self.loader.set_state(state)
