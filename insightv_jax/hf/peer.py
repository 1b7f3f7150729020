"""The same model in `transformers` on torch: the peer the benchmarks and the
device check measure against. Its config is ours written as Hugging Face's
(`configs.model_to_hf`), its attention SDPA, its dtype our parameters' dtype;
its weights random (throughput) or ours (parity, greedy decoding)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from insightv_jax.config import ModelConfig
from insightv_jax.hf.configs import model_to_hf


def torch_device() -> str:
    """The peer's torch device: `cuda` where JAX runs on an NVIDIA GPU and torch
    sees one, else `cpu` (the peer runs on the accelerator ours runs on)."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): call it
    before reading a clock."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _auto_class(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if cfg.kind == "causal_lm":
        return AutoModelForCausalLM
    if cfg.is_vlm:
        return AutoModelForImageTextToText
    raise ValueError(f"no transformers peer for model kind {cfg.kind!r}")


def hf_model(cfg: ModelConfig, device: str = "cpu", model=None, dtype: str | None = None):
    """A transformers model of `cfg` on `device` (eval mode) in `dtype` (default:
    the decoder's parameter dtype), with `model`'s weights (exported through a
    temporary folder, as `insightv convert` writes them) or random ones."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(torch, dtype or cfg.decoder.param_dtype)
    auto = _auto_class(cfg)
    if model is not None:
        from insightv_jax.hf.convert import export_hf

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(model, cfg, Path(tmp))
            hf = auto.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        return hf.to(device).eval()
    d = model_to_hf(cfg)
    rest = {k: v for k, v in d.items() if k not in ("model_type", "architectures")}
    hf_cfg = AutoConfig.for_model(d["model_type"], **rest)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no host copy of a 1B model
        hf = auto.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    return hf.eval()


def trainable_parameters(hf, trainable) -> list:
    """The parameters of a transformers model that train under our `trainable`
    parts (llm, projector, vision); the others get requires_grad False."""
    parts = {"vision_tower": "vision", "multi_modal_projector": "projector"}
    out = []
    for name, p in hf.named_parameters():
        part = next((v for k, v in parts.items() if k in name), "llm")
        p.requires_grad_(part in trainable)
        if part in trainable:
            out.append(p)
    return out


def parity_inputs(cfg: ModelConfig, batch: int = 2, seq: int = 64, seed: int = 0) -> dict:
    """A random batch in the Hugging Face processor's layout: token ids (row 1
    right-padded by a quarter), its attention mask and, for LLaVA-1.5, one
    image a row, whose placeholders follow the first token (rows lengthened
    to twice the image's tokens when `seq` is shorter)."""
    import numpy as np

    from insightv_jax.vision_grid import tokens_per_tile

    if cfg.is_vlm:
        seq = max(seq, 2 * (tokens_per_tile(cfg) + 1))
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.decoder.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1:, seq - seq // 4 :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if cfg.is_vlm:
        if cfg.kind != "llava":
            raise ValueError("parity inputs are built for LLaVA-1.5 (kind llava) only")
        image_id, n = cfg.llava.image_token_id, tokens_per_tile(cfg)
        if n + 1 > seq - seq // 4:
            raise ValueError(f"{n} image tokens do not fit rows of {seq}")
        ids[ids == image_id] = 1
        ids[:, 1 : 1 + n] = image_id
        t = cfg.vision.image_size
        out["pixel_values"] = rng.standard_normal((batch, 3, t, t)).astype(np.float32)
    return out


def logits_parity(model, cfg: ModelConfig, device: str = "cpu", precisions=("highest", "default")):
    """Max |our logits - transformers'| over the unpadded positions of
    `parity_inputs`, the peer holding `model`'s weights in fp32 on `device`,
    ours under each `jax.default_matmul_precision` of `precisions`
    ("default" is JAX's own: TF32 for fp32 products on recent NVIDIA GPUs)."""
    import jax
    import numpy as np
    import torch

    inputs = parity_inputs(cfg)
    hf = hf_model(cfg, device, model=model, dtype="float32")
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}).logits
    ref = ref.float().cpu().numpy()
    del hf
    keep = inputs["attention_mask"].astype(bool)
    out = {"max_abs_logit": round(float(np.abs(ref[keep]).max()), 4), "positions": int(keep.sum())}
    for precision in precisions:
        # the precision is part of a jitted forward's cache key: each one is traced anew
        if precision == "default":
            ours = model(**inputs)
        else:
            with jax.default_matmul_precision(precision):
                ours = model(**inputs)
        diff = np.abs(np.asarray(ours, np.float32) - ref)[keep]
        out[f"max_abs_diff_{precision}"] = float(diff.max())
    return out
