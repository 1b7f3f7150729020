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
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    src = params if params.get("rope_type") not in (None, "default") else legacy
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), RopeScaling(
            rope_type="llama3",
            factor=float(src["factor"]),
            low_freq_factor=float(src.get("low_freq_factor", 1.0)),
            high_freq_factor=float(src.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(src["original_max_position_embeddings"]),
        )
    if kind == "linear":
        return float(theta), RopeScaling(rope_type="linear", factor=float(src["factor"]))
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
        theta, scaling = _rope(d)
        heads = int(d["num_attention_heads"])
        dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32")
        is_qwen = model_type == "qwen2"
        return DecoderConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d["head_dim"]) if d.get("head_dim") else None,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            qkv_bias=True if is_qwen else bool(d.get("attention_bias", False)),
            o_bias=False if is_qwen else bool(d.get("attention_bias", False)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            param_dtype=_DTYPE_NAMES.get(dtype, "float32"),
            dtype="float32",
            family="qwen2" if is_qwen else "llama",
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


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
