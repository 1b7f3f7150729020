"""Hugging Face folders <-> our models.

Import reads one HF tensor at a time, converts it to our layout and places it
straight into its target sharding (each device receives only its slice).
Export streams parameters back out as safetensors in the hub's key layout, with
`config.json`, the tokenizer files and what `AutoProcessor`, `pipeline` and
`generate` read (`hf.processor`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from insightv_jax.config import ModelConfig
from insightv_jax.data.conversation import load_tokenizer
from insightv_jax.data.prompts import write_prompts
from insightv_jax.errors import CheckpointError
from insightv_jax.hf.configs import QWEN_VL_TYPES, model_from_hf, model_to_hf, read_hf_config
from insightv_jax.hf.files import copy_aux_dirs
from insightv_jax.hf.keymap import ParamMap, decoder_keymap
from insightv_jax.hf.llava import detect_layout, ignored_key, llava_keymap
from insightv_jax.hf.placement import check_all_used, place
from insightv_jax.hf.processor import special_ids, write_processor_files
from insightv_jax.hf.qwen_vision import qwen_vision_tensors
from insightv_jax.hf.safetensors_io import SafetensorsFolder, write_folder
from insightv_jax.models.factory import abstract_model

# Where `save_pretrained` puts a Qwen-VL's vision tower (4.x and 5.x alike).
QWEN_VL_VISION_PREFIX = "visual."


def keymap_for(cfg: ModelConfig, layout: str = "hub") -> list[ParamMap]:
    """The key map of a model config (VLMs: in one of `hf.llava.LAYOUTS`). For
    Qwen-VL it is the decoder's part only, keyed as `save_pretrained` writes it
    (`model.layers.…`, `lm_head.weight`); the tower's fused qkv needs more than
    a ParamMap and comes from `hf.qwen_vision`'s own table."""
    if cfg.kind == "causal_lm":
        return decoder_keymap(cfg.decoder)
    if cfg.is_qwen_vl:
        return [
            dataclasses.replace(pm, path=("decoder", *pm.path))
            for pm in decoder_keymap(cfg.decoder)
        ]
    if cfg.is_vlm:
        return llava_keymap(cfg, layout)
    raise CheckpointError(f"no Hugging Face key map for model kind {cfg.kind!r}")


def _num_layers(cfg: ModelConfig, pm: ParamMap) -> int:
    return cfg.vision.num_layers if pm.path[0] == "vision" else cfg.decoder.num_layers


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _leaf_paths(tree, prefix=()) -> set[tuple[str, ...]]:
    if isinstance(tree, dict):
        out = set()
        for k, v in tree.items():
            out |= _leaf_paths(v, (*prefix, str(k)))
        return out
    return {prefix}


def _host_value(
    folder: SafetensorsFolder, pm: ParamMap, n_layers: int, spec
) -> tuple[np.ndarray, str]:
    """The HF tensor(s) of `pm` in our layout. Each tensor's header shape is checked
    first against the shape the config gives it in the HF layout: a tensor of the
    right size but the wrong shape would otherwise reshape silently into garbage,
    and one of the wrong size fail in numpy with a bare ValueError."""
    keys = [pm.hf_key.format(i=i) for i in range(n_layers)] if pm.stacked else [pm.hf_key]
    ours = spec.shape[1:] if pm.stacked else spec.shape
    want = jax.eval_shape(pm.to_hf, jax.ShapeDtypeStruct(ours, np.float32)).shape
    for key in keys:
        if folder.shape(key) != tuple(want):
            raise CheckpointError(
                f"{folder.key_to_file[key]}: tensor {key!r} of shape {folder.shape(key)} does "
                f"not fit the config (expects {tuple(want)})"
            )
    if pm.stacked:
        return np.stack([pm.to_ours(folder.read(k)) for k in keys]), keys[0]
    return pm.to_ours(folder.read(pm.hf_key)), pm.hf_key


def import_hf(folder: str | Path, mesh: Mesh, cfg: ModelConfig | None = None):
    """Load a HF folder into our model, sharded on `mesh`. Returns (model, cfg)."""
    folder = Path(folder)
    hf_cfg = read_hf_config(folder) if cfg is None else None
    if (cfg.kind if cfg is not None else hf_cfg.get("model_type")) in QWEN_VL_TYPES:
        from insightv_jax.hf.qwen_vl import import_qwen_vl  # imports hf.configs, as we do

        return import_qwen_vl(folder, mesh, cfg)
    tensors = SafetensorsFolder(folder)
    cfg = cfg or model_from_hf(hf_cfg, str(folder / "config.json"), tensors)
    graphdef, abstract = abstract_model(cfg, mesh)
    target = nnx.to_pure_dict(abstract)
    layout = "hub"
    if cfg.is_vlm:
        layout = detect_layout(tensors.keys())
    maps = keymap_for(cfg, layout)
    missing = _leaf_paths(target) - {pm.path for pm in maps}
    if missing:
        raise CheckpointError(f"internal: no HF key maps parameter {'.'.join(sorted(missing)[0])}")

    used: set[str] = set()
    for pm in maps:
        n_layers = _num_layers(cfg, pm)
        host, first_key = _host_value(tensors, pm, n_layers, _get(target, pm.path))
        place(target, pm.path, host, tensors.key_to_file[first_key], first_key)
        if pm.stacked:
            used.update(pm.hf_key.format(i=i) for i in range(n_layers))
        else:
            used.add(pm.hf_key)
    check_all_used(tensors, used, cfg.decoder.tie_embeddings,
                   lambda k: cfg.is_vlm and ignored_key(k, layout))  # fmt: skip
    nnx.replace_by_pure_dict(abstract, target)
    return nnx.merge(graphdef, abstract), cfg


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(model: nnx.Module, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, numpy array) for every parameter, one at a time."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for pm in keymap_for(cfg):
        value = _to_host(_get(state, pm.path))
        if pm.stacked:
            for i in range(value.shape[0]):
                yield pm.hf_key.format(i=i), pm.to_hf(value[i])
        else:
            yield pm.hf_key, pm.to_hf(value)
    if cfg.is_qwen_vl:
        yield from qwen_vision_tensors(
            state["vision"], cfg.qwen_vision, QWEN_VL_VISION_PREFIX, _to_host
        )


def export_hf(
    model: nnx.Module,
    cfg: ModelConfig,
    out: Path,
    tokenizer_dir: Path | None = None,
    processor_dir: Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    prompts=None,
) -> None:
    """Write a `save_pretrained`-style folder into `out` (which must exist), with the
    agent's training `prompts` (data.prompts.Prompts) as `prompts.json` when given,
    and what `AutoProcessor`, `pipeline` and `generate` read besides the weights
    (`hf.processor.write_processor_files`: processor and image processor configs,
    chat template, generation config).

    transformers' combined Qwen-VL processor (`Qwen2VLProcessor` /
    `AutoProcessor`) needs torchvision for its video processor, which these
    machines cannot install: its image processor (`Qwen2VLImageProcessorPil`),
    tokenizer and chat template are checked, the combined processor is not."""
    out = Path(out)
    hf_cfg = model_to_hf(cfg)
    tokenizer = None
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        tokenizer = load_tokenizer(tokenizer_dir)
    special = special_ids(tokenizer)
    # transformers 5.x keeps a Qwen-VL's token ids in its text config
    (hf_cfg["text_config"] if cfg.is_qwen_vl else hf_cfg).update(special)
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if prompts is not None:
            write_prompts(out, prompts)
    tensors = hf_tensors(model, cfg)
    if jax.process_index() == 0:
        write_folder(tensors, out, max_shard_bytes=max_shard_bytes)
        copy_aux_dirs(out, tokenizer_dir, processor_dir)
        for sub in ("tokenizer", "processor"):  # HF wants them at the top level
            d = out / sub
            if d.is_dir():
                for f in d.iterdir():
                    f.rename(out / f.name)
                d.rmdir()
        write_processor_files(out, cfg, tokenizer)
    else:
        for _ in tensors:  # take part in the collective gathers
            pass
