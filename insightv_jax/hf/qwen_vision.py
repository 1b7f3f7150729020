"""Qwen2-VL / Qwen2.5-VL vision towers and Hugging Face: the config mapping,
the weight import from a state dict and the export back (`qwen_vision_tensors`),
both directions from one table of tensors (`_entries`).

Key layouts: a standalone `Qwen2VisionTransformerPretrainedModel` has no
prefix (`blocks.0.attn.qkv.weight`), a `*ForConditionalGeneration`'s
in-memory state dict in transformers 5.x has `model.visual.`, and its saved
files (4.x and 5.x alike) have `visual.`; `import_qwen_vision` finds the
prefix from the patch embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from insightv_jax.config.base import DTYPES, ConfigError
from insightv_jax.config.qwen_vision import QwenVisionConfig
from insightv_jax.errors import CheckpointError
from insightv_jax.models.factory import attention_impl
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
    # a full model's dtype is at its top level (transformers leaves the sub-config's None)
    dtype = str(v.get("dtype") or d.get("dtype") or "float32")
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
        param_dtype=dtype if dtype in DTYPES else "float32",
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


def qwen_vision_to_hf(cfg: QwenVisionConfig) -> dict[str, Any]:
    """The Hugging Face `vision_config` of `cfg` (Qwen2-VL's field names for
    that family), which `qwen_vision_from_hf` reads back into `cfg`."""
    if cfg.norm_eps != 1e-6:
        raise CheckpointError(
            f"qwen_vision.norm_eps={cfg.norm_eps} cannot be exported (Hugging Face fixes 1e-6)"
        )
    common = dict(
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        in_channels=cfg.in_channels,
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        spatial_merge_size=cfg.spatial_merge_size,
        hidden_act=cfg.hidden_act,
        rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta},
    )
    if cfg.family == "qwen2_vl":
        # Qwen2-VL gives the MLP width as an integer ratio of the tower's width
        if cfg.intermediate_size % cfg.hidden_size:
            raise CheckpointError(
                f"qwen_vision.intermediate_size={cfg.intermediate_size} is not a multiple of "
                f"hidden_size={cfg.hidden_size} (Qwen2-VL's mlp_ratio is an integer)"
            )
        return dict(
            model_type="qwen2_vl_vision",
            embed_dim=cfg.hidden_size,
            hidden_size=cfg.out_hidden_size,
            mlp_ratio=cfg.intermediate_size // cfg.hidden_size,
            **common,
        )
    return dict(
        model_type="qwen2_5_vl_vision",
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        out_hidden_size=cfg.out_hidden_size,
        window_size=cfg.window_size,
        fullatt_block_indexes=list(cfg.fullatt_block_indexes),
        tokens_per_second=cfg.tokens_per_second,
        **common,
    )


class _Entry(NamedTuple):
    path: tuple[str, ...]  # into the tower's parameters
    key: str  # HF key after the prefix; "{i}" for the block index
    convert: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours
    to_hf: Callable[[np.ndarray], np.ndarray]  # ours -> HF layout (the inverse)
    hf_shape: tuple[int, ...]  # what the config says the HF tensor must be


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _entries(cfg: QwenVisionConfig) -> list[_Entry]:
    """The tower's tensors, both directions. Entries that share a key (HF's
    fused qkv) each convert their rows of it; exported, their `to_hf` outputs
    are concatenated along axis 0 in table order."""
    D, N, H, F = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    M, Dout = D * cfg.merge_unit, cfg.out_hidden_size
    C, T, P = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
    t = (lambda w: w.T, lambda w: w.T)  # torch Linear (out, in) <-> ours (in, out)
    same = (_same, _same)

    def qkv(part: int):
        # HF's fused qkv rows are [q; k; v], each (N*H) head-major; ours are
        # (D, N, H) kernels and (N, H) biases.
        rows = slice(part * D, (part + 1) * D)
        weight = (
            lambda w: w[rows].reshape(N, H, D).transpose(2, 0, 1),
            lambda w: w.transpose(1, 2, 0).reshape(N * H, D),
        )
        bias = (lambda b: b[rows].reshape(N, H), lambda b: b.reshape(N * H))
        return weight, bias

    patch = (lambda w: w.reshape(D, -1).T, lambda w: w.T.reshape(D, C, T, P, P))
    out = [_Entry(("patch_embed",), _PATCH_KEY, *patch, (D, C, T, P, P))]
    blk = "blocks.{i}."
    for part, name in enumerate("qkv"):
        weight, bias = qkv(part)
        attn = ("blocks", "attn")
        out.append(_Entry((*attn, f"{name}_proj"), blk + "attn.qkv.weight", *weight, (3 * D, D)))
        out.append(_Entry((*attn, f"{name}_bias"), blk + "attn.qkv.bias", *bias, (3 * D,)))
    o_proj = (lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T)
    out.append(_Entry(("blocks", "attn", "o_proj"), blk + "attn.proj.weight", *o_proj, (D, D)))
    out.append(_Entry(("blocks", "attn", "o_bias"), blk + "attn.proj.bias", *same, (D,)))
    if cfg.family == "qwen2_5_vl":
        mlp = (
            ("gate", "gate_proj", (F, D)),
            ("up", "up_proj", (F, D)),
            ("down", "down_proj", (D, F)),
        )
    else:
        mlp = (("fc1", "fc1", (F, D)), ("fc2", "fc2", (D, F)))
    for ours, theirs, shape in mlp:
        key = f"{blk}mlp.{theirs}."
        out.append(_Entry(("blocks", "mlp", f"{ours}_proj"), key + "weight", *t, shape))
        out.append(_Entry(("blocks", "mlp", f"{ours}_bias"), key + "bias", *same, shape[:1]))
    norms = [
        (("blocks", "norm1"), blk + "norm1"),
        (("blocks", "norm2"), blk + "norm2"),
        (("merger", "norm"), "merger.ln_q"),
    ]
    for path, key in norms:
        out.append(_Entry((*path, "weight"), key + ".weight", *same, (D,)))
        if cfg.family == "qwen2_vl":  # LayerNorm; Qwen2.5-VL's RMSNorm has no bias
            out.append(_Entry((*path, "bias"), key + ".bias", *same, (D,)))
    out += [
        _Entry(("merger", "fc1"), "merger.mlp.0.weight", *t, (M, M)),
        _Entry(("merger", "fc1_bias"), "merger.mlp.0.bias", *same, (M,)),
        _Entry(("merger", "fc2"), "merger.mlp.2.weight", *t, (Dout, M)),
        _Entry(("merger", "fc2_bias"), "merger.mlp.2.bias", *same, (Dout,)),
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


def qwen_vision_tensors(
    params: Mapping[str, Any],
    cfg: QwenVisionConfig,
    prefix: str = "",
    to_host: Callable[[Any], np.ndarray] = np.asarray,
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, numpy array) for every tensor of a tower, in Hugging Face's
    layout under `prefix` (`visual.` in a saved `*ForConditionalGeneration`).

    `params` is the tower's pure parameter dict; `to_host` brings one of its
    arrays to numpy (the export passes one that gathers across hosts). Each
    array is fetched once, and only the arrays of one HF key at a time (a
    block stack; the fused qkv's three stacks together)."""
    by_key: dict[str, list[_Entry]] = {}  # the fused qkv's entries share one key
    for e in _entries(cfg):
        by_key.setdefault(e.key, []).append(e)
    for key, group in by_key.items():
        values = [to_host(_get(params, e.path)) for e in group]
        stacked = "{i}" in key
        for i in range(cfg.depth if stacked else 1):
            parts = [e.to_hf(v[i] if stacked else v) for e, v in zip(group, values)]
            yield prefix + key.format(i=i), parts[0] if len(parts) == 1 else np.concatenate(parts)


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
        impl = attention_impl(cfg)
        abstract = nnx.eval_shape(lambda: QwenVisionTower(cfg, attention_impl=impl,
                                                          rngs=nnx.Rngs(0)))  # fmt: skip
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)
    _fill(params, cfg, state_dict, prefix)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
