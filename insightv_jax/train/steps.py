"""The jitted, sharded SFT step (pjit style) and the train state it updates.

Train state (a plain pytree, checkpointed as is):
    params   trainable parameters (nested dict of arrays, the model's pure-dict layout)
    frozen   frozen parameters (same layout, disjoint leaves)
    master   with `train.master_weights` and parameters below fp32 only: fp32
             copies of the trainable leaves held below fp32 (sharded like them)
    opt      optax state for `params` only (fp32 where a master copy exists)
    step     optimizer steps taken (int32), skipped: non-finite steps skipped (int32)

The step is `jax.jit` with explicit in/out shardings for every leaf and the
state donated; `nnx.jit` is avoided because it lets output shardings drift.
The model enters only through its graphdef and the `models.interface.CausalLM`
methods `hidden_states(...)` + `output_head()` (`logits(hidden)` for DPO), so
the text decoder and the VLM share this code.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from insightv_jax.config import TrainConfig
from insightv_jax.models.interface import CausalLM
from insightv_jax.models.qwen_vl import BATCH_KEYS as QWEN_VL_BATCH_KEYS
from insightv_jax.parallel import logical_to_spec
from insightv_jax.train.losses import IGNORE, fused_ce_sum, shift_labels
from insightv_jax.train.optim import (
    fp32_weights,
    from_fp32_weights,
    lr_schedule,
    make_optimizer,
    master_paths,
    merge,
    partition,
    split_trainable,
)

# The model inputs of a training batch: LLaVA's images per sample, Qwen-VL's
# laid out per row with their M-RoPE positions (`models.qwen_vl.BATCH_KEYS`).
BATCH_KEYS = tuple(
    dict.fromkeys(("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "segment_ids",
                   *QWEN_VL_BATCH_KEYS))
)  # fmt: skip


def _dict_path(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def like_params_shardings(tree: Any, param_shardings: dict, mesh: Mesh) -> Any:
    """Shardings for an optax state: a leaf whose dict path and shape match a
    parameter gets that parameter's sharding; everything else is replicated."""
    table = {_dict_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        return table.get(_dict_path(path), replicated) if leaf.ndim else replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Batch-major arrays are split over ('data', 'fsdp') on their first axis."""
    names = ("act_batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


class SFTProgram:
    """The SFT step of one model on one mesh: state layout, shardings, init, step.

    `graphdef`/`rest` come from `nnx.split(model, nnx.Param, ...)`;
    `abstract_params` is the pure dict of `jax.ShapeDtypeStruct`s (with
    shardings) of all parameters.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        rest: Any,
        abstract_params: dict,
        cfg: TrainConfig,
        mesh: Mesh,
        total_steps: int,
    ):
        self.graphdef, self.rest, self.cfg, self.mesh = graphdef, rest, cfg, mesh
        self.total_steps = total_steps
        self.tx = make_optimizer(cfg, total_steps)
        self.schedule = lr_schedule(cfg, total_steps)
        trainable, frozen = split_trainable(abstract_params, cfg.trainable)
        if not jax.tree.leaves(trainable):
            raise ValueError(f"train.trainable={list(cfg.trainable)} selects no parameters")
        p_sh = jax.tree.map(lambda a: a.sharding, trainable)
        f_sh = jax.tree.map(lambda a: a.sharding, frozen)
        # The master copy: fp32 twins of the trainable leaves below fp32, each
        # with its parameter's sharding. Empty (no "master" in the state, the
        # checkpoint layout unchanged) when the option is off or all is fp32.
        self.master_paths = master_paths(trainable) if cfg.master_weights else frozenset()
        master = partition(trainable, lambda path: path in self.master_paths)[0]
        master = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), master
        )
        abstract_opt = jax.eval_shape(self.tx.init, fp32_weights(trainable, master))
        o_sh = like_params_shardings(abstract_opt, p_sh, mesh)
        rep = NamedSharding(mesh, PartitionSpec())
        self.shardings = {"params": p_sh, "frozen": f_sh, "opt": o_sh, "step": rep, "skipped": rep}
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        self.abstract_state = {
            "params": trainable,
            "frozen": frozen,
            "opt": jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, o_sh
            ),
            "step": scalar,
            "skipped": scalar,
        }
        if self.master_paths:
            self.shardings["master"] = jax.tree.map(lambda a: a.sharding, master)
            self.abstract_state["master"] = master
        self._init_opt = jax.jit(self.tx.init, out_shardings=o_sh)
        self._steps: dict[Any, Any] = {}
        self._update = None

    # ------------------------------------------------------------- state

    def init_state(self, params: dict) -> dict:
        """A fresh train state from a full (sharded) parameter pure dict.

        Parameters of another dtype than the program's (an fp32 checkpoint
        trained in bf16) are cast to it; the master copy is taken from the
        values given, so an fp32 start loses nothing to the bf16 parameters."""
        trainable, frozen = split_trainable(params, self.cfg.trainable)
        a = self.abstract_state
        master = partition(trainable, lambda path: path in self.master_paths)[0]
        master = jax.tree.map(lambda x: x.astype(jnp.float32), master)

        def cast(tree, like):  # only where the dtype differs: no copy of what fits
            return jax.tree.map(
                lambda x, t: x.astype(t.dtype) if x.dtype != t.dtype else x, tree, like
            )

        trainable, frozen = cast(trainable, a["params"]), cast(frozen, a["frozen"])
        with jax.set_mesh(self.mesh):
            opt = self._init_opt(fp32_weights(trainable, master))

        def zero():  # distinct buffers: the state is donated leaf by leaf
            return jax.device_put(jnp.zeros((), jnp.int32), self.shardings["step"])

        state = {
            "params": trainable,
            "frozen": frozen,
            "opt": opt,
            "step": zero(),
            "skipped": zero(),
        }
        if self.master_paths:
            state["master"] = master
        return state

    @staticmethod
    def full_params(state: dict) -> dict:
        """All parameters (trainable ∪ frozen): the model's pure-dict layout."""
        return merge(state["params"], state["frozen"])

    def model(self, state: dict) -> nnx.Module:
        """The model with the state's parameters (for evaluation and export)."""
        return nnx.merge(self.graphdef, self.full_params(state), self.rest)

    def lr_at(self, applied_steps: int) -> float:
        return float(self.schedule(applied_steps))

    # -------------------------------------------------------------- step

    def batch_shardings(self, batch: dict) -> dict:
        return {k: batch_sharding(self.mesh, tuple(v.shape)) for k, v in batch.items()}

    def grads_fn(self, batch: dict):
        """The jitted gradient program for this batch's keys/shapes (compiled
        once per shape): (state, batch) -> (fp32 gradients, metrics)."""
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._steps:
            rep = NamedSharding(self.mesh, PartitionSpec())
            self._steps[key] = jax.jit(
                self._gradients,
                in_shardings=(self.shardings, self.batch_shardings(batch)),
                out_shardings=(self.shardings["params"], rep),  # every metric replicated
            )
        return self._steps[key]

    def update_fn(self):
        """The jitted update program, compiled once whatever the batch shape:
        (state, gradients, metrics) -> (new state, metrics), the state donated."""
        if self._update is None:
            rep = NamedSharding(self.mesh, PartitionSpec())
            self._update = jax.jit(
                self._apply,
                in_shardings=(self.shardings, self.shardings["params"], rep),
                out_shardings=(self.shardings, rep),
                donate_argnums=0,
            )
        return self._update

    def __call__(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step: two programs, so that a new batch shape compiles
        only the forward/backward and not the optimizer (~40 % of the tiny
        VLM's step compile) again."""
        with jax.set_mesh(self.mesh):
            grads, metrics = self.grads_fn(batch)(state, batch)
            return self.update_fn()(state, grads, metrics)

    def lower(self, abstract_batch: dict):
        """Lower the whole step as one program against abstract state and batch
        (memory planning: its peak bounds the two programs' peaks)."""
        rep = NamedSharding(self.mesh, PartitionSpec())
        step = jax.jit(
            self._step,
            in_shardings=(self.shardings, self.batch_shardings(abstract_batch)),
            out_shardings=(self.shardings, rep),
            donate_argnums=0,
        )
        with jax.set_mesh(self.mesh):
            return step.lower(self.abstract_state, abstract_batch)

    # The objective, split so that subclasses (DPO) reuse the step: `_totals`
    # computes whole-batch normalisers once, `_micro_loss` a micro-batch's share
    # of the loss (shares add up to the loss) plus sums to report, `_metrics`
    # turns the accumulated sums into the step's metrics ("loss" is required).

    def _model(self, trainable, frozen) -> CausalLM:
        return nnx.merge(self.graphdef, merge(trainable, frozen), self.rest)

    @staticmethod
    def _hidden(model: CausalLM, mb: dict) -> jax.Array:
        """The model's final hidden states for a batch dict (images optional)."""
        return model.hidden_states(mb["input_ids"], mb["attention_mask"], **model.batch_inputs(mb))

    def _loss_sum(self, trainable, frozen, mb):
        model = self._model(trainable, frozen)
        hidden = self._hidden(model, mb)
        total, _ = fused_ce_sum(
            hidden, shift_labels(mb["labels"]), model.output_head(), self.cfg.loss_chunk
        )
        return total

    def _totals(self, batch: dict) -> dict:
        return {"tokens": jnp.sum(shift_labels(batch["labels"]) != IGNORE).astype(jnp.float32)}

    def _micro_loss(self, trainable, frozen, mb, totals):
        total = self._loss_sum(trainable, frozen, mb)
        return total / jnp.maximum(totals["tokens"], 1.0), {"ce_sum": total}

    def _metrics(self, sums: dict, totals: dict) -> dict:
        return {"loss": sums["ce_sum"] / jnp.maximum(totals["tokens"], 1.0), **totals}

    def _step(self, state: dict, batch: dict):
        """Gradients and update as one function (what `lower` plans)."""
        return self._apply(state, *self._gradients(state, batch))

    def _gradients(self, state: dict, batch: dict):
        """(fp32 gradients of the trainable params, metrics), accumulated over
        `micro_batches` micro-batches."""
        M = self.cfg.micro_batches
        trainable, frozen = state["params"], state["frozen"]
        totals = self._totals(batch)

        def scaled(p, mb):
            return self._micro_loss(p, frozen, mb, totals)

        grad_fn = jax.value_and_grad(scaled, has_aux=True)
        if M == 1:
            (_, sums), grads = grad_fn(trainable, batch)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            # (B, ...) -> (M, B/M, ...) taking every M-th row, so each device's
            # rows stay on the device (no data movement for any mesh).
            def micro(x):
                y = x.reshape((x.shape[0] // M, M) + x.shape[1:]).swapaxes(0, 1)
                spec = batch_sharding(self.mesh, y.shape[1:]).spec
                return jax.lax.with_sharding_constraint(y, PartitionSpec(None, *spec))

            mbs = jax.tree.map(micro, batch)
            zeros = jax.tree.map(
                lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros(p.shape, jnp.float32), s),
                trainable,
                self.shardings["params"],
            )
            mb0 = jax.tree.map(lambda x: x[0], mbs)
            shapes = jax.eval_shape(scaled, trainable, mb0)[1]
            sums0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

            def body(carry, mb):
                acc, tot = carry
                (_, s), g = grad_fn(trainable, mb)
                acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
                return (acc, jax.tree.map(jnp.add, tot, s)), None

            (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), mbs)

        return grads, self._metrics(sums, totals)

    def _apply(self, state: dict, grads: dict, metrics: dict):
        """The optimizer update from gradients; adds grad_norm and finite to metrics.

        With a master copy the update is applied to the fp32 weights and the
        result rounded into the parameters: a bf16 parameter then moves by the
        sum of many updates smaller than its own rounding step, which bf16
        arithmetic alone would drop one by one."""
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        paths = self.master_paths

        def update(params, master, opt):
            weights = fp32_weights(params, master)
            updates, new_opt = self.tx.update(grads, opt, weights)
            # the state keeps its dtypes (fp32 gradients would promote bf16 moments)
            new_opt = jax.tree.map(lambda n, o: n.astype(o.dtype), new_opt, opt)
            new_weights = optax.apply_updates(weights, updates)
            return (*from_fp32_weights(new_weights, params, paths), new_opt)

        # A non-finite step leaves params and optimizer state as they were. A
        # branch, not a select: only one of the two states is ever written.
        new_params, new_master, new_opt = jax.lax.cond(
            finite,
            update,
            lambda p, m, o: (p, m, o),
            state["params"],
            state.get("master", {}),
            state["opt"],
        )
        new_state = {
            "params": new_params,
            "frozen": state["frozen"],
            "opt": new_opt,
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        if paths:
            new_state["master"] = new_master
        return new_state, {**metrics, "grad_norm": grad_norm, "finite": finite}
