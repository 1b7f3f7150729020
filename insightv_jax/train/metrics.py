"""Training metrics: model FLOPs (the MFU convention), the measured matmul peak,
and a logger that prints progress lines and writes TensorBoard event files.

MFU convention (MaxText's, docs/design.md): every matmul counts 2 FLOPs per
multiply-add, training counts ×3 (forward + two backward matmuls) for parts
that train and are trained through, causal attention (QKᵀ and AV) is halved,
the embedding lookup is free, and a frozen vision tower counts forward-only.
Tokens are all processed positions (padding included), image tokens included.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.jsonl import append_jsonl
from insightv_jax.vision_grid import tokens_per_tile


def decoder_matmul_params(d: DecoderConfig) -> int:
    """Parameters that take part in a matmul per token (the LM head included)."""
    D, F, N, K, H = (
        d.hidden_size,
        d.intermediate_size,
        d.num_heads,
        d.num_kv_heads,
        d.resolved_head_dim,
    )
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F
    return d.num_layers * per_layer + D * d.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int, trainable=("projector", "llm")) -> float:
    """Model FLOPs per processed token of one SFT step (see module docstring)."""
    d = cfg.decoder
    # The decoder trains (×3), or is only back-propagated through (×2) for a
    # trainable projector/vision tower, or runs forward only.
    if "llm" in trainable:
        mult = 3
    elif set(trainable) & {"projector", "vision"}:
        mult = 2
    else:
        mult = 1
    dense = 2 * decoder_matmul_params(d)
    # causal attention: 2 matmuls × 2 FLOPs × T keys × N·H, halved
    attn = 2 * seq_len * d.num_heads * d.resolved_head_dim * d.num_layers
    return float(mult * (dense + attn))


def _trained(tower: float, projector: float, trainable) -> float:
    """Step FLOPs of a vision tower and its projector from their forward FLOPs:
    x3 for a trained part, forward-only for a frozen one, and x2 for a frozen
    projector that the trained tower's gradients pass back through."""
    tower_mult = 3 if "vision" in trainable else 1
    proj_mult = 3 if "projector" in trainable else 2 if "vision" in trainable else 1
    return float(tower_mult * tower + proj_mult * projector)


def vision_flops_per_tile(cfg: ModelConfig, trainable=("projector", "llm")) -> float:
    """Model FLOPs of one image tile through a LLaVA tower (the layers up to its
    feature layer) and projector in one SFT step: forward-only for a frozen
    part, ×3 for a trained one; a frozen projector under a trained tower ×2."""
    v = cfg.vision
    tokens = v.patches_per_side**2 + (1 if v.family == "clip" else 0)  # CLIP's class token
    layer = cfg.llava.feature_layer
    layers = layer if layer >= 0 else v.num_layers + 1 + layer  # hidden state 0 = embeddings
    per_token = 2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    per_token += 2 * 2 * tokens * v.hidden_size  # QKᵀ and AV over all tokens (not causal)
    tower = 2 * v.num_channels * v.patch_size**2 * v.hidden_size * tokens
    tower += layers * per_token * tokens
    D = cfg.decoder.hidden_size
    projector = 2 * (v.hidden_size * D + D * D) * tokens_per_tile(cfg)
    return _trained(tower, projector, trainable)


def _attended_pairs(segments: np.ndarray) -> int:
    """Query-key pairs of attention restricted to segments: over every row, the
    sum of each segment's length squared (padding slots form a segment too)."""
    rows = np.asarray(segments).reshape(-1, np.shape(segments)[-1])
    return sum(int((np.unique(r, return_counts=True)[1].astype(np.int64) ** 2).sum()) for r in rows)


def qwen_vision_flops(cfg: ModelConfig, batch: dict, trainable=("projector", "llm")) -> float:
    """Model FLOPs of a Qwen-VL batch's patches (`models.qwen_vl.BATCH_KEYS`, padding
    slots included) through the tower and merger in one SFT step: patch embedding,
    the blocks' projections and MLP, attention within each block's segments (its
    frame for full-attention blocks, its window otherwise), the merger per merged
    token. The merger counts as the projector (`_trained`)."""
    v = cfg.qwen_vision
    pixels = np.shape(batch["pixel_values"])  # (B, L, C*T*p*p)
    patches = int(np.prod(pixels[:-1]))
    D, F = v.hidden_size, v.intermediate_size
    mlp_matrices = 3 if v.family == "qwen2_5_vl" else 2  # gate-up-down / fc1-fc2
    full = sum(not v.windowed or i in v.fullatt_block_indexes for i in range(v.depth))
    pairs = full * _attended_pairs(batch["vision_full_segments"])
    pairs += (v.depth - full) * _attended_pairs(batch["vision_window_segments"])
    tower = 2 * pixels[-1] * D * patches  # patch embedding
    tower += v.depth * 2 * (4 * D * D + mlp_matrices * D * F) * patches
    tower += 2 * 2 * D * pairs  # QKᵀ and AV over the attended pairs (not causal)
    unit = v.spatial_merge_size**2
    merger = 2 * (D * unit * D * unit + D * unit * v.out_hidden_size) * (patches // unit)
    return _trained(tower, merger, trainable)


def step_flops(cfg: ModelConfig, batch: dict, trainable=("projector", "llm")) -> float:
    """Model FLOPs of one SFT step on `batch` (the shapes of its arrays; Qwen-VL's
    segment ids on the host): the decoder over every position at the batch's own
    length, and the images -- a LLaVA tower and projector per tile, a Qwen-VL tower
    and merger per patch. The MFU convention of this module."""
    B, T = np.shape(batch["input_ids"])[:2]
    flops = train_flops_per_token(cfg, T, trainable) * B * T
    if "pixel_values" not in batch:
        return flops
    if cfg.is_qwen_vl:
        return flops + qwen_vision_flops(cfg, batch, trainable)
    tiles = int(np.prod(np.shape(batch["pixel_values"])[:3]))  # (B, images, tiles, ...)
    return flops + vision_flops_per_tile(cfg, trainable) * tiles


# Dense bf16 matmul peaks from the vendors' data sheets (FLOP/s, no sparsity), by a
# substring of `jax.Device.device_kind`; the first match wins (the PCIe and NVL H100s
# before the SXM one, v5e before v5p).
NOMINAL_BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),
)


def nominal_bf16_peak(device_kind: str) -> float | None:
    """The data-sheet dense bf16 peak of a device kind, None when not listed."""
    for name, peak in NOMINAL_BF16_PEAKS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def measure_matmul_peak(
    dtype: str = "float32", n: int = 2048, reps: int = 5, mesh: Mesh | None = None
) -> float:
    """Best observed FLOP/s of jitted n×n×n matmuls, one per device of `mesh`
    (all devices: the aggregate peak the step can use, fake CPU devices included)."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    sharding = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec("d"))
    k = len(devices)
    a = jax.device_put(jnp.ones((k, n, n), dtype), sharding)
    b = jax.device_put(jnp.ones((k, n, n), dtype), sharding)
    f = jax.jit(lambda x, y: x @ y, out_shardings=sharding)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * k * n**3 / best


class MetricsLogger:
    """Console progress lines every `log_every` steps and TensorBoard scalars.

    Only process 0 prints and writes event files.
    """

    def __init__(
        self,
        total_steps: int,
        log_every: int = 10,
        tb_dir: str | Path | None = None,
        peak_flops: float = 0.0,
        print_fn=print,
        jsonl_path: str | Path | None = None,
    ):
        self.total = total_steps
        self.log_every = max(1, log_every)
        self.peak = peak_flops
        self.print = print_fn
        self.main = jax.process_index() == 0
        self.writer = None
        self.jsonl = Path(jsonl_path) if jsonl_path is not None and self.main else None
        if tb_dir is not None and self.main:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))
        self._t0 = time.perf_counter()
        self._tokens = 0
        self._flops = 0.0
        self._steps = 0
        self.started = time.perf_counter()

    def reset_clock(self) -> None:
        """Restart the throughput window (after compilation, for example)."""
        self._t0, self._tokens, self._flops, self._steps = time.perf_counter(), 0, 0.0, 0

    def log(
        self, step: int, metrics: dict, tokens: int, lr: float, skipped: int, flops: float = 0.0
    ) -> dict:
        """Record one finished step (1-based `step`) of `tokens` positions and
        `flops` model FLOPs (`step_flops`); print/write on log steps."""
        self._tokens += tokens
        self._flops += flops
        self._steps += 1
        if step % self.log_every and step != self.total:
            return {}
        dt = max(time.perf_counter() - self._t0, 1e-9)
        tok_s = self._tokens / dt
        # no measured peak (DPO), no MFU: a 0 % would read as a measurement
        mfu = self._flops / dt / self.peak if self.peak else None
        row = {
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": lr,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "skipped": skipped,
            "step_time_s": dt / self._steps,
        }
        if self.main:
            pct = 100.0 * step / max(self.total, 1)
            eta = (self.total - step) * row["step_time_s"]
            self.print(
                f"step {step}/{self.total} ({pct:4.1f}%) loss {row['loss']:.4f} "
                f"gnorm {row['grad_norm']:.3f} lr {lr:.2e} {tok_s:,.0f} tok/s "
                + (f"MFU {100 * mfu:.1f}% " if mfu is not None else "")
                + f"skipped {skipped} eta {eta:,.0f}s"
            )
            if self.jsonl is not None:  # machine-readable history (appended on resume)
                append_jsonl(self.jsonl, {"step": step, **row})
            if self.writer is not None:
                for key, value in row.items():
                    if value is not None:  # MFU without a measured peak
                        self.writer.add_scalar(f"train/{key}", value, step)
                self.writer.flush()
        self.reset_clock()
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
