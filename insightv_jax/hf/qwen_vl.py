"""Qwen2-VL / Qwen2.5-VL from Hugging Face folders: the weight import
(`load_pretrained`; the config.json mapping, `qwen_vl_from_hf`, lives with the
others in `hf.configs`).

Weights: `save_pretrained` (4.x and 5.x alike) writes `model.layers.…`,
`model.embed_tokens`, `model.norm`, `visual.…` and `lm_head.weight`
(absent when tied); transformers 5.x's in-memory `state_dict()` has
`model.language_model.…` and `model.visual.…`. Both are read; the layout is
detected from the embedding and patch embedding keys. The export
(`hf.convert.export_hf`) writes the saved layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from insightv_jax.config import ModelConfig
from insightv_jax.data.qwen_images import PREPROCESSOR_FILE, QwenImageProcessor
from insightv_jax.errors import CheckpointError
from insightv_jax.hf.configs import qwen_vl_from_hf, read_hf_config
from insightv_jax.hf.keymap import decoder_keymap
from insightv_jax.hf.placement import check_all_used, place
from insightv_jax.hf.qwen_vision import _entries as tower_entries
from insightv_jax.hf.qwen_vision import find_prefix
from insightv_jax.hf.safetensors_io import SafetensorsFolder
from insightv_jax.models.factory import abstract_model
from insightv_jax.parallel import single_device_mesh

_DECODER_PREFIXES = ("model.language_model.", "model.")  # 5.x in memory; saved files


# ------------------------------------------------------------------ weights


class _Source(NamedTuple):
    path: tuple[str, ...]  # into our parameter tree
    keys: list[str]  # HF tensors (one per layer when stacked)
    convert: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> our layout
    hf_shape: tuple[int, ...]  # what the config says each HF tensor must be
    stacked: bool  # one tensor per layer, stacked on our leading `layers` axis


def detect_prefixes(keys) -> tuple[str, str]:
    """(decoder prefix, vision tower prefix) of a Qwen-VL state dict's keys."""
    keys = set(keys)
    decoder = next((p for p in _DECODER_PREFIXES if f"{p}embed_tokens.weight" in keys), None)
    if decoder is None:
        raise CheckpointError(
            "weights are not a Qwen-VL checkpoint: no language model embed_tokens under "
            f"{' or '.join(repr(p) for p in _DECODER_PREFIXES)}"
        )
    return decoder, find_prefix(keys)


def _sources(cfg: ModelConfig, target: dict, keys) -> list[_Source]:
    dec_prefix, vis_prefix = detect_prefixes(keys)
    out = []
    for pm in decoder_keymap(cfg.decoder, prefix=dec_prefix, head_key="lm_head.weight"):
        spec = target["decoder"]
        for p in pm.path:
            spec = spec[p]
        ours = spec.shape[1:] if pm.stacked else spec.shape
        hf_shape = jax.eval_shape(pm.to_hf, jax.ShapeDtypeStruct(ours, np.float32)).shape
        n = cfg.decoder.num_layers
        names = [pm.hf_key.format(i=i) for i in range(n)] if pm.stacked else [pm.hf_key]
        out.append(_Source(("decoder", *pm.path), names, pm.to_ours, tuple(hf_shape), pm.stacked))
    for e in tower_entries(cfg.qwen_vision):
        stacked = "{i}" in e.key
        n = cfg.qwen_vision.depth if stacked else 1
        names = [vis_prefix + e.key.format(i=i) for i in range(n)]
        out.append(_Source(("vision", *e.path), names, e.convert, e.hf_shape, stacked))
    return out


def with_processor_pixels(cfg: ModelConfig, folder: Path) -> ModelConfig:
    """`cfg` with the pixel bounds of the folder's `preprocessor_config.json`
    (when it has one): they decide how many tokens an image becomes, so the
    model config carries them from here on."""
    if not (folder / PREPROCESSOR_FILE).is_file():
        return cfg
    proc = QwenImageProcessor.from_pretrained(folder)
    pixels = dict(min_pixels=proc.min_pixels, max_pixels=proc.max_pixels)
    return dataclasses.replace(cfg, qwen_vl=dataclasses.replace(cfg.qwen_vl, **pixels))


def import_qwen_vl(folder: str | Path, mesh: Mesh, cfg: ModelConfig | None = None):
    """Load a Hugging Face Qwen2-VL / Qwen2.5-VL folder, sharded on `mesh`.
    Returns (model, cfg). Every tensor's shape is checked against the config
    before it is read; a missing, misshapen or unused tensor is a one-line
    CheckpointError naming it (tied checkpoints may still carry lm_head)."""
    folder = Path(folder)
    if cfg is None:
        cfg = with_processor_pixels(
            qwen_vl_from_hf(read_hf_config(folder), str(folder / "config.json")), folder
        )
    tensors = SafetensorsFolder(folder)
    graphdef, abstract = abstract_model(cfg, mesh)
    target = nnx.to_pure_dict(abstract)
    used: set[str] = set()
    for src in _sources(cfg, target, tensors.keys()):
        for key in src.keys:
            if key not in tensors:
                raise CheckpointError(f"{folder}: tensor {key!r} is missing")
            if tuple(tensors.shape(key)) != src.hf_shape:
                raise CheckpointError(
                    f"{tensors.key_to_file[key]}: tensor {key!r} of shape {tensors.shape(key)} "
                    f"does not fit the config (expects {src.hf_shape})"
                )
        values = [src.convert(np.asarray(tensors.read(k), np.float32)) for k in src.keys]
        host = np.stack(values) if src.stacked else values[0]
        place(target, src.path, host, tensors.key_to_file[src.keys[0]], src.keys[0])
        used.update(src.keys)
    check_all_used(tensors, used, cfg.decoder.tie_embeddings)
    nnx.replace_by_pure_dict(abstract, target)
    return nnx.merge(graphdef, abstract), cfg


def load_pretrained(folder: str | Path, mesh: Mesh | None = None):
    """The `models.qwen_vl.QwenVL` of a Hugging Face Qwen2-VL / Qwen2.5-VL
    folder (config.json + safetensors, as `save_pretrained` writes), on
    `mesh` (default: the first device).

    Call it with the processor's outputs by name: `model(**inputs)` with
    `input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`, and for
    videos `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`
    (`mm_token_type_ids` is accepted too); it returns fp32 logits (B, T, V)."""
    model, _ = import_qwen_vl(folder, mesh or single_device_mesh())
    return model


__all__ = ["detect_prefixes", "import_qwen_vl", "load_pretrained", "qwen_vl_from_hf"]
