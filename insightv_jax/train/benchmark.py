"""`insightv bench train`: SFT step throughput and MFU against `transformers`
training the same architecture on the same batch, measured in the same process
so the ratios are meaningful on a shared machine.

Sizes (`--size`):
  20m  (default) configs/bench-20m.yaml and the tiny decoder in fp32; the peer
       on torch CPU, eager and `torch.compile`.
  1b   configs/bench-1b.yaml (a Llama-3.2-1B-shaped decoder) and
       configs/bench-vlm-1b.yaml (a LLaVA-1.5-shaped VLM around it) in bf16; the
       peer on the GPU when JAX runs on one (SDPA attention, fused AdamW).
  toy  the 1b configs shrunk to run in seconds on a CPU (the device check's
       CPU mode): the same kinds, dtypes and code paths.
MFU is against the matmul peak measured in the same run in the configs' dtype
and, for bf16 on a listed device, against its data-sheet peak as well.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from insightv_jax.config import MeshConfig, load_config
from insightv_jax.models.factory import init_model
from insightv_jax.parallel import make_mesh
from insightv_jax.timing import timed
from insightv_jax.train.metrics import (
    decoder_matmul_params,
    measure_matmul_peak,
    nominal_bf16_peak,
    step_flops,
)
from insightv_jax.train.profile import op_breakdown
from insightv_jax.train.toy_data import ToySource
from insightv_jax.train.trainer import build_program, global_batch
from insightv_jax.vision_grid import tokens_per_tile

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = ("20m", "1b", "toy")

# The 1b configs shrunk for a CPU (head_dim set: bench-1b's 64 would outgrow hidden 64).
TOY = [
    "model.decoder.vocab_size=512",
    "model.decoder.hidden_size=64",
    "model.decoder.intermediate_size=128",
    "model.decoder.num_layers=2",
    "model.decoder.num_heads=4",
    "model.decoder.num_kv_heads=2",
    "model.decoder.head_dim=16",
    "train.seq_len=64",
    "train.loss_chunk=64",
]
TOY_VISION = [
    "model.vision.image_size=28",
    "model.vision.patch_size=14",
    "model.vision.hidden_size=32",
    "model.vision.intermediate_size=64",
    "model.vision.num_layers=2",
    "model.vision.num_heads=2",
    "model.llava.image_token_id=5",
]


def size_configs(size: str, overrides=()) -> dict:
    """name -> RunConfig of the models benchmarked at `size` (k=v `overrides`
    on top of each, e.g. model.decoder.attention=cudnn)."""
    extra = list(overrides)
    if size == "20m":
        tiny = ["train.seq_len=256", "train.global_batch=8", "train.loss_chunk=256"]
        tiny += ["train.trainable=[llm]", "train.lr=1e-4", "train.warmup_fraction=0"]
        return {
            "bench-20m": load_config(CONFIGS / "bench-20m.yaml", extra),
            "tiny": load_config(CONFIGS / "models" / "tiny-lm.yaml", tiny + extra),
        }
    if size in ("1b", "toy"):
        toy = TOY if size == "toy" else []
        vision = TOY_VISION if size == "toy" else []
        return {
            "decoder": load_config(CONFIGS / "bench-1b.yaml", toy + extra),
            "vlm": load_config(CONFIGS / "bench-vlm-1b.yaml", toy + vision + extra),
        }
    raise ValueError(f"unknown benchmark size {size!r} ({', '.join(SIZES)})")


def _batch(cfg, seed: int = 0) -> dict:
    """The step's batch: ToySource rows; for a LLaVA model each row's first
    tokens after the first are one image's placeholders (one image a row)."""
    src = ToySource(cfg.train.global_batch, cfg.train.seq_len, cfg.model.decoder.vocab_size, seed)
    batch = {k: np.stack([src[i][k] for i in range(len(src))]) for k in src[0]}
    if cfg.model.is_vlm:
        image_id, n = cfg.model.llava.image_token_id, tokens_per_tile(cfg.model)
        if n + 1 > cfg.train.seq_len // 2:  # ToySource rows are at least half the length
            raise ValueError(f"{n} image tokens do not fit rows of {cfg.train.seq_len}")
        for key in ("input_ids", "labels"):  # the image id only where an image is
            batch[key] = np.where(batch[key] == image_id, 1, batch[key])
        batch["input_ids"][:, 1 : 1 + n] = image_id
        batch["labels"][:, : 1 + n] = -100
        B, t = len(src), cfg.model.vision.image_size
        rng = np.random.default_rng(seed)
        batch["pixel_values"] = rng.standard_normal((B, 1, 1, 3, t, t), np.float32)
        batch["image_sizes"] = np.full((B, 1, 2), t, np.int32)
    return batch


def jax_step(cfg, batch: dict, losses: list | None = None):
    """A blocking call of our SFT step on one device for `batch` (state kept
    inside); each call's loss is appended to `losses` when given."""
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
        if losses is not None:
            losses.append(float(m["loss"]))

    return step


def torch_step(cfg, batch: dict, device: str = "cpu", compile: bool = False, losses=None):
    """A blocking call of `transformers`' training step of the same model
    (random weights, the parts `cfg.train.trainable` names trained by AdamW,
    gradients clipped) on `batch` on `device`."""
    import torch

    from insightv_jax.hf.peer import hf_model, synchronize, trainable_parameters

    hf = hf_model(cfg.model, device).train()
    params = trainable_parameters(hf, cfg.train.trainable)
    fused = {"fused": True} if device == "cuda" else {}  # what HF's Trainer uses on a GPU
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0, **fused)
    inputs = {
        k: torch.from_numpy(np.asarray(batch[k])).long().to(device)
        for k in ("input_ids", "attention_mask", "labels")
    }
    if "pixel_values" in batch:  # LLaVA-1.5's layout: (images, 3, H, W)
        pv = np.asarray(batch["pixel_values"])[:, 0, 0]
        inputs["pixel_values"] = torch.from_numpy(pv).to(device, hf.dtype)
    fwd = torch.compile(hf) if compile else hf

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fwd(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_norm)
        opt.step()
        synchronize(device)
        if losses is not None:
            losses.append(float(loss.detach()))

    return step


def release(device: str) -> None:
    """Give the memory of dropped models back: torch's cache to the device,
    so that the JAX step that follows finds it free."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def bench_one(
    name: str,
    cfg,
    peak: float,
    min_seconds: float,
    torch_compile: bool,
    profile: bool = False,
    device: str = "cpu",
    nominal: float | None = None,
    steps: int = 3,
) -> dict:
    """One model's row: tokens/s, MFU (against `peak`, and `nominal` when
    given) and first-step loss of our step and of `transformers`' (eager, and
    compiled when `torch_compile`), and their ratio; each timed over `steps`
    and `min_seconds` at least, after a warm-up step. The peer runs first and
    is dropped before ours starts: on a GPU both would not fit at 1B."""
    batch = _batch(cfg)
    tokens = batch["input_ids"].size
    flops = step_flops(cfg.model, batch, cfg.train.trainable)
    row = {
        "params_M": round(decoder_matmul_params(cfg.model.decoder) / 1e6, 1),
        "batch": list(batch["input_ids"].shape),
        "dtype": cfg.model.decoder.dtype,
        "step_tflop": round(flops / 1e12, 3),
    }

    def record(prefix: str, seconds: float) -> None:
        row[f"{prefix}_tokens_per_s"] = round(tokens / seconds, 1)
        row[f"{prefix}_mfu"] = round(flops / seconds / peak, 3)
        if nominal:
            row[f"{prefix}_mfu_vs_nominal"] = round(flops / seconds / nominal, 3)

    torch_losses: list[float] = []
    t_eager = timed(torch_step(cfg, batch, device, losses=torch_losses), min_seconds, steps)
    record("torch_eager", t_eager)
    row["torch_loss"] = round(torch_losses[0], 4)
    release(device)
    if torch_compile:
        try:
            t_comp = timed(torch_step(cfg, batch, device, compile=True), min_seconds, steps)
            row["torch_compile_tokens_per_s"] = round(tokens / t_comp, 1)
        except Exception as e:  # inductor needs a working C++ toolchain
            t_comp = None
            row["torch_compile"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
        release(device)
    jax_losses: list[float] = []
    step = jax_step(cfg, batch, jax_losses)
    t_jax = timed(step, min_seconds, steps)
    record("jax", t_jax)
    row["jax_loss"] = round(jax_losses[0], 4)
    row["ratio_vs_eager"] = round(t_eager / t_jax, 2)
    if torch_compile and t_comp is not None:
        row["ratio_vs_compile"] = round(t_comp / t_jax, 2)
    if profile:
        row["jax_profile"] = op_breakdown(step)
    del step
    gc.collect()
    print(f"{name}: {row}", flush=True)
    return row


def bench_train(
    min_seconds: float = 5.0,
    torch_compile: bool = True,
    size: str = "20m",
    overrides=(),
    peak: float | None = None,
    steps: int = 3,
    names=None,
) -> dict:
    """tokens/s and MFU of our SFT step vs transformers, per config of `size`
    (module docstring; `names` picks some of them), each side timed over
    `steps` and `min_seconds` at least; `peak` FLOP/s is measured here unless
    given."""
    import jax

    from insightv_jax.hf.peer import torch_device

    runs = {k: v for k, v in size_configs(size, overrides).items() if not names or k in names}
    bf16 = any(c.model.decoder.dtype == "bfloat16" for c in runs.values())
    dtype = "bfloat16" if bf16 else "float32"
    kind = jax.devices()[0].device_kind
    if peak is None:
        # big enough that a GPU's launch overhead is noise, small enough for a CPU
        n = 256 if size == "toy" else 2048 if jax.default_backend() == "cpu" else 8192
        peak = measure_matmul_peak(dtype, n=n, mesh=None)
    nominal = nominal_bf16_peak(kind) if dtype == "bfloat16" else None
    device = torch_device()
    out = {
        "size": size,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_dtype": dtype,
        "nominal_peak_gflops": round(nominal / 1e9, 1) if nominal else None,
        "device": kind,
        "peer_device": device,
    }
    for name, cfg in runs.items():
        # where our step's time goes (XLA op kinds), for the fixed CPU config
        out[name] = bench_one(
            name, cfg, peak, min_seconds, torch_compile, name == "bench-20m", device, nominal, steps
        )
    out["convention"] = (
        f"MFU = 6·N_matmul·tokens + causal attention (halved) + LLaVA tower forward "
        f"/ measured {dtype} peak (and / data-sheet peak)"
    )
    return out
