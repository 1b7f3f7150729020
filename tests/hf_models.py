"""Tiny random Hugging Face models (built by transformers itself) for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Shapes exercised by the parity tests: GQA ratios 1/2/4, tied and untied
# embeddings, qkv bias on/off, odd hidden sizes, Llama-3.1 rope scaling.
DECODER_CASES = {
    "llama_mha_untied": dict(family="llama", hidden_size=64, heads=4, kv_heads=4, tie=False),
    "llama_gqa2_tied": dict(family="llama", hidden_size=48, heads=4, kv_heads=2, tie=True),
    "llama_gqa4_odd_rope": dict(
        family="llama",
        hidden_size=72,
        heads=8,
        kv_heads=2,
        tie=False,
        head_dim=10,
        rope3=True,
        intermediate=101,
    ),
    "llama_attn_bias": dict(
        family="llama", hidden_size=40, heads=4, kv_heads=1, tie=False, bias=True
    ),
    "qwen2_gqa2_untied": dict(family="qwen2", hidden_size=64, heads=4, kv_heads=2, tie=False),
    "qwen2_gqa4_tied_odd": dict(
        family="qwen2", hidden_size=56, heads=4, kv_heads=1, tie=True, head_dim=14
    ),
}


def build_decoder(case: str, seed: int = 0, vocab: int = 97, layers: int = 2):
    """A tiny random LlamaForCausalLM / Qwen2ForCausalLM (eval mode, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = DECODER_CASES[case]
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab,
        hidden_size=c["hidden_size"],
        intermediate_size=c.get("intermediate", 2 * c["hidden_size"] + 3),
        num_hidden_layers=layers,
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        tie_word_embeddings=c["tie"],
        max_position_embeddings=256,
        initializer_range=0.2,  # larger than default so logits are not all ~0
    )
    if c.get("head_dim"):
        kw["head_dim"] = c["head_dim"]
    if c["family"] == "llama":
        if c.get("rope3"):
            kw["rope_parameters"] = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        kw["attention_bias"] = bool(c.get("bias"))
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    if c.get("bias") or c["family"] == "qwen2":  # biases init to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
    return model.eval()


def save(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(mask)
        return model(torch.tensor(ids), **kw).logits.float().numpy()
