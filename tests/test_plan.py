"""`insightv plan`: the 8B reasoning-SFT step (12,288 tokens, blockwise attention,
chunked loss) compiled for 64 fake devices fits 95 GiB per device."""

import json
from pathlib import Path

import pytest

from insightv_jax.train.plan import plan_in_subprocess

CONFIG = (
    Path(__file__).resolve().parent.parent / "configs/train/reasoning-sft-llava-next-llama3-8b.yaml"
)
GiB = 1024**3


@pytest.mark.slow
def test_plan_8b_reasoning_sft_fits_v5p_128():
    proc = plan_in_subprocess(str(CONFIG), [], 64, as_json=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 64 and report["seq_len"] == 12288
    # LLaVA-NeXT-Llama3-8B: Llama-3-8B + projector trained, CLIP ViT-L/14-336 frozen
    total = report["trainable_params"] + report["frozen_params"]
    assert total == 8_354_752_512 and 7.9e9 < report["trainable_params"] < 8.1e9
    xla, hand = report["xla_per_device"], report["hand_per_device"]
    # bf16 parameters split 64 ways; with train.master_weights an fp32 copy of the
    # trainable ones and fp32 AdamW moments (trainable only): 2x and 4x their bf16 bytes
    assert abs(hand["params"] - total * 2 / 64) / hand["params"] < 0.02
    trainable_bytes = report["trainable_params"] * 2 / 64
    assert abs(hand["master_weights"] - 2 * trainable_bytes) / hand["master_weights"] < 0.02
    assert abs(hand["optimizer"] - 4 * trainable_bytes) / hand["optimizer"] < 0.02
    assert xla["arguments"] >= hand["params"] + hand["master_weights"] + hand["optimizer"]
    assert xla["total"] < 95 * GiB and hand["total"] < 95 * GiB
    assert report["model_flops_per_step"] > 6 * 8e9 * 512 * 12288
    print(json.dumps(report, indent=1))


# ---------------------------------------------------------------- Qwen-VL
# The 7B plans compile for ~30 s (64 devices) and ~20 s (8) on 2 CPU cores:
# their numbers are in docs/benchmarks.md. The micro Qwen2.5-VL's planned step
# is compiled, reported and run in tests/test_qwen_vl_sharding.py.

REPO = CONFIG.parent.parent.parent
QWEN_MICRO = str(REPO / "configs/models/tiny-qwen2_5_vl.yaml")


def test_qwen_vl_abstract_batch_is_batch_arrays_layout(eight_devices):
    """The plan's abstract Qwen-VL batch has exactly the keys, shapes and
    dtypes the loader's batches (`batch_arrays`) have at its patch budget."""
    import numpy as np

    from insightv_jax.config import MeshConfig, load_config
    from insightv_jax.models.qwen_vl import BATCH_KEYS, batch_arrays
    from insightv_jax.parallel import make_mesh
    from insightv_jax.train.plan import abstract_batch, qwen_patch_budget

    cfg = load_config(QWEN_MICRO).model
    B, T = 8, 64
    # max_pixels 10,000 over 10x10-px merged tokens: 100 tokens, cut to T = 64
    L = qwen_patch_budget(cfg, T)
    assert L == 256
    batch = abstract_batch(cfg, make_mesh(MeshConfig(2, 4, 1)), B, T)
    assert set(batch) == {"input_ids", "attention_mask", "labels", *BATCH_KEYS}
    assert batch["pixel_values"].sharding.shard_shape(batch["pixel_values"].shape)[0] == 1

    ids = np.full((B, T), 20, np.int32)
    ids[:, 1 : 1 + 16] = cfg.qwen_vl.image_token_id  # an 8x8-patch image per row
    grids = np.array([[1, 8, 8]] * B)
    pixels = np.zeros((64 * B, cfg.qwen_vision.patch_dim), np.float32)
    real = batch_arrays(cfg, ids, np.ones_like(ids), pixels, grids, num_slots=L)
    for key, value in real.items():
        assert (batch[key].shape, batch[key].dtype) == (value.shape, value.dtype), key


def test_qwen_vl_7b_plan_configs(eight_devices):
    """The v5p-128 and 8xH100 Qwen2.5-VL-7B plans: one image of 1,280 tokens
    (5,120 patches) per 12,288-token sample, one sample per device per micro-batch."""
    from insightv_jax.config import load_config
    from insightv_jax.parallel import make_mesh
    from insightv_jax.train.plan import abstract_batch, qwen_patch_budget

    for name, devices in (("", 64), ("-h100", 8)):
        cfg = load_config(REPO / f"configs/train/reasoning-sft-qwen2_5-vl-7b{name}.yaml")
        assert cfg.model.kind == "qwen2_5_vl" and cfg.train.seq_len == 12288
        assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == devices
        assert cfg.train.global_batch // cfg.train.micro_batches == devices
        assert qwen_patch_budget(cfg.model, cfg.train.seq_len) == 5120
    batch = abstract_batch(cfg.model, make_mesh(cfg.mesh), 512, 12288)  # the H100 mesh
    pv = batch["pixel_values"]
    assert pv.shape == (512, 5120, 1176) and pv.sharding.shard_shape(pv.shape)[0] == 64
    assert batch["positions"].shape == (512, 3, 12288)
