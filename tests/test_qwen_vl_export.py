"""Qwen2-VL / Qwen2.5-VL export: a tiny random transformers model saved with
`save_pretrained` goes through `insightv convert hf2jax` then `jax2hf`, and
transformers loads the result with the same tensors (keys and shapes), the same
logits on a prompt with an image, and an image processor giving our pixels.
Qwen2.5-VL's model ties its embeddings (no lm_head.weight either way)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from test_hf_roundtrip import _keys_and_shapes
from test_qwen_vl_model import IMAGE, _hf_logits, _inputs, _item, _text
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from insightv_jax import cli
from insightv_jax.data.qwen_images import QwenImageProcessor
from insightv_jax.hf.configs import model_to_hf, qwen_vl_from_hf

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_through_cli(family, tmp_path, qwen_vl_models):
    hf, _, src = qwen_vl_models[family]  # src: its save_pretrained folder
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert cli.main(["convert", "hf2jax", "--src", str(src), "--out", str(ckpt)]) == 0
    assert cli.main(["convert", "jax2hf", "--src", str(ckpt), "--out", str(back)]) == 0

    keys = _keys_and_shapes(back)
    assert keys == _keys_and_shapes(src)
    assert ("lm_head.weight" in keys) == (not hf.config.tie_word_embeddings)
    with (
        safe_open(src / "model.safetensors", "np") as a,
        safe_open(back / "model.safetensors", "np") as b,
    ):
        for key in keys:  # fp32 reshapes and transposes only: bit for bit
            np.testing.assert_array_equal(b.get_tensor(key), a.get_tensor(key), err_msg=key)
    reloaded = AutoModelForImageTextToText.from_pretrained(back).float().eval()
    assert type(reloaded) is type(hf)
    rng = np.random.RandomState(1)
    grid = (1, 4, 6)
    inputs = _inputs([_text(rng, 3) + _item(grid, IMAGE) + _text(rng, 4)], [grid])
    np.testing.assert_allclose(
        _hf_logits(reloaded, inputs), _hf_logits(hf, inputs), atol=1e-5, rtol=0
    )

    # the image processor written from the model's patch sizes
    img = Image.fromarray(np.random.RandomState(2).randint(0, 256, (90, 130, 3), np.uint8))
    ours = QwenImageProcessor.from_pretrained(back)
    theirs = Qwen2VLImageProcessorPil.from_pretrained(str(back))([img], return_tensors="np")
    got = ours([img])
    np.testing.assert_array_equal(got["image_grid_thw"], theirs["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)
    # and the processor config naming the combined processor, which needs torchvision
    # and was not run (test_hf_processor checks its parts)
    proc = json.loads((back / "processor_config.json").read_text())
    assert proc["processor_class"] == {"qwen2_vl": "Qwen2VLProcessor",
                                       "qwen2_5_vl": "Qwen2_5_VLProcessor"}[family]  # fmt: skip
    assert proc["image_processor"] == ours.to_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family, qwen_vl_models):
    """ours -> config.json -> ours is the identity, and transformers reads the
    export into the config it was saved from (less training-only fields)."""
    hf = qwen_vl_models[family][0]
    source = hf.config.to_dict()
    cfg = qwen_vl_from_hf(source)
    exported = model_to_hf(cfg)
    assert qwen_vl_from_hf(exported) == cfg
    assert exported["architectures"] == [type(hf).__name__]
    rest = {k: v for k, v in exported.items() if k != "model_type"}
    again = AutoConfig.for_model(exported["model_type"], **rest).to_dict()

    def comparable(d):  # an unsaved config has no architectures or dtype yet
        skip = ("architectures", "dtype", "transformers_version", "_name_or_path")
        d = {k: v for k, v in d.items() if k not in skip}
        for sub in ("text_config", "vision_config"):
            d[sub] = {k: v for k, v in d[sub].items() if k not in ("initializer_range", "dtype")}
        return d

    assert comparable(again) == comparable(source)

    # fields the tiny model leaves at their defaults travel too (one dtype for the model)
    other = dataclasses.replace(
        cfg,
        decoder=dataclasses.replace(
            cfg.decoder, rope_theta=1e6, rms_norm_eps=1e-6, param_dtype="bfloat16"
        ),
        qwen_vision=dataclasses.replace(
            cfg.qwen_vision, rope_theta=2e4, hidden_act="gelu", param_dtype="bfloat16"
        ),
    )
    assert qwen_vl_from_hf(json.loads(json.dumps(model_to_hf(other)))) == other
