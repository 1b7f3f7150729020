"""Qwen2-VL / Qwen2.5-VL end to end against transformers: tiny random fp32
models saved with `save_pretrained`, loaded with `hf.qwen_vl.load_pretrained`
and called with the processor's outputs by name. Logits must match on text
alone, one image, two images of different sizes in one prompt, a left-padded
batch with an image per row, and (Qwen2.5-VL) a video with
`second_per_grid_ts` next to an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from insightv_jax.errors import CheckpointError
from insightv_jax.hf.convert import import_hf
from insightv_jax.hf.qwen_vl import load_pretrained, qwen_vl_from_hf
from insightv_jax.models.qwen_vl import QwenVL, pack_vision, patch_bucket
from insightv_jax.parallel import single_device_mesh

IMAGE, VIDEO, START, END = 290, 291, 292, 293
PATCH_DIM = 3 * 2 * 14 * 14
TOL = 1e-4
TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    # head_dim 16: 8 frequencies, split time 2, rows 3, columns 3
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
)
TOKENS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END
)


def _hf_model(family: str):
    torch.manual_seed(0)
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **common)
        config = Qwen2VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        # 56-pixel windows are 2x2 merge units; block 1 attends to whole frames.
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            **common,
        )
        config = Qwen2_5_VLConfig(
            text_config=TEXT, vision_config=vision, tie_word_embeddings=True, **TOKENS
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.float().eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in ("qwen2_vl", "qwen2_5_vl"):
        hf = _hf_model(family)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        out[family] = (hf, load_pretrained(folder), folder)
    return out


# ------------------------------------------------------------------ inputs


def _item(grid, token):
    """vision_start, the placeholders of a (t, h, w) patch grid, vision_end."""
    return [START] + [token] * (int(np.prod(grid)) // 4) + [END]


def _text(rng, n):
    return rng.randint(0, 280, n).tolist()


def _pixels(rng, grids):
    n = int(sum(np.prod(g) for g in grids))
    return rng.randn(n, PATCH_DIM).astype(np.float32)


def _inputs(rows, images=(), videos=(), seconds=None, seed=0):
    """Processor-style inputs: rows of ids left-padded to one length, the
    images' and videos' packed patches and grids."""
    rng = np.random.RandomState(seed)
    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    out = dict(input_ids=ids, attention_mask=mask)
    if images:
        out.update(pixel_values=_pixels(rng, images), image_grid_thw=np.array(images))
    if videos:
        out.update(pixel_values_videos=_pixels(rng, videos), video_grid_thw=np.array(videos))
    if seconds is not None:
        out["second_per_grid_ts"] = np.array(seconds, np.float32)
    return out


def _hf_logits(hf, inputs):
    ids = inputs["input_ids"]
    types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    args = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        return hf(**args, mm_token_type_ids=torch.tensor(types)).logits.numpy()


def _check(models, family, inputs):
    hf, ours, _ = models[family]
    want = _hf_logits(hf, inputs)
    got = np.asarray(ours(**inputs))
    assert got.shape == want.shape
    real = inputs["attention_mask"].astype(bool)  # padded queries are undefined in both
    diff = float(np.abs(got - want)[real].max())
    assert diff <= TOL, f"{family}: max |logit diff| {diff:.2e}"
    return diff


# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_text_and_images(models, family):
    """Text alone, one image, two images of different sizes in one prompt."""
    rng = np.random.RandomState(1)
    assert isinstance(models[family][1], QwenVL)
    _check(models, family, _inputs([_text(rng, 12)]))
    a, b = (1, 4, 6), (1, 8, 4)  # 2x3 and 4x2 merge units (windows cut at the edges)
    _check(models, family, _inputs([_text(rng, 3) + _item(a, IMAGE) + _text(rng, 4)], [a]))
    two = _text(rng, 2) + _item(a, IMAGE) + _text(rng, 3) + _item(b, IMAGE) + _text(rng, 2)
    _check(models, family, _inputs([two], [a, b], seed=2))


def test_left_padded_batch(models):
    """Two rows of different lengths, left-padded, an image in each."""
    rng = np.random.RandomState(3)
    a, b = (1, 4, 4), (1, 4, 6)
    rows = [
        _text(rng, 2) + _item(a, IMAGE) + _text(rng, 5),
        _text(rng, 6) + _item(b, IMAGE) + _text(rng, 4),
    ]
    for family in ("qwen2_vl", "qwen2_5_vl"):
        _check(models, family, _inputs(rows, [a, b], seed=4))
    # Rows own unequal numbers of images (two, none, one): each row's tower
    # input is its own images, padded to the largest row's.
    rows = [
        _item(a, IMAGE) + _text(rng, 2) + _item(b, IMAGE),
        _text(rng, 9),
        _text(rng, 3) + _item(b, IMAGE),
    ]
    _check(models, "qwen2_5_vl", _inputs(rows, [a, b, b], seed=7))


def test_video_with_seconds_per_grid(models):
    """Qwen2.5-VL: an image, then a 2-step video whose frames are 1.5 s apart
    (time ids step tokens_per_second * 1.5 = 3)."""
    rng = np.random.RandomState(5)
    img, vid = (1, 4, 4), (2, 4, 4)
    row = _text(rng, 2) + _item(img, IMAGE) + _text(rng, 2) + _item(vid, VIDEO) + _text(rng, 3)
    inputs = _inputs([row], [img], [vid], seconds=[1.5], seed=6)
    _check(models, "qwen2_5_vl", inputs)


def test_keyword_only_and_placeholder_checks(models):
    _, ours, folder = models["qwen2_vl"]
    ids = np.array([[1, 2, 3]])
    with pytest.raises(TypeError):
        ours(ids)
    grid = (1, 4, 4)
    inputs = _inputs([[1, *_item(grid, IMAGE)]], [grid, grid])  # two images, one's placeholders
    with pytest.raises(ValueError, match="image placeholder"):
        pack_vision(ours.cfg, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    # Row 0's placeholders cover one and a half of the images: no row owns the rest.
    half = [1] + [IMAGE] * 2
    inputs = _inputs([[1, *_item(grid, IMAGE)] + half, half], [grid, grid])
    with pytest.raises(ValueError, match="row 0: its image placeholder tokens end inside"):
        pack_vision(ours.cfg, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    assert [patch_bucket(n) for n in (1, 64, 65, 1024, 1025)] == [64, 64, 128, 1024, 2048]
    # hf.convert.import_hf (and so checkpoint.load_model) routes here too
    model, cfg = import_hf(folder, single_device_mesh())
    assert isinstance(model, QwenVL) and cfg == ours.cfg


def test_config_of_a_4x_hub_checkpoint():
    """A 3B-style config.json saved by transformers 4.x: text fields at the top,
    `rope_scaling: mrope`, tied embeddings, old vision field names."""
    d = dict(
        model_type="qwen2_5_vl",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_hidden_layers=2,
        num_key_value_heads=2,
        rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=True,
        vocab_size=300,
        **TOKENS,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            in_chans=3,
            out_hidden_size=64,
            spatial_patch_size=14,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),  # fmt: skip
    )
    cfg = qwen_vl_from_hf(d)
    dec = cfg.decoder
    assert (dec.mrope_section, dec.tie_embeddings, dec.rope_theta, dec.qkv_bias) == (
        (2, 3, 3),
        True,
        1e6,
        True,
    )
    assert (cfg.qwen_vision.tokens_per_second, cfg.qwen_vl.video_token_id) == (2, VIDEO)
    bad = dict(d, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 4]})
    with pytest.raises(CheckpointError, match="mrope_section"):
        qwen_vl_from_hf(bad)
