"""`insightv bench train`: SFT step throughput and MFU against `transformers`
(torch CPU, eager and `torch.compile`) training the same architecture on the
same batch, measured in the same process so the ratios are meaningful on a
shared machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from insightv_jax.config import MeshConfig, load_config
from insightv_jax.models.factory import init_model
from insightv_jax.parallel import make_mesh
from insightv_jax.timing import timed
from insightv_jax.train.metrics import (
    decoder_matmul_params,
    measure_matmul_peak,
    train_flops_per_token,
)
from insightv_jax.train.profile import op_breakdown
from insightv_jax.train.toy_data import ToySource
from insightv_jax.train.trainer import build_program, global_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _batch(cfg, seed: int = 0) -> dict:
    src = ToySource(cfg.train.global_batch, cfg.train.seq_len, cfg.model.decoder.vocab_size, seed)
    return {k: np.stack([src[i][k] for i in range(len(src))]) for k in src[0]}


def jax_step(cfg, batch: dict):
    """A blocking call of our SFT step on one device for `batch` (state kept inside)."""
    import jax
    from flax import nnx

    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    program = build_program(cfg.model, cfg, mesh, 1000)
    params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, mesh, 0), nnx.Param))
    box = {"state": program.init_state(params)}
    gb = global_batch(batch, program)

    def step():
        box["state"], m = program(box["state"], gb)
        jax.block_until_ready(m["loss"])

    return step


def torch_step_time(cfg, batch: dict, min_seconds: float, compile: bool) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = cfg.model.decoder
    hf = LlamaConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_kv_heads,
        head_dim=d.resolved_head_dim,
        rope_theta=d.rope_theta,
        rms_norm_eps=d.rms_norm_eps,
        tie_word_embeddings=d.tie_embeddings,
        max_position_embeddings=max(d.max_position_embeddings, cfg.train.seq_len),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    ids = torch.from_numpy(batch["input_ids"]).long()
    mask = torch.from_numpy(batch["attention_mask"]).long()
    labels = torch.from_numpy(batch["labels"]).long()
    fwd = torch.compile(model) if compile else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fwd(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
        opt.step()

    return timed(step, min_seconds)


def bench_one(
    name: str, cfg, peak: float, min_seconds: float, torch_compile: bool, profile: bool = False
) -> dict:
    batch = _batch(cfg)
    tokens = batch["input_ids"].size
    flops = train_flops_per_token(cfg.model, cfg.train.seq_len, cfg.train.trainable) * tokens
    row = {
        "params_M": round(decoder_matmul_params(cfg.model.decoder) / 1e6, 1),
        "batch": list(batch["input_ids"].shape),
    }
    step = jax_step(cfg, batch)
    t_jax = timed(step, min_seconds)
    row["jax_tokens_per_s"] = round(tokens / t_jax, 1)
    row["jax_mfu"] = round(flops / t_jax / peak, 3)
    t_eager = torch_step_time(cfg, batch, min_seconds, compile=False)
    row["torch_eager_tokens_per_s"] = round(tokens / t_eager, 1)
    row["torch_eager_mfu"] = round(flops / t_eager / peak, 3)
    row["ratio_vs_eager"] = round(t_eager / t_jax, 2)
    if torch_compile:
        try:
            t_comp = torch_step_time(cfg, batch, min_seconds, compile=True)
            row["torch_compile_tokens_per_s"] = round(tokens / t_comp, 1)
            row["ratio_vs_compile"] = round(t_comp / t_jax, 2)
        except Exception as e:  # inductor needs a working C++ toolchain
            row["torch_compile"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    if profile:
        row["jax_profile"] = op_breakdown(step)
    print(f"{name}: {row}", flush=True)
    return row


def bench_train(min_seconds: float = 5.0, torch_compile: bool = True) -> dict:
    """tokens/s and MFU of our SFT step vs transformers on torch CPU, per config."""
    import jax

    peak = measure_matmul_peak("float32", mesh=None)
    out = {"matmul_peak_gflops": round(peak / 1e9, 1), "device": jax.devices()[0].device_kind}
    tiny = ["train.seq_len=256", "train.global_batch=8", "train.loss_chunk=256"]
    tiny += ["train.trainable=[llm]", "train.lr=1e-4", "train.warmup_fraction=0"]
    runs = {
        "bench-20m": load_config(CONFIGS / "bench-20m.yaml"),
        "tiny": load_config(CONFIGS / "models" / "tiny-lm.yaml", tiny),
    }
    for name, cfg in runs.items():
        # where our step's time goes (XLA op kinds), for the fixed config
        out[name] = bench_one(name, cfg, peak, min_seconds, torch_compile, name == "bench-20m")
    out["convention"] = "MFU = 6·N_matmul·tokens + causal attention (halved) / measured fp32 peak"
    return out
