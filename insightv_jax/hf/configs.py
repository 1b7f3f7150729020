"""Hugging Face `config.json` <-> our `ModelConfig`.

Reads both the transformers-5 layout (`rope_parameters`) and the older one
(`rope_theta` + `rope_scaling`); writes the transformers-5 layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from insightv_jax.config import ConfigError, DecoderConfig, ModelConfig, RopeScaling
from insightv_jax.errors import CheckpointError

DECODER_TYPES = ("llama", "qwen2")
LLAVA_TYPES = ("llava", "llava_next")
SUPPORTED_TYPES = DECODER_TYPES + LLAVA_TYPES

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


def model_from_hf(d: dict[str, Any], where: str = "config.json", tensors=None) -> ModelConfig:
    """Our ModelConfig for any supported HF config dict (`tensors`, a
    SafetensorsFolder, is needed for the original LLaVA-NeXT repository format)."""
    from insightv_jax.hf import llava

    model_type = d.get("model_type")
    if llava.is_original_format(d):
        if tensors is None:
            raise CheckpointError(f"{where}: the LLaVA-NeXT repository format needs its weights")
        return llava.original_from_hf(d, tensors, where)
    if model_type in LLAVA_TYPES:
        return llava.llava_from_hf(d, where)
    if model_type in DECODER_TYPES:
        return ModelConfig(kind="causal_lm", decoder=decoder_from_hf(d, where))
    raise CheckpointError(
        f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    )


def model_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.kind == "causal_lm":
        return decoder_to_hf(cfg.decoder)
    if cfg.is_vlm:
        from insightv_jax.hf.llava import llava_to_hf

        return llava_to_hf(cfg)
    raise CheckpointError(f"model kind {cfg.kind!r} cannot be exported to Hugging Face")
