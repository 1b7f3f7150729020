"""The optimiser (AdamW, warmup + cosine, global-norm clipping) and which
parameters it sees: the model's parameters are split into a trainable and a
frozen part by the config's `trainable` subset of {vision, projector, llm}, so
optimizer state exists only for what trains. With `train.master_weights`, the
trainable leaves held below fp32 also get an fp32 master copy (`master_paths`,
`fp32_weights`, `from_fp32_weights`): the optimizer sees only fp32 weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from insightv_jax.config import TrainConfig

# First path component -> part. Anything not listed belongs to the language model.
# The VLM registers its own names here (e.g. `PART_OF_PREFIX["vision_tower"]`).
PART_OF_PREFIX: dict[str, str] = {
    "vision_tower": "vision",
    "vision": "vision",
    "projector": "projector",
    "multi_modal_projector": "projector",
    "image_newline": "projector",
}


# Qwen-VL's 2x2 patch merger sits inside its tower but is the projector of the
# recipes (Qwen's own fine-tuning trains it with the LLM and freezes the ViT).
PART_OF_SUBTREE: dict[tuple[str, str], str] = {("vision", "merger"): "projector"}


def param_part(path: tuple[str, ...]) -> str:
    """'vision', 'projector' or 'llm' for a parameter path like ('layers', 'attn', 'q_proj')."""
    head = tuple(str(k) for k in path[:2])
    if head in PART_OF_SUBTREE:
        return PART_OF_SUBTREE[head]
    for key in path[:1]:
        if str(key) in PART_OF_PREFIX:
            return PART_OF_PREFIX[str(key)]
    return "llm"


def partition(tree: dict, keep: Callable[[tuple[str, ...]], bool], prefix=()) -> tuple[dict, dict]:
    """Split a nested dict of arrays into (leaves where keep(path), the others).

    Empty sub-dicts are dropped so both halves are plain pytrees.
    """
    kept, rest = {}, {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, dict):
            a, b = partition(value, keep, path)
            if a:
                kept[key] = a
            if b:
                rest[key] = b
        elif keep(path):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def merge(a: dict, b: dict) -> dict:
    """Deep union of two nested dicts with disjoint leaves (inverse of `partition`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def split_trainable(params: dict, trainable: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable params, frozen params) by part."""
    return partition(params, lambda path: param_part(path) in trainable)


def _paths(tree: dict, keep=lambda leaf: True) -> frozenset[tuple[str, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return frozenset(tuple(str(k.key) for k in path) for path, leaf in flat if keep(leaf))


def master_paths(trainable: dict) -> frozenset[tuple[str, ...]]:
    """The paths (as `partition` spells them) of the leaves of `trainable` (arrays
    or ShapeDtypeStructs) held below fp32: those that get an fp32 master copy."""
    return _paths(trainable, lambda leaf: jnp.dtype(leaf.dtype) != jnp.float32)


def fp32_weights(params: dict, master: dict) -> dict:
    """The trainable weights as the optimizer sees them: the master copy where
    there is one, the parameter itself elsewhere."""
    paths = _paths(master)
    return merge(master, partition(params, lambda path: path not in paths)[0])


def from_fp32_weights(
    weights: dict, params: dict, paths: frozenset[tuple[str, ...]]
) -> tuple[dict, dict]:
    """(parameters, master copy) from updated fp32 `weights`: the leaves at
    `paths` are kept as the new master and rounded to their dtype in `params`
    (round to nearest even), the others are the new parameters as they are."""
    master, rest = partition(weights, lambda path: path in paths)
    low = partition(params, lambda path: path in paths)[0]
    rounded = jax.tree.map(lambda m, p: m.astype(p.dtype), master, low)
    return merge(rounded, rest), master


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(round(cfg.warmup_fraction * total_steps))


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then cosine to 0 (or constant)."""
    total_steps = max(1, total_steps)
    warm = warmup_steps(cfg, total_steps)
    if cfg.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)], [warm]
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else cfg.lr,
        peak_value=cfg.lr,
        warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1),
        end_value=0.0,
    )


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) -> AdamW(schedule, weight decay)."""
    parts: list[Any] = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
    )
    return optax.chain(*parts)
