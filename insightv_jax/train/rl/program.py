"""The RL policy step and the per-token log-prob pass on a mesh.

An RL batch is a dict of (B, ·) arrays, one row per sampled response:
`input_ids`, `attention_mask`, `labels` (B, T) — the response's token ids on
its tokens, IGNORE elsewhere (prompt, image, padding) — optional
`pixel_values` / `image_sizes` in the model's layout, `old_logps` (B, T) fp32
aligned with `shift_labels(labels)` (0 where not scored), optional
`ref_logps` (B, T), and `advantages` (B,) fp32. Both log-prob arrays come from
`RLProgram.token_logps` (the old policy's before the round's updates, the
reference's), never from the sampler: the loss compares like with like.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from insightv_jax.config import ConfigError, RLConfig
from insightv_jax.train.losses import IGNORE, shift_labels
from insightv_jax.train.optim import merge
from insightv_jax.train.rl.losses import chunked_token_logps, policy_loss, step_totals
from insightv_jax.train.steps import BATCH_KEYS, SFTProgram


class RLProgram(SFTProgram):
    """The RL step (`rl.algorithm`'s `policy_loss`) and the log-prob pass of one
    model on one mesh (see SFTProgram; `train.micro_batches` accumulates)."""

    def __init__(self, *args, rl: RLConfig | None = None, **kw):
        super().__init__(*args, **kw)
        self.rl = rl or RLConfig()
        self._passes: dict = {}

    def _token_logps(self, model, mb: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(log-probs, entropies, mask), each (B, T) in `shift_labels` layout, of
        the logits divided by `rl.temperature`."""
        targets = shift_labels(mb["labels"])
        temperature = self.rl.temperature

        def logits_fn(h):
            return model.logits(h) / temperature

        logp, ent = chunked_token_logps(
            self._hidden(model, mb), targets, logits_fn, self.cfg.loss_chunk
        )
        return logp, ent, (targets != IGNORE).astype(jnp.float32)

    # ----------------------------------------------------------- the step

    def _totals(self, batch: dict) -> dict:
        return step_totals(shift_labels(batch["labels"]) != IGNORE)

    def _micro_loss(self, trainable, frozen, mb, totals):
        if self.rl.beta > 0 and "ref_logps" not in mb:
            raise ConfigError(f"rl.beta={self.rl.beta} > 0: the batch has no ref_logps")
        logp, ent, mask = self._token_logps(self._model(trainable, frozen), mb)
        share, sums = policy_loss(
            logp, mb["old_logps"], mb["advantages"], mask, self.rl, totals, mb.get("ref_logps")
        )
        return share, {**sums, "entropy": jnp.sum(ent * mask)}

    def _metrics(self, sums: dict, totals: dict) -> dict:
        tokens = jnp.maximum(totals["tokens"], 1.0)
        return {
            "loss": sums["pg"] + self.rl.beta * sums["kl"],
            "pg_loss": sums["pg"],
            "kl": sums["kl"],
            "clip_fraction": sums["clipped"] / tokens,
            "ratio_mean": sums["ratio_sum"] / tokens,
            "entropy": sums["entropy"] / tokens,
            "response_tokens": totals["tokens"],
            "responses": totals["responses"],
        }

    # ------------------------------------------------------ the log-prob pass

    def _logp_pass(self, params: dict, batch: dict) -> jax.Array:
        model = nnx.merge(self.graphdef, params, self.rest)
        return self._token_logps(model, batch)[0]

    def token_logps_fn(self, batch: dict):
        """The jitted log-prob pass for this batch's keys and shapes (compiled
        once per shape): (full params, batch) -> (B, T) fp32 log-probs."""
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._passes:
            p_sh = merge(self.shardings["params"], self.shardings["frozen"])
            self._passes[key] = jax.jit(
                self._logp_pass,
                in_shardings=(p_sh, self.batch_shardings(batch)),
                out_shardings=NamedSharding(self.mesh, PartitionSpec()),
            )
        return self._passes[key]

    def token_logps(self, params: dict, batch: dict) -> np.ndarray:
        """Per-token log-probs (B, T) fp32 of `batch`'s response tokens under the
        full parameter dict `params` (e.g. `self.full_params(state)`), from the
        logits divided by `rl.temperature`, aligned with `shift_labels(labels)`
        (position t scores token t + 1; 0 where not scored): the step's
        `old_logps` and `ref_logps`. Reads only the model inputs of `batch`."""
        batch = {k: np.asarray(v) for k, v in batch.items() if k in BATCH_KEYS}
        shardings = self.batch_shardings(batch)
        arrays = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        with jax.set_mesh(self.mesh):
            out = self.token_logps_fn(batch)(params, arrays)
        return np.asarray(jax.device_get(out), np.float32)
