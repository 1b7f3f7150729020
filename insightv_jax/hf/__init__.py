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
    transformers LLaVA-NeXT processor), for Qwen2-VL / Qwen2.5-VL our
    `data.qwen_images.QwenImageProcessor`; None for text-only models.
    """
    # imported on use: this __init__ runs before every hf.* module, and checkpoint
    # imports hf.convert (at import time the two would wait on each other)
    from insightv_jax.checkpoint import load_model

    model, cfg, tok_dir, proc_dir = load_model(path, mesh)
    tokenizer = processor = None
    if tok_dir is not None:
        from insightv_jax.data.conversation import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    if proc_dir is not None and (Path(proc_dir) / "preprocessor_config.json").is_file():
        if cfg.is_qwen_vl:  # its config reuses `size` with other meanings
            from insightv_jax.data.qwen_images import QwenImageProcessor as Processor
        else:
            from insightv_jax.data.images import ImageProcessor as Processor

        processor = Processor.from_pretrained(proc_dir)
    return model, tokenizer, processor, cfg


__all__ = ["load_pretrained"]
