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
    # bf16 parameters split 64 ways; AdamW moments (trainable only) twice that
    assert abs(hand["params"] - total * 2 / 64) / hand["params"] < 0.02
    trainable_bytes = report["trainable_params"] * 2 / 64
    assert abs(hand["optimizer"] - 2 * trainable_bytes) / hand["optimizer"] < 0.02
    assert xla["arguments"] >= hand["params"] + hand["optimizer"]
    assert xla["total"] < 95 * GiB and hand["total"] < 95 * GiB
    assert report["model_flops_per_step"] > 6 * 8e9 * 512 * 12288
    print(json.dumps(report, indent=1))
