"""Model FLOPs for MFU (train/metrics.py): the images of a VLM batch are counted
(a LLaVA tower per tile, a Qwen-VL tower per patch with attention within its
segments), the decoder at each batch's own length, and the logged MFU is the
FLOPs of the steps over their time and the measured peak."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from insightv_jax.config import load_config
from insightv_jax.models.qwen_vision import QwenVisionTower, vision_layout
from insightv_jax.train import metrics
from insightv_jax.train.metrics import (
    MetricsLogger,
    qwen_vision_flops,
    step_flops,
    train_flops_per_token,
    vision_flops_per_tile,
)

QWEN = "configs/models/tiny-qwen2_5_vl.yaml"


@pytest.mark.parametrize(
    "family, window", [("qwen2_5_vl", 40), ("qwen2_5_vl", 20), ("qwen2_vl", 40)]
)
def test_qwen_vision_flops_match_xla_cost_analysis(family, window):
    """Two 8x8-patch images through a 128-wide tower: our count of the forward is
    within 10 % under XLA's (which adds norms, activations, rotary and the masked
    scores: with 20-px windows XLA computes every block over the whole batch)."""
    cfg = load_config(QWEN).model
    v = dataclasses.replace(
        cfg.qwen_vision, family=family, hidden_size=128, intermediate_size=512,
        window_size=window, fullatt_block_indexes=(1,) if family == "qwen2_5_vl" else (),
        hidden_act="silu" if family == "qwen2_5_vl" else "quick_gelu",
    )  # fmt: skip
    with nnx.use_eager_sharding(False):
        tower = QwenVisionTower(v, attention_impl="xla", rngs=nnx.Rngs(0))
    single = vision_layout(np.array([[1, 8, 8], [1, 8, 8]]), v)
    layout = type(single)(*(np.asarray(a)[None] for a in single))
    pixels = np.zeros((1, single.order.shape[0], v.patch_dim), np.float32)
    graphdef, state = nnx.split(tower)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, layout))
    cost = forward.lower(state, pixels).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    batch = {
        "pixel_values": pixels,
        "vision_full_segments": layout.full_segments,
        "vision_window_segments": layout.window_segments,
    }
    ours = qwen_vision_flops(dataclasses.replace(cfg, qwen_vision=v), batch, trainable=())
    assert 1.0 <= xla / ours <= 1.1, (xla, ours)
    # windows cut the attended pairs of the windowed block: 4 windows of 16 patches an image
    if window == 20:
        whole = qwen_vision_flops(
            dataclasses.replace(cfg, qwen_vision=dataclasses.replace(v, window_size=40)),
            batch | {"vision_window_segments": layout.full_segments}, trainable=(),
        )  # fmt: skip
        assert whole - ours == 2 * 2 * v.hidden_size * 2 * (64**2 - 4 * 16**2)


def test_step_flops_count_the_batch_length_and_every_tile():
    cfg = load_config("configs/models/tiny.yaml").model
    text = {"input_ids": np.zeros((4, 64), np.int32)}
    longer = {"input_ids": np.zeros((4, 128), np.int32)}
    assert step_flops(cfg, text) == train_flops_per_token(cfg, 64) * 4 * 64
    assert step_flops(cfg, longer) == train_flops_per_token(cfg, 128) * 4 * 128
    images = {**text, "pixel_values": np.zeros((4, 2, 1, 3, 40, 40), np.float32)}  # 2 a row
    assert step_flops(cfg, images) - step_flops(cfg, text) == 8 * vision_flops_per_tile(cfg)
    # a trained tower counts x3, a frozen one forward only
    trained = ("projector", "llm", "vision")
    assert vision_flops_per_tile(cfg, trained) > 2 * vision_flops_per_tile(cfg)


def test_mfu_is_the_steps_flops_over_their_time_and_the_peak(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    lines = []
    logger = MetricsLogger(2, log_every=2, peak_flops=1e9, print_fn=lines.append)
    logger.log(1, {"loss": 1.0, "grad_norm": 1.0}, 64, 0.0, 0, flops=3e8)
    now[0] = 2.0  # two seconds for the two steps
    row = logger.log(2, {"loss": 1.0, "grad_norm": 1.0}, 64, 0.0, 0, flops=5e8)
    assert row["mfu"] == pytest.approx(8e8 / 2.0 / 1e9) and "MFU 40.0%" in lines[-1]
    # without a measured peak there is no MFU, rather than a 0 %
    quiet = MetricsLogger(1, peak_flops=0.0, print_fn=lines.append)
    assert quiet.log(1, {"loss": 1.0, "grad_norm": 1.0}, 64, 0.0, 0, flops=5e8)["mfu"] is None
