"""LLaVA / LLaVA-NeXT <-> Hugging Face: the key maps (their config.json mapping
is in `hf.configs`).

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

import numpy as np

from insightv_jax.config import ModelConfig, VisionConfig
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
