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
from hf_models import QWEN_VL_TOKENS as TOKENS

from insightv_jax.errors import CheckpointError
from insightv_jax.hf.convert import import_hf
from insightv_jax.hf.qwen_vl import qwen_vl_from_hf
from insightv_jax.models.qwen_vl import QwenVL, pack_vision, patch_bucket
from insightv_jax.parallel import single_device_mesh

IMAGE, VIDEO, START, END = (
    TOKENS[k]
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
)
PATCH_DIM = 3 * 2 * 14 * 14
TOL = 1e-4


@pytest.fixture
def models(qwen_vl_models):
    """{family: (transformers model, ours, its folder)} (conftest's, built once a session)."""
    return qwen_vl_models


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
    """Text alone, one image, two images of different sizes in one prompt.
    (The prompts with images are 25 tokens, their patches one 64-patch
    bucket, as the video prompt's below: one compiled forward serves them.)"""
    rng = np.random.RandomState(1)
    assert isinstance(models[family][1], QwenVL)
    _check(models, family, _inputs([_text(rng, 12)]))
    a, b = (1, 4, 6), (1, 8, 4)  # 2x3 and 4x2 merge units (windows cut at the edges)
    _check(models, family, _inputs([_text(rng, 3) + _item(a, IMAGE) + _text(rng, 14)], [a]))
    two = _text(rng, 2) + _item(a, IMAGE) + _text(rng, 3) + _item(b, IMAGE) + _text(rng, 2)
    _check(models, family, _inputs([two], [a, b], seed=2))


def test_left_padded_batch(models):
    """Three rows of different lengths, left-padded, an image in each. (Both
    batches are 3 rows of 18 tokens: one compiled forward for Qwen2.5-VL.)"""
    rng = np.random.RandomState(3)
    a, b = (1, 4, 4), (1, 4, 6)
    rows = [
        _text(rng, 2) + _item(a, IMAGE) + _text(rng, 5),
        _text(rng, 6) + _item(b, IMAGE) + _text(rng, 4),
        _text(rng, 9) + _item(a, IMAGE) + _text(rng, 1),
    ]
    for family in ("qwen2_vl", "qwen2_5_vl"):
        _check(models, family, _inputs(rows, [a, b, a], seed=4))
    # Rows own unequal numbers of images (two, none, one): each row's tower
    # input is its own images, padded to the largest row's.
    rows = [
        _item(a, IMAGE) + _text(rng, 2) + _item(b, IMAGE) + _text(rng, 2),
        _text(rng, 9),
        _text(rng, 3) + _item(b, IMAGE),
    ]
    _check(models, "qwen2_5_vl", _inputs(rows, [a, b, b], seed=7))


def test_video_with_seconds_per_grid(models):
    """Qwen2.5-VL: an image, then a 2-step video whose frames are 1.5 s apart
    (time ids step tokens_per_second * 1.5 = 3)."""
    rng = np.random.RandomState(5)
    img, vid = (1, 4, 4), (2, 4, 4)
    row = _text(rng, 2) + _item(img, IMAGE) + _text(rng, 2) + _item(vid, VIDEO) + _text(rng, 5)
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
