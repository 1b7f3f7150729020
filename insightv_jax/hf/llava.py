"""LLaVA / LLaVA-NeXT <-> Hugging Face: config.json mapping and key maps.

Import accepts four key layouts (detected from the tensor names):
  hub         what transformers-5 `save_pretrained` writes: `vision_tower.…`,
              `language_model.model.…`, `language_model.lm_head.weight`,
              `multi_modal_projector.linear_{1,2}`, `image_newline`
  hub_legacy  the llava-hf hub checkpoints: `vision_tower.vision_model.…`
  memory      transformers' in-memory `state_dict()`: `model.vision_tower.…`, …
  original    the LLaVA-NeXT repository (`LlavaLlamaForCausalLM`, the released
              Insight-V agents): `model.vision_tower.vision_tower.vision_model.…`,
              `model.layers.…`, `model.mm_projector.{0,2}`, `model.image_newline`
Export always writes `hub`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from insightv_jax.config import ConfigError, LlavaConfig, ModelConfig, VisionConfig
from insightv_jax.errors import CheckpointError
from insightv_jax.hf.keymap import ParamMap, _heads_bias, _heads_in, _heads_out, decoder_keymap

LAYOUTS: dict[str, dict[str, str]] = {
    "hub": dict(
        vision="vision_tower.",
        decoder="language_model.model.",
        head="language_model.lm_head.weight",
        proj1="multi_modal_projector.linear_1.",
        proj2="multi_modal_projector.linear_2.",
        newline="image_newline",
    ),
    "hub_legacy": dict(
        vision="vision_tower.vision_model.",
        decoder="language_model.model.",
        head="language_model.lm_head.weight",
        proj1="multi_modal_projector.linear_1.",
        proj2="multi_modal_projector.linear_2.",
        newline="image_newline",
    ),
    "memory": dict(
        vision="model.vision_tower.",
        decoder="model.language_model.",
        head="lm_head.weight",
        proj1="model.multi_modal_projector.linear_1.",
        proj2="model.multi_modal_projector.linear_2.",
        newline="model.image_newline",
    ),
    "original": dict(
        vision="model.vision_tower.vision_tower.vision_model.",
        decoder="model.",
        head="lm_head.weight",
        proj1="model.mm_projector.0.",
        proj2="model.mm_projector.2.",
        newline="model.image_newline",
    ),
}


def detect_layout(keys) -> str:
    """The layout whose vision-tower and embedding keys are present."""
    keys = set(keys)
    for name, lay in LAYOUTS.items():
        if (
            f"{lay['vision']}embeddings.patch_embedding.weight" in keys
            and f"{lay['decoder']}embed_tokens.weight" in keys
        ):
            return name
    raise CheckpointError(
        "weights are not in a known LLaVA key layout (no vision tower patch embedding "
        "next to the language model's embed_tokens)"
    )


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def vision_keymap(cfg: VisionConfig, prefix: str) -> list[ParamMap]:
    """Our VisionTower (under `vision`) <-> a CLIP/SigLIP vision model at `prefix`."""
    N, D, P, C = cfg.num_heads, cfg.hidden_size, cfg.patch_size, cfg.num_channels
    H = D // N
    e = f"{prefix}embeddings."
    maps = [
        ParamMap(
            ("vision", "patch_embed"),
            e + "patch_embedding.weight",
            lambda w: w.reshape(w.shape[0], -1).T,
            lambda w: w.T.reshape(D, C, P, P),
        ),
        ParamMap(("vision", "pos_embed"), e + "position_embedding.weight"),
        ParamMap(("vision", "post_norm", "weight"), f"{prefix}post_layernorm.weight"),
        ParamMap(("vision", "post_norm", "bias"), f"{prefix}post_layernorm.bias"),
    ]
    if cfg.family == "clip":
        maps += [
            ParamMap(("vision", "class_embed"), e + "class_embedding"),
            ParamMap(("vision", "pre_norm", "weight"), f"{prefix}pre_layrnorm.weight"),
            ParamMap(("vision", "pre_norm", "bias"), f"{prefix}pre_layrnorm.bias"),
        ]
    else:
        maps.append(ParamMap(("vision", "patch_bias"), e + "patch_embedding.bias"))
    layer = f"{prefix}encoder.layers.{{i}}."

    def add(path, key, fwd_bwd=(lambda x: x, lambda x: x)):
        maps.append(ParamMap(("vision", "layers", *path), layer + key, *fwd_bwd, stacked=True))

    for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
        add((ours, "weight"), f"{theirs}.weight")
        add((ours, "bias"), f"{theirs}.bias")
    for n in ("q", "k", "v"):
        add(("attn", f"{n}_proj"), f"self_attn.{n}_proj.weight", _heads_in(N, H))
        add(("attn", f"{n}_bias"), f"self_attn.{n}_proj.bias", _heads_bias(N, H))
    add(("attn", "o_proj"), "self_attn.out_proj.weight", _heads_out(N, H))
    add(("attn", "o_bias"), "self_attn.out_proj.bias")
    add(("mlp", "fc1"), "mlp.fc1.weight", (_t, _t))
    add(("mlp", "fc1_bias"), "mlp.fc1.bias")
    add(("mlp", "fc2"), "mlp.fc2.weight", (_t, _t))
    add(("mlp", "fc2_bias"), "mlp.fc2.bias")
    return maps


def llava_keymap(cfg: ModelConfig, layout: str = "hub") -> list[ParamMap]:
    """The full key map of a LLaVA model in one of `LAYOUTS`."""
    lay = LAYOUTS[layout]
    maps = [
        dataclasses.replace(pm, path=("decoder", *pm.path))
        for pm in decoder_keymap(cfg.decoder, prefix=lay["decoder"], head_key=lay["head"])
    ]
    maps += vision_keymap(cfg.vision, lay["vision"])
    maps += [
        ParamMap(("projector", "linear_1"), lay["proj1"] + "weight", _t, _t),
        ParamMap(("projector", "linear_2"), lay["proj2"] + "weight", _t, _t),
    ]
    if cfg.llava.projector_bias:
        maps += [
            ParamMap(("projector", "bias_1"), lay["proj1"] + "bias"),
            ParamMap(("projector", "bias_2"), lay["proj2"] + "bias"),
        ]
    if cfg.kind == "llava_next":
        maps.append(ParamMap(("image_newline",), lay["newline"]))
    return maps


def ignored_key(key: str, layout: str) -> bool:
    """Weights we do not model: the SigLIP pooling head (LLaVA never uses it)."""
    return key.startswith(LAYOUTS[layout]["vision"] + "head.")


# ------------------------------------------------------------------ configs

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
    from insightv_jax.hf.configs import decoder_from_hf

    full = _normalise(d, where)
    text = dict(full["text_config"])
    text.setdefault("dtype", full.get("dtype"))
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
    from insightv_jax.hf.configs import decoder_to_hf
    from insightv_jax.models.anyres import tokens_per_tile

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
    from insightv_jax.hf.configs import decoder_from_hf

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
