"""Hugging Face `config.json` <-> our `ModelConfig`: decoders (Llama, Qwen2),
LLaVA / LLaVA-NeXT in the transformers layout, and the original LLaVA-NeXT
repository format (`mm_*` fields; the Insight-V agents).

Decoders: reads both the transformers-5 layout (`rope_parameters`) and the older one
(`rope_theta` + `rope_scaling`); writes the transformers-5 layout. Qwen2-VL /
Qwen2.5-VL: both directions, written as transformers 5.x saves them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from insightv_jax.config import (
    ConfigError,
    DecoderConfig,
    LlavaConfig,
    ModelConfig,
    QwenVLConfig,
    RopeScaling,
    VisionConfig,
)
from insightv_jax.errors import CheckpointError
from insightv_jax.hf.llava import LAYOUTS
from insightv_jax.hf.qwen_vision import qwen_vision_from_hf, qwen_vision_to_hf
from insightv_jax.vision_grid import tokens_per_tile

DECODER_TYPES = ("llama", "qwen2")
LLAVA_TYPES = ("llava", "llava_next")
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
SUPPORTED_TYPES = DECODER_TYPES + LLAVA_TYPES + QWEN_VL_TYPES

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """A folder's config.json as a dict; unreadable or malformed is a one-line CheckpointError."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level must be a JSON object")
    return data


_REQUIRED = object()


def _number(d: dict[str, Any], key: str, kind: type, where: str, default: Any = _REQUIRED):
    """Field `key` of a config dict as an int or float (`kind`); null or absent gives
    `default`. A missing required field or a value of another type names the field,
    where int("x") or float(None) would end in a traceback."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{where}: required field {key!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: field {key!r} is {value!r}, not a number")
    if kind is int and value != int(value):
        raise CheckpointError(f"{where}: field {key!r} is {value!r}, not an integer")
    return kind(value)


def _section(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """A nested object field (null or absent: empty)."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: field {key!r} is {value!r}, not an object")
    return value


def _rope(d: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    params = _section(d, "rope_parameters", where)
    legacy = _section(d, "rope_scaling", where)
    theta = _number(params, "rope_theta", float, where, _number(d, "rope_theta", float, where, 1e4))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    src = params if params.get("rope_type") not in (None, "default") else legacy
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            rope_type="llama3",
            factor=_number(src, "factor", float, where),
            low_freq_factor=_number(src, "low_freq_factor", float, where, 1.0),
            high_freq_factor=_number(src, "high_freq_factor", float, where, 4.0),
            original_max_position_embeddings=_number(
                src, "original_max_position_embeddings", int, where
            ),
        )
    if kind == "linear":
        return theta, RopeScaling(rope_type="linear", factor=_number(src, "factor", float, where))
    raise ConfigError(f"rope_type {kind!r} is not supported (default, linear, llama3)")


def decoder_from_hf(d: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    """A DecoderConfig from a LlamaConfig / Qwen2Config dict."""
    model_type = d.get("model_type")
    if model_type not in DECODER_TYPES:
        raise CheckpointError(
            f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (silu)")
    if d.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if d.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
    try:
        theta, scaling = _rope(d, where)
        heads = _number(d, "num_attention_heads", int, where)
        dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32")
        is_qwen = model_type == "qwen2"
        cfg = DecoderConfig(
            vocab_size=_number(d, "vocab_size", int, where),
            hidden_size=_number(d, "hidden_size", int, where),
            intermediate_size=_number(d, "intermediate_size", int, where),
            num_layers=_number(d, "num_hidden_layers", int, where),
            num_heads=heads,
            num_kv_heads=_number(d, "num_key_value_heads", int, where, heads) or heads,
            head_dim=_number(d, "head_dim", int, where, 0) or None,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=_number(d, "rms_norm_eps", float, where, 1e-6),
            qkv_bias=True if is_qwen else bool(d.get("attention_bias", False)),
            o_bias=False if is_qwen else bool(d.get("attention_bias", False)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=_number(d, "max_position_embeddings", int, where, 8192),
            param_dtype=_DTYPE_NAMES.get(dtype, "float32"),
            dtype="float32",
            family="qwen2" if is_qwen else "llama",
        )
        cfg.validate()  # zero heads or widths: named here, not a ZeroDivisionError later
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def decoder_to_hf(cfg: DecoderConfig, dtype: str | None = None) -> dict[str, Any]:
    """A LlamaConfig / Qwen2Config dict for `cfg`."""
    if cfg.mrope_section is not None:
        raise CheckpointError(
            "a decoder with mrope_section exports only as part of a Qwen-VL model "
            "(kind qwen2_vl / qwen2_5_vl)"
        )
    if cfg.family == "qwen2" and (not cfg.qkv_bias or cfg.o_bias):
        raise CheckpointError("a qwen2 decoder needs qkv_bias=true and o_bias=false to export")
    if cfg.family == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError("a llama decoder exports attention_bias only as qkv_bias == o_bias")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.rope_type, "rope_theta": cfg.rope_theta, "factor": s.factor}
        if s.rope_type == "llama3":
            rope.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if cfg.family == "qwen2" else "LlamaForCausalLM"],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "dtype": dtype or cfg.param_dtype,
    }
    if cfg.family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


# ------------------------------------------------------------ LLaVA configs

_VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def _normalise(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill transformers' defaults into a (possibly partial) llava config dict."""
    try:
        from transformers import AutoConfig

        rest = {k: v for k, v in d.items() if k != "model_type"}
        return AutoConfig.for_model(d["model_type"], **rest).to_dict()
    except Exception as e:  # transformers validates; report one line
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: invalid {d.get('model_type')} config ({first})") from None


def vision_from_hf(v: dict[str, Any], where: str) -> VisionConfig:
    family = _VISION_TYPES.get(v.get("model_type"))
    if family is None:
        raise CheckpointError(
            f"{where}: vision_config model_type {v.get('model_type')!r} is not supported "
            f"({', '.join(_VISION_TYPES)})"
        )
    try:
        return VisionConfig(
            family=family,
            image_size=int(v["image_size"]),
            patch_size=int(v["patch_size"]),
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_layers=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]),
            num_channels=int(v.get("num_channels", 3)),
            layer_norm_eps=float(v["layer_norm_eps"]),
            hidden_act=v["hidden_act"],
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: vision_config field {e.args[0]!r} is missing") from None


def vision_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    out = {
        "model_type": "clip_vision_model" if cfg.family == "clip" else "siglip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
    }
    if cfg.family == "siglip":
        out["vision_use_head"] = False
    return out


def llava_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig for a `llava` / `llava_next` config.json (transformers layout)."""
    full = _normalise(d, where)
    text = dict(full["text_config"])
    # transformers writes the sub-config's dtype as null; the model's is at the top
    text["dtype"] = text.get("dtype") or full.get("dtype")
    text["tie_word_embeddings"] = bool(full.get("tie_word_embeddings", False))
    layer = full.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r} (a list) is not supported")
    if full.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: projector_hidden_act {full['projector_hidden_act']!r}")
    image_id = full.get("image_token_index", full.get("image_token_id"))
    kind = full["model_type"]
    pinpoints = tuple(tuple(int(x) for x in p) for p in full.get("image_grid_pinpoints") or ())
    try:
        cfg = ModelConfig(
            kind=kind,
            decoder=decoder_from_hf(text, f"{where} text_config"),
            vision=vision_from_hf(full["vision_config"], f"{where} vision_config"),
            llava=LlavaConfig(
                image_token_id=int(image_id),
                feature_layer=int(layer),
                feature_strategy=full.get("vision_feature_select_strategy", "default"),
                projector_bias=bool(full.get("multimodal_projector_bias", True)),
                image_grid_pinpoints=pinpoints if kind == "llava_next" else (),
            ),
        )
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def llava_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A LlavaConfig / LlavaNextConfig dict for `cfg`."""
    image_id = cfg.llava.image_token_id
    if not 0 <= image_id < cfg.decoder.vocab_size:
        raise CheckpointError(
            f"image_token_id {image_id} is not a vocabulary id: add an <image> token before "
            "exporting to Hugging Face"
        )
    text = decoder_to_hf(cfg.decoder)
    text.pop("architectures")
    next_ = cfg.kind == "llava_next"
    out = {
        "architectures": [
            "LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"
        ],
        "model_type": cfg.kind,
        "image_token_index": image_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.llava.projector_bias,
        "vision_feature_layer": cfg.llava.feature_layer,
        "vision_feature_select_strategy": cfg.llava.feature_strategy,
        "image_seq_length": tokens_per_tile(cfg),
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
        "text_config": text,
        "vision_config": vision_to_hf(cfg.vision),
        "dtype": cfg.decoder.param_dtype,
    }
    if next_:
        out["image_grid_pinpoints"] = [list(p) for p in cfg.llava.image_grid_pinpoints]
    return out


# ------------------------------------------------------- Qwen2-VL / Qwen2.5-VL


def qwen_vl_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our ModelConfig of a Qwen2-VL / Qwen2.5-VL config.json dict.

    transformers 5.x nests the language model under `text_config`
    (`rope_parameters.mrope_section`); hub checkpoints saved by 4.x keep its
    fields at the top level with `rope_scaling: {type: mrope, ...}` and, as
    the 3B models do, `tie_word_embeddings` at the top. Both go through
    transformers' own config class first, so defaults and old names resolve
    as there."""
    kind = d.get("model_type")
    if kind not in QWEN_VL_TYPES:
        raise CheckpointError(f"{where}: model_type {kind!r} is not one of {QWEN_VL_TYPES}")
    full = _normalise(d, where)
    text = dict(full["text_config"])
    rope = text.get("rope_parameters") or {}
    section = rope.get("mrope_section")
    if section is None:
        raise CheckpointError(f"{where}: text_config rope_parameters.mrope_section is missing")
    # The decoder is a Qwen2 one; tying is a top-level field in 5.x (4.x saves
    # sometimes put it in the text config: either ties).
    text["model_type"] = "qwen2"
    text["tie_word_embeddings"] = bool(
        full.get("tie_word_embeddings") or text.get("tie_word_embeddings")
    )
    # transformers leaves the text config's dtype None; the model's is at the top
    text["dtype"] = text.get("dtype") or full.get("dtype")
    decoder = decoder_from_hf(text, f"{where} text_config")
    ids = {
        key: _number(full, key, int, where)
        for key in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
        )
    }  # fmt: skip
    try:
        cfg = ModelConfig(
            kind=kind,
            decoder=dataclasses.replace(decoder, mrope_section=tuple(int(s) for s in section)),
            qwen_vision=qwen_vision_from_hf(full, where),
            qwen_vl=QwenVLConfig(**ids),
        )
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


_QWEN_VL_ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def qwen_vl_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A Qwen2VLConfig / Qwen2_5_VLConfig dict for `cfg`, laid out as
    transformers 5.x saves one (the language model under `text_config` with
    `rope_parameters.mrope_section`, tying at the top level);
    `qwen_vl_from_hf` reads it back into `cfg`. The one `dtype` written is
    the decoder's (the tower reads it back as its own too)."""
    dec = cfg.decoder
    if dec.rope_scaling is not None:
        raise CheckpointError("a Qwen-VL decoder with rope_scaling cannot be exported")
    if dec.resolved_head_dim != dec.hidden_size // dec.num_heads:
        # transformers' Qwen-VL attention derives head_dim; it has no such field
        raise CheckpointError(
            f"decoder.head_dim={dec.resolved_head_dim} cannot be exported: Qwen-VL's is "
            f"hidden_size / num_heads = {dec.hidden_size // dec.num_heads}"
        )
    # a Qwen-VL's language model is a Qwen2 one, whatever `decoder.family` a
    # preset left at its default (the family only names the export's layout)
    text = decoder_to_hf(dataclasses.replace(dec, mrope_section=None, family="qwen2"))
    for key in ("architectures", "head_dim", "tie_word_embeddings", "dtype"):
        text.pop(key)  # no head_dim (above); the rest live at the top level
    text["model_type"] = f"{cfg.kind}_text"
    text["rope_parameters"]["mrope_section"] = list(dec.mrope_section)
    return {
        "architectures": [_QWEN_VL_ARCHITECTURES[cfg.kind]],
        "model_type": cfg.kind,
        # the token ids; the pixel bounds go to preprocessor_config.json
        **{k: v for k, v in dataclasses.asdict(cfg.qwen_vl).items() if k.endswith("_token_id")},
        "tie_word_embeddings": dec.tie_embeddings,
        "text_config": text,
        "vision_config": qwen_vision_to_hf(cfg.qwen_vision),
        "dtype": dec.param_dtype,
    }


# ------------------------------------------------- original LLaVA-NeXT format

# Attention heads cannot be read off the weights; known towers by name.
_KNOWN_HEADS = {"clip-vit-large": 16, "clip-vit-base": 12, "siglip-so400m": 16, "siglip-base": 12}


def is_original_format(d: dict[str, Any]) -> bool:
    return "mm_vision_tower" in d or "mm_projector_type" in d


def parse_pinpoints(value, tile: int) -> tuple[tuple[int, int], ...]:
    """Original pinpoints are (width, height) pairs, or a "(1x1),...,(3x3)" range of
    grids of `tile`; ours are (height, width). Order is kept (it breaks ties)."""
    if isinstance(value, str):
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        if not found:
            raise CheckpointError(f"image_grid_pinpoints {value!r} is not understood")
        (w0, h0), (w1, h1) = map(int, found[0]), map(int, found[-1])
        pairs = [(i, j) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
        return tuple((j * tile, i * tile) for i, j in pairs)
    return tuple((int(h), int(w)) for w, h in value)


def original_from_hf(d: dict[str, Any], tensors, where: str = "config.json") -> ModelConfig:
    """ModelConfig for a LLaVA-NeXT repository checkpoint (`mm_*` config fields).

    The vision tower's shape is read off its weights (the config only names it);
    its head count comes from `vision_config.num_attention_heads` if present, else
    the tower name, else width / 64.
    """
    prefix = LAYOUTS["original"]["vision"]
    name = str(d.get("mm_vision_tower", ""))
    if f"{prefix}embeddings.patch_embedding.weight" not in tensors:
        raise CheckpointError(f"{where}: vision tower weights ({prefix}…) are missing")
    if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"{where}: mm_projector_type {d['mm_projector_type']!r} (mlp2x_gelu)")
    family = "siglip" if "siglip" in name.lower() else "clip"
    D, C, P, _ = tensors.shape(f"{prefix}embeddings.patch_embedding.weight")
    n_pos = tensors.shape(f"{prefix}embeddings.position_embedding.weight")[0]
    side = int(round((n_pos - (family == "clip")) ** 0.5))
    layers = 0
    while f"{prefix}encoder.layers.{layers}.layer_norm1.weight" in tensors:
        layers += 1
    heads = (d.get("vision_config") or {}).get("num_attention_heads")
    if heads is None:
        heads = next((n for k, n in _KNOWN_HEADS.items() if k in name.lower()), max(1, D // 64))
    vision = VisionConfig(
        family=family,
        image_size=side * P,
        patch_size=P,
        hidden_size=D,
        intermediate_size=tensors.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=layers,
        num_heads=int(heads),
        num_channels=C,
        layer_norm_eps=1e-5 if family == "clip" else 1e-6,
        hidden_act="quick_gelu" if family == "clip" else "gelu_pytorch_tanh",
    )
    aspect = str(d.get("image_aspect_ratio", "pad"))
    kind = "llava_next" if aspect.startswith("anyres") else "llava"
    merge = str(d.get("mm_patch_merge_type", "flat"))
    if kind == "llava_next" and (aspect != "anyres" or merge != "spatial_unpad"):
        raise CheckpointError(
            f"{where}: image_aspect_ratio={aspect!r} with mm_patch_merge_type={merge!r} is not "
            "supported (anyres + spatial_unpad)"
        )
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise CheckpointError(f"{where}: mm_vision_select_feature {select!r} is not supported")
    text = dict(d)
    family_lm = "qwen2" if "qwen" in str(d.get("model_type", "")).lower() else "llama"
    text["model_type"] = family_lm
    pinpoints = ()
    if kind == "llava_next":
        pinpoints = parse_pinpoints(d.get("image_grid_pinpoints"), vision.image_size)
    try:
        cfg = ModelConfig(
            kind=kind,
            decoder=decoder_from_hf(text, where),
            vision=vision,
            llava=LlavaConfig(
                image_token_id=int(d.get("image_token_index", -200)),
                feature_layer=int(d.get("mm_vision_select_layer", -2)),
                feature_strategy="default" if select == "patch" else "full",
                projector_bias=True,
                image_grid_pinpoints=pinpoints,
            ),
        )
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


# ------------------------------------------------------------------ any model


def model_from_hf(d: dict[str, Any], where: str = "config.json", tensors=None) -> ModelConfig:
    """Our ModelConfig for any supported HF config dict (`tensors`, a
    SafetensorsFolder, is needed for the original LLaVA-NeXT repository format)."""
    model_type = d.get("model_type")
    if is_original_format(d):
        if tensors is None:
            raise CheckpointError(f"{where}: the LLaVA-NeXT repository format needs its weights")
        return original_from_hf(d, tensors, where)
    if model_type in LLAVA_TYPES:
        return llava_from_hf(d, where)
    if model_type in QWEN_VL_TYPES:
        return qwen_vl_from_hf(d, where)
    if model_type in DECODER_TYPES:
        return ModelConfig(kind="causal_lm", decoder=decoder_from_hf(d, where))
    raise CheckpointError(
        f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    )


def model_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config.json dict of any exportable ModelConfig."""
    if cfg.kind == "causal_lm":
        return decoder_to_hf(cfg.decoder)
    if cfg.is_vlm:
        return llava_to_hf(cfg)
    if cfg.is_qwen_vl:
        return qwen_vl_to_hf(cfg)
    raise CheckpointError(f"model kind {cfg.kind!r} cannot be exported to Hugging Face")
