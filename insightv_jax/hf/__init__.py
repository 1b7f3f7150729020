"""Hugging Face interop: safetensors import/export, key maps, tokenizer files.

`load_pretrained(path)` is the one entry point users need: it accepts a model
directory, a run directory (latest step) or a Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh


def load_pretrained(path: str | Path, mesh: Mesh | None = None):
    """(model, tokenizer, processor, ModelConfig) from any checkpoint.

    `tokenizer` is a `transformers` tokenizer (None if the checkpoint has none);
    `processor` is our `data.images.ImageProcessor` (same pixels as the
    transformers LLaVA-NeXT processor), for Qwen-VL our
    `data.qwen_images.QwenImageProcessor` of the model config (whose pixel
    bounds the import read from `preprocessor_config.json`); None for
    text-only models.

    A LLaVA model takes its inputs by name only: `model(input_ids=...,
    attention_mask=..., **processor(images))`, or the transformers
    processor's outputs as they are, `model(**hf_processor(images=...,
    text=..., return_tensors="np"))`; a text model is `model(input_ids,
    attention_mask=None)`. Both return fp32 logits (B, T, V).
    """
    # imported on use: this __init__ runs before every hf.* module, and checkpoint
    # imports hf.convert (at import time the two would wait on each other)
    from insightv_jax.checkpoint import load_model

    model, cfg, tok_dir, proc_dir = load_model(path, mesh)
    return (model, *pretrained_aux(cfg, tok_dir, proc_dir), cfg)


def pretrained_aux(cfg, tok_dir: Path | None, proc_dir: Path | None):
    """(tokenizer, processor) of a checkpoint whose model config is `cfg`, from its
    tokenizer and processor directories (`checkpoint.aux_dirs`), as `load_pretrained`
    returns them."""
    tokenizer = processor = None
    if tok_dir is not None:
        from insightv_jax.data.conversation import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    if cfg.is_qwen_vl:
        from insightv_jax.data.qwen_images import QwenImageProcessor

        processor = QwenImageProcessor.for_model(cfg)
    elif proc_dir is not None and (Path(proc_dir) / "preprocessor_config.json").is_file():
        from insightv_jax.data.images import ImageProcessor

        processor = ImageProcessor.from_pretrained(proc_dir)
    return tokenizer, processor


__all__ = ["load_pretrained", "pretrained_aux"]
