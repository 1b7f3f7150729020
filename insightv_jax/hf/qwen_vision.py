"""Qwen2-VL / Qwen2.5-VL vision towers from Hugging Face: the config mapping and
the weight import from a state dict.

Key layouts: a standalone `Qwen2VisionTransformerPretrainedModel` has no
prefix (`blocks.0.attn.qkv.weight`), a `*ForConditionalGeneration` in
transformers 5.x has `model.visual.`, hub checkpoints saved by 4.x have
`visual.`; `import_qwen_vision` finds the prefix from the patch embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from insightv_jax.config.base import ConfigError
from insightv_jax.config.qwen_vision import QwenVisionConfig
from insightv_jax.errors import CheckpointError
from insightv_jax.models.qwen_vision import QwenVisionTower

_FAMILIES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_vl_vision": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_5_vl_vision": "qwen2_5_vl",
}
_PATCH_KEY = "patch_embed.proj.weight"


def qwen_vision_from_hf(d: Mapping[str, Any], where: str = "config.json") -> QwenVisionConfig:
    """Our config of a Hugging Face Qwen2-VL / Qwen2.5-VL config (the full
    model's, whose `vision_config` is read, or the vision config itself)."""
    v = dict(d.get("vision_config", d))
    kind = v.get("model_type") or d.get("model_type")
    if kind not in _FAMILIES:
        raise CheckpointError(f"{where}: model_type {kind!r} is not a Qwen2-VL / Qwen2.5-VL tower")
    family = _FAMILIES[kind]

    def get(*names, default=None):  # the first name present (4.x checkpoints use older ones)
        for n in names:
            if n in v:
                return v[n]
        if default is None:
            raise CheckpointError(f"{where}: vision_config field {names[0]!r} is missing")
        return default

    rope = v.get("rope_parameters") or {}
    common = dict(
        family=family,
        depth=int(get("depth", "num_hidden_layers")),
        num_heads=int(get("num_heads", "num_attention_heads")),
        in_channels=int(get("in_channels", "in_chans", default=3)),
        patch_size=int(get("patch_size", "spatial_patch_size", default=14)),
        temporal_patch_size=int(get("temporal_patch_size", default=2)),
        spatial_merge_size=int(get("spatial_merge_size", default=2)),
        hidden_act=get("hidden_act", default="quick_gelu" if family == "qwen2_vl" else "silu"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    if family == "qwen2_vl":
        embed = int(get("embed_dim"))
        cfg = QwenVisionConfig(
            hidden_size=embed,
            intermediate_size=int(embed * get("mlp_ratio", default=4)),
            out_hidden_size=int(get("hidden_size")),
            **common,
        )
    else:
        cfg = QwenVisionConfig(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            out_hidden_size=int(get("out_hidden_size")),
            window_size=int(get("window_size", default=112)),
            fullatt_block_indexes=tuple(int(i) for i in get("fullatt_block_indexes", default=[])),
            tokens_per_second=int(get("tokens_per_second", default=4)),
            **common,
        )
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


class _Entry(NamedTuple):
    path: tuple[str, ...]  # into the tower's parameters
    key: str  # HF key after the prefix; "{i}" for the block index
    convert: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours
    hf_shape: tuple[int, ...]  # what the config says the HF tensor must be


def _entries(cfg: QwenVisionConfig) -> list[_Entry]:
    D, N, H, F = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    M, Dout = D * cfg.merge_unit, cfg.out_hidden_size
    C, T, P = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
    t = lambda w: w.T  # torch Linear (out, in) -> ours (in, out)

    def qkv(part: int, bias: bool):
        # HF's fused qkv rows are [q; k; v], each (N*H) head-major.
        if bias:
            return lambda b: b[part * D : (part + 1) * D].reshape(N, H)
        return lambda w: w[part * D : (part + 1) * D].reshape(N, H, D).transpose(2, 0, 1)

    out = [
        _Entry(("patch_embed",), _PATCH_KEY, lambda w: w.reshape(D, -1).T, (D, C, T, P, P)),
    ]
    blk = "blocks.{i}."
    for part, name in enumerate("qkv"):
        out.append(
            _Entry(
                ("blocks", "attn", f"{name}_proj"),
                blk + "attn.qkv.weight",
                qkv(part, False),
                (3 * D, D),
            )
        )
        out.append(
            _Entry(
                ("blocks", "attn", f"{name}_bias"), blk + "attn.qkv.bias", qkv(part, True), (3 * D,)
            )
        )
    out.append(
        _Entry(
            ("blocks", "attn", "o_proj"),
            blk + "attn.proj.weight",
            lambda w: w.T.reshape(N, H, D),
            (D, D),
        )
    )
    out.append(_Entry(("blocks", "attn", "o_bias"), blk + "attn.proj.bias", lambda b: b, (D,)))
    if cfg.family == "qwen2_5_vl":
        mlp = (
            ("gate", "gate_proj", (F, D)),
            ("up", "up_proj", (F, D)),
            ("down", "down_proj", (D, F)),
        )
    else:
        mlp = (("fc1", "fc1", (F, D)), ("fc2", "fc2", (D, F)))
    for ours, theirs, shape in mlp:
        out.append(_Entry(("blocks", "mlp", f"{ours}_proj"), f"{blk}mlp.{theirs}.weight", t, shape))
        out.append(
            _Entry(
                ("blocks", "mlp", f"{ours}_bias"), f"{blk}mlp.{theirs}.bias", lambda b: b, shape[:1]
            )
        )
    norms = [
        (("blocks", "norm1"), blk + "norm1"),
        (("blocks", "norm2"), blk + "norm2"),
        (("merger", "norm"), "merger.ln_q"),
    ]
    for path, key in norms:
        out.append(_Entry((*path, "weight"), key + ".weight", lambda w: w, (D,)))
        if cfg.family == "qwen2_vl":  # LayerNorm; Qwen2.5-VL's RMSNorm has no bias
            out.append(_Entry((*path, "bias"), key + ".bias", lambda b: b, (D,)))
    out += [
        _Entry(("merger", "fc1"), "merger.mlp.0.weight", t, (M, M)),
        _Entry(("merger", "fc1_bias"), "merger.mlp.0.bias", lambda b: b, (M,)),
        _Entry(("merger", "fc2"), "merger.mlp.2.weight", t, (Dout, M)),
        _Entry(("merger", "fc2_bias"), "merger.mlp.2.bias", lambda b: b, (Dout,)),
    ]
    return out


def find_prefix(keys) -> str:
    """The prefix of the one vision tower among state-dict `keys`."""
    found = sorted(k[: -len(_PATCH_KEY)] for k in keys if k.endswith(_PATCH_KEY))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(repr(f) for f in found)})"
        raise CheckpointError(
            f"state dict has {what} Qwen vision tower patch embeddings ({_PATCH_KEY})"
        )
    return found[0]


def _get(tree: dict, path):
    for p in path:
        tree = tree[p]
    return tree


def _fill(params: dict, cfg: QwenVisionConfig, state_dict: Mapping[str, Any], prefix: str):
    """Replace the leaves of `params` (our pure parameter dict; arrays or
    ShapeDtypeStructs) by the converted tensors of `state_dict`."""
    used: set[str] = set()
    for e in _entries(cfg):
        stacked = "{i}" in e.key
        keys = (
            [prefix + e.key.format(i=i) for i in range(cfg.depth)] if stacked else [prefix + e.key]
        )
        values = []
        for key in keys:
            if key not in state_dict:
                raise CheckpointError(f"state dict: tensor {key!r} is missing")
            value = np.asarray(state_dict[key], dtype=np.float32)
            if value.shape != e.hf_shape:
                raise CheckpointError(
                    f"state dict: tensor {key!r} of shape {value.shape} does not fit the config "
                    f"(expects {e.hf_shape})"
                )
            values.append(e.convert(value))
            used.add(key)
        leaf = _get(params, e.path[:-1])
        value = np.stack(values) if stacked else values[0]
        leaf[e.path[-1]] = jnp.asarray(value, leaf[e.path[-1]].dtype)
    extra = sorted(k for k in state_dict if k.startswith(prefix) and k not in used)
    if extra:
        raise CheckpointError(
            f"state dict: tensor {extra[0]!r} is not used by the config "
            f"({len(extra)} unused under prefix {prefix!r})"
        )


def import_qwen_vision(
    tower: QwenVisionTower, state_dict: Mapping[str, Any], prefix: str | None = None
) -> QwenVisionTower:
    """Copy a Hugging Face vision tower's weights (`state_dict`: key -> array,
    numpy or anything `np.asarray` takes) into `tower`, in place, and return it.

    Keys outside `prefix` (default: found from the patch embedding) are
    ignored, so a full model's state dict works as it is; a missing key, a
    tensor of the wrong shape or an unused key under the prefix is a
    CheckpointError naming it."""
    prefix = find_prefix(state_dict.keys()) if prefix is None else prefix
    state = nnx.state(tower, nnx.Param)
    params = nnx.to_pure_dict(state)
    _fill(params, tower.cfg, state_dict, prefix)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(tower, state)
    return tower


def load_qwen_vision(
    state_dict: Mapping[str, Any], cfg: QwenVisionConfig, prefix: str | None = None
) -> QwenVisionTower:
    """A new (unsharded) `QwenVisionTower` of `cfg` holding the weights of
    `state_dict` (see `import_qwen_vision`); nothing is randomly initialised."""
    prefix = find_prefix(state_dict.keys()) if prefix is None else prefix
    with nnx.use_eager_sharding(False):  # as models.factory builds every model
        abstract = nnx.eval_shape(lambda: QwenVisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)
    _fill(params, cfg, state_dict, prefix)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
