"""Cached decoding of Qwen2-VL / Qwen2.5-VL with images through `Sampler`:
greedy tokens equal to transformers' `generate(do_sample=False)` (one image,
two images in one prompt, a two-row left-padded batch, an image and a video
whose time ids step 3 per frame pair, so rope_deltas carry the video's), each step's logits
against transformers' and against our uncached forward on the same sequence
(prompt + generated tokens), and a shared prefill (`repeat_rows`) with a stop
token. The tiny random models are `test_qwen_vl_model`'s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_qwen_vl_model import IMAGE, VIDEO, _item, _pixels, _text

from insightv_jax.models.qwen_vl import QwenVL, VisionPrompt
from insightv_jax.sample.sampler import Sampler, SamplingParams

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
NEW = 12
MAX_LEN = 64  # one cache size (and so one decode program per batch size)
TOL = 1e-4


@pytest.fixture(scope="module")
def models(qwen_vl_models):
    """{family: (transformers model, ours, a Sampler over ours)} (conftest's models)."""
    out = {}
    for family in FAMILIES:
        hf, ours, _ = qwen_vl_models[family]
        assert isinstance(ours, QwenVL)
        out[family] = (hf, ours, Sampler(ours, pad_id=0))
    return out


def _case(name):
    """(rows of ids, image grids, their pixels) of a named prompt case; the
    video case's third item is a dict of the processor's arrays."""
    rng = np.random.RandomState(len(name))
    a, b = (1, 4, 6), (1, 8, 4)  # 2x3 and 4x2 merge units
    if name == "video":  # 26 tokens, 56 patches: the same buckets as the image cases
        v = (2, 4, 4)
        row = _text(rng, 2) + _item(a, IMAGE) + _text(rng, 2) + _item(v, VIDEO) + _text(rng, 4)
        arrays = dict(pixel_values=_pixels(rng, [a]), image_grid_thw=np.array([a]),
                      pixel_values_videos=_pixels(rng, [v]), video_grid_thw=np.array([v]),
                      second_per_grid_ts=np.array([1.5], np.float32))  # fmt: skip
        return [row], None, arrays
    if name == "one image":
        # 20 tokens: the same prefill bucket (32) as the other cases
        rows, grids = [_text(rng, 3) + _item(a, IMAGE) + _text(rng, 9)], [a]
    elif name == "two images":
        row = _text(rng, 2) + _item(a, IMAGE) + _text(rng, 3) + _item(b, IMAGE) + _text(rng, 2)
        rows, grids = [row], [a, b]
    else:  # a batch of two rows, different lengths and image shapes
        rows = [
            _text(rng, 2) + _item(b, IMAGE) + _text(rng, 5),
            _text(rng, 9) + _item(a, IMAGE) + _text(rng, 3),
        ]
        grids = [b, a]
    return rows, grids, _pixels(rng, grids)


def _left_padded(rows, tails=None):
    """Rows (each + its tail of generated tokens) left-padded with 0: (ids, mask)."""
    tails = [[] for _ in rows] if tails is None else tails
    full = [list(r) + list(t) for r, t in zip(rows, tails)]
    T = max(len(r) for r in full)
    ids = np.zeros((len(full), T), np.int64)
    mask = np.zeros((len(full), T), np.int64)
    for b, r in enumerate(full):
        ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    return ids, mask


def _vision(grids, pixels) -> dict:
    """The processor's arrays of a case (its images, or the video case's dict)."""
    return pixels if grids is None else dict(pixel_values=pixels, image_grid_thw=np.array(grids))


def _hf_generate(hf, rows, grids, pixels):
    """transformers' greedy tokens (B, NEW) and its step logits (B, NEW, V)."""
    ids, mask = _left_padded(rows)
    types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            mm_token_type_ids=torch.tensor(types),
            **{k: torch.tensor(v) for k, v in _vision(grids, pixels).items()},
            max_new_tokens=NEW,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    return tokens, torch.stack(out.logits, 1).numpy()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _at(logits, tokens):
    """log p(token) of each row and step: logits (B, n, V), tokens (B, n)."""
    return np.take_along_axis(_log_softmax(logits), tokens[..., None], -1)[..., 0]


def _prefill(ours, sampler, rows, grids, pixels):
    state = sampler.start(len(rows), MAX_LEN)
    vision = ours.vision_prompt(**_vision(grids, pixels))
    return sampler.extend(state, rows, vision=vision)


# Qwen2.5-VL only: the cached path is the same decoder and the same tower call for both
# families, and Qwen2-VL's tower is exact in test_qwen_vision / test_qwen_vl_model.
@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_greedy_equals_transformers(models, family):
    hf, ours, sampler = models[family]
    for name in ("one image", "two images", "batch", "video"):
        rows, grids, pixels = _case(name)
        want, hf_logits = _hf_generate(hf, rows, grids, pixels)
        assert want.shape == (len(rows), NEW)
        state = _prefill(ours, sampler, rows, grids, pixels)
        first = np.asarray(state.logits)  # logits of the first new token
        state, out = sampler.decode(state, SamplingParams(max_new_tokens=NEW))
        got = np.asarray(out.tokens)
        np.testing.assert_array_equal(got, want, err_msg=f"{family}, {name}")
        # each step's log p(token), and the first step's logits, against transformers'
        steps = float(np.abs(np.asarray(out.logprobs) - _at(hf_logits, want)).max())
        assert steps <= TOL, f"{family}, {name}: step log-probs differ by {steps:.2e}"
        assert float(np.abs(first - hf_logits[:, 0]).max()) <= TOL
        if name != "batch":
            continue
        # against our uncached forward over prompt + generated tokens: every
        # step's log p(token), the first step's logits and those after the last
        ids, mask = _left_padded(rows, got)
        full = np.asarray(ours(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                               image_grid_thw=np.array(grids)))  # fmt: skip
        T = ids.shape[1]
        uncached = full[:, T - NEW - 1 : T - 1]  # the logits each generated token was drawn from
        diffs = [
            np.abs(np.asarray(out.logprobs) - _at(uncached, got)).max(),
            np.abs(first - uncached[:, 0]).max(),
            np.abs(np.asarray(state.logits) - full[:, T - 1]).max(),
        ]
        assert max(diffs) <= TOL, f"{family}: cached vs uncached differ by {max(diffs):.2e}"


def test_shared_prefill_and_stop_token(models):
    """One prefill, two rows by `repeat_rows` (rope_deltas repeated): both equal
    the single row's greedy tokens; a stop token ends both rows there."""
    hf, ours, sampler = models["qwen2_vl"]
    rows, grids, pixels = _case("one image")
    want, _ = _hf_generate(hf, rows, grids, pixels)
    state = _prefill(ours, sampler, rows, grids, pixels).repeat_rows(2)
    assert np.asarray(state.cache.rope_deltas).tolist()[0] < 0  # the image's 2x3 units: 3 ids
    assert len(set(np.asarray(state.cache.rope_deltas).tolist())) == 1
    stop = int(want[0, 5])
    first = int(np.argmax(want[0] == stop))  # its first occurrence
    _, out = sampler.decode(state, SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop,)))
    tokens, nums = np.asarray(out.tokens), np.asarray(out.num_tokens)
    assert nums.tolist() == [first + 1] * 2 and np.asarray(out.stopped).all()
    for row in tokens:
        np.testing.assert_array_equal(row[: first + 1], want[0, : first + 1])
        assert (row[first + 1 :] == 0).all()


def test_vision_prompt_skips_padding_ids(models):
    """`VisionPrompt.pack` never reads a padding id as a placeholder, and its
    M-RoPE ids count from the chunk's first token."""
    _, ours, _ = models["qwen2_vl"]
    rows, grids, pixels = _case("one image")
    ids = np.full((1, 32), IMAGE, np.int32)  # padding with the placeholder's own id
    ids[0, : len(rows[0])] = rows[0]
    mask = (np.arange(32) < len(rows[0]))[None].astype(np.int32)
    vision, positions = VisionPrompt(ours.cfg, pixels, np.array(grids)).pack(ids, mask)
    assert (np.asarray(vision.rows)[0, len(rows[0]) :] == -1).all()
    assert positions.shape == (3, 1, 32) and positions[:, 0, 0].tolist() == [0, 0, 0]
    # 3 text, start (3), 2x3 image units (ids 4..6), end (7), 9 text (8..16)
    assert positions[:, 0, len(rows[0]) - 1].tolist() == [16] * 3
