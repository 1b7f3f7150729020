"""Qwen2-VL / Qwen2.5-VL vision towers and M-RoPE against transformers: the
tower's output and every block (Qwen2.5-VL in window order), the host layout
(rotary ids, windows, frames), one compile per padded size, `get_rope_index`
(exact integers) and the multimodal rotary embedding. Tiny random fp32 models."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import hf_rope_index
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from insightv_jax.config.base import ConfigError
from insightv_jax.config.qwen_vision import QwenVisionConfig
from insightv_jax.errors import CheckpointError
from insightv_jax.hf.qwen_vision import import_qwen_vision, load_qwen_vision, qwen_vision_from_hf
from insightv_jax.models.mrope import get_rope_index, mm_token_types, mrope_cos_sin
from insightv_jax.models.qwen_vision import (
    VisionLayout,
    merged_tokens,
    num_patches,
    pad_patches,
    vision_layout,
)
from insightv_jax.models.rope import apply_rope, rope_inv_freq

# Two images of different sizes and aspect ratios and a 2-step video, in one call.
GRIDS = np.array([[1, 8, 12], [1, 6, 4], [2, 4, 8]])
BUCKET = 192  # 184 patches padded: the padding is a segment of its own
TOL = 1e-4


def _hf_tower(family: str):
    torch.manual_seed(0)
    common = dict(depth=4, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    common["initializer_range"] = 0.1  # larger than HF's 0.02, so the outputs are not all ~0
    if family == "qwen2_vl":
        hc = Qwen2VLVisionConfig(embed_dim=32, hidden_size=48, mlp_ratio=2, **common)
        model = Qwen2VisionTransformerPretrainedModel(hc)
    else:
        # 84-pixel windows are 3x3 merge units: the 4x6-unit image gets 2x2
        # windows, three of them cut short at its edges.
        hc = Qwen2_5_VLVisionConfig(
            hidden_size=32,
            intermediate_size=40,
            out_hidden_size=48,
            window_size=84,
            fullatt_block_indexes=[1, 3],
            **common,
        )
        model = Qwen2_5_VisionTransformerPretrainedModel(hc)
    model = model.float().eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model, hc


@pytest.fixture(scope="module")
def towers():
    out = {}
    for family in ("qwen2_vl", "qwen2_5_vl"):
        hf, hc = _hf_tower(family)
        cfg = qwen_vision_from_hf(hc.to_dict())
        state = {k: v.numpy() for k, v in hf.state_dict().items()}
        out[family] = (hf, cfg, state, load_qwen_vision(state, cfg))
    return out


def _pixels(grids, seed=0):
    n = num_patches(grids)
    return np.random.RandomState(seed).randn(n, 3 * 2 * 14 * 14).astype(np.float32)


def _hf_forward(hf, px, grids):
    with torch.no_grad():
        return hf(torch.tensor(px), grid_thw=torch.tensor(grids), output_hidden_states=True)


# ------------------------------------------------------------------ the tower


def test_config_from_hf_and_validation():
    old_names = dict(  # a 4.x hub vision_config of Qwen2.5-VL
        model_type="qwen2_5_vl",
        depth=4,
        hidden_size=32,
        intermediate_size=40,
        out_hidden_size=48,
        num_heads=2,
        in_chans=3,
        spatial_patch_size=14,
        window_size=112,
        fullatt_block_indexes=[3],
        tokens_per_second=2,
    )
    cfg = qwen_vision_from_hf({"model_type": "qwen2_5_vl", "vision_config": old_names})
    assert (cfg.family, cfg.patch_size, cfg.window_units, cfg.tokens_per_second) == (
        "qwen2_5_vl",
        14,
        4,
        2,
    )
    assert cfg.fullatt_block_indexes == (3,) and cfg.hidden_act == "silu"
    bad = [
        (dict(hidden_size=30, num_heads=4), "not a multiple of qwen_vision.num_heads"),
        (dict(hidden_size=24, num_heads=4), "head_dim=6 must be a multiple of 4"),
        (dict(window_size=20), "window_size=20 is smaller than one merge unit"),
        (dict(fullatt_block_indexes=(5,)), "fullatt_block_indexes: 5 is not a block index"),
        (dict(family="qwen2_vl", fullatt_block_indexes=(0,)), "is for family qwen2_5_vl"),
        (dict(dtype="int8"), "qwen_vision.dtype='int8'"),
        (dict(depth=0), "qwen_vision.depth=0 must be >= 1"),
    ]
    for kw, needle in bad:
        with pytest.raises(ConfigError) as e:
            QwenVisionConfig(**kw).validate()
        assert needle in str(e.value) and "\n" not in str(e.value)


def _one_sample(layout: VisionLayout) -> VisionLayout:
    """A layout as the tower takes it: a batch of one sample."""
    return VisionLayout(*(a[None] for a in layout))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_layout_matches_hf(family, towers):
    """Rotary ids, window order and the frame / window boundaries equal HF's."""
    cfg = towers[family][1]
    lay = vision_layout(GRIDS, cfg)
    g = torch.tensor(GRIDS)
    L = num_patches(GRIDS)
    units = lay.order.reshape(-1, 4)
    assert (units == units[:, :1] + np.arange(4)).all()  # merge units move whole
    unit_order = units[:, 0] // 4
    pos = get_vision_position_ids(g, 2).numpy()  # (L, 2) in image order
    if family == "qwen2_5_vl":
        window_index, cu_windows = get_vision_window_index(g, 2, cfg.window_size, 14)
        np.testing.assert_array_equal(unit_order, window_index.numpy())
        starts = np.flatnonzero(np.diff(lay.window_segments, prepend=-1))
        np.testing.assert_array_equal(np.append(starts, L), cu_windows.numpy())
        pos = pos[lay.order]
    else:
        np.testing.assert_array_equal(unit_order, np.arange(L // 4))
        np.testing.assert_array_equal(lay.window_segments, lay.full_segments)
    np.testing.assert_array_equal(lay.positions, pos)
    frames = np.flatnonzero(np.diff(lay.full_segments, prepend=-1))
    np.testing.assert_array_equal(np.append(frames, L), get_vision_cu_seqlens(g).numpy())
    np.testing.assert_array_equal(
        lay.order[lay.restore.repeat(4) * 4 + np.tile(np.arange(4), L // 4)], np.arange(L)
    )


@pytest.mark.parametrize(
    "family, variant",
    [("qwen2_vl", "scan"), ("qwen2_5_vl", "scan"), ("qwen2_5_vl", "unrolled"),
     ("qwen2_5_vl", "blockwise")],
)  # fmt: skip
def test_tower_and_every_block_match_hf(family, variant, towers):
    """Two images and a video in one padded call: the embeddings and every
    block's output in processing order (Qwen2.5-VL: HF's window order), then
    the merged tokens before and after the return to image order. `blockwise`:
    the segments as attention segment ids over 16-patch key blocks (several
    blocks per window and frame), never the (L, L) scores."""
    hf, cfg, state, ours = towers[family]
    if variant == "unrolled":  # the unrolled loop with rematerialisation: same numbers
        ours = load_qwen_vision(state, dataclasses.replace(cfg, scan_layers=False, remat="full"))
    if variant == "blockwise":
        ours = load_qwen_vision(
            state, dataclasses.replace(cfg, attention="blockwise", attention_block_size=16)
        )
    px = _pixels(GRIDS)
    L, n_tokens = num_patches(GRIDS), int(merged_tokens(GRIDS, 2).sum())
    ref = _hf_forward(hf, px, GRIDS)
    lay = _one_sample(vision_layout(GRIDS, cfg, BUCKET))

    @nnx.jit
    def run(m, x, layout):
        out, per_layer = m.hidden_and_layer_outputs(x, layout)
        embed = m.embed(x)[0, layout.order[0]] if m.cfg.windowed else m.embed(x)[0]
        return out[0], per_layer[:, 0], embed, m.merger(per_layer[-1])[0]

    out, per_layer, embed, window_merged = (
        np.asarray(a) for a in run(ours, pad_patches(px, BUCKET)[None], lay)
    )
    assert len(ref.hidden_states) == cfg.depth + 1
    np.testing.assert_allclose(embed[:L], ref.hidden_states[0].numpy(), atol=TOL, rtol=0)
    for i in range(cfg.depth):
        np.testing.assert_allclose(
            per_layer[i, :L],
            ref.hidden_states[i + 1].numpy(),
            atol=TOL,
            rtol=0,
            err_msg=f"block {i}",
        )
    with torch.no_grad():
        hf_window_merged = hf.merger(ref.last_hidden_state).numpy()
    np.testing.assert_allclose(window_merged[:n_tokens], hf_window_merged, atol=TOL, rtol=0)
    expected = ref.pooler_output.numpy()
    assert np.abs(expected).max() > 0.5  # a tolerance of 1e-4 means something
    np.testing.assert_allclose(out[:n_tokens], expected, atol=TOL, rtol=0)
    assert np.isfinite(out).all()  # padding rows too


def test_one_compile_per_padded_size(towers):
    """Two batches of other sizes padded to the same length share one program."""
    hf, cfg, _, ours = towers["qwen2_5_vl"]
    traces = []

    @nnx.jit
    def run(m, x, layout):
        traces.append(1)
        return m(x, layout)

    other = np.array([[1, 10, 6], [1, 4, 4], [3, 2, 2]])  # 88 patches
    for grids, seed in ((GRIDS, 0), (other, 1)):
        px = _pixels(grids, seed)
        lay = _one_sample(vision_layout(grids, cfg, BUCKET))
        out = np.asarray(run(ours, pad_patches(px, BUCKET)[None], lay))[0]
        n = int(merged_tokens(grids, 2).sum())
        np.testing.assert_allclose(
            out[:n], _hf_forward(hf, px, grids).pooler_output.numpy(), atol=TOL, rtol=0
        )
    assert len(traces) == 1
    with pytest.raises(ValueError, match="multiple of 4"):
        vision_layout(GRIDS, cfg, 186)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        vision_layout([[1, 3, 4]], cfg)


def test_import_names_the_bad_tensor(towers):
    _, cfg, state, _ = towers["qwen2_5_vl"]
    prefixed = {f"model.visual.{k}": v for k, v in state.items()}
    prefixed["model.language_model.embed_tokens.weight"] = np.zeros((5, 48), np.float32)
    loaded = load_qwen_vision(prefixed, cfg)  # the prefix is found; other keys are not ours
    tower = load_qwen_vision({k: np.zeros_like(v) for k, v in state.items()}, cfg)
    import_qwen_vision(tower, state)  # in place, into a built tower
    for a, b in zip(jax.tree.leaves(nnx.state(tower)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = state["blocks.1.attn.qkv.weight"][32:48]  # k, head 0: rows 32..47 of [q; k; v]
    np.testing.assert_array_equal(np.asarray(tower.blocks.attn.k_proj[1, :, 0, :]), q.T)
    cases = [
        (
            {k: v for k, v in state.items() if k != "blocks.2.mlp.up_proj.bias"},
            "'blocks.2.mlp.up_proj.bias' is missing",
        ),
        (
            {**state, "blocks.0.attn.qkv.weight": np.zeros((96, 31))},
            "'blocks.0.attn.qkv.weight' of shape (96, 31)",
        ),
        ({**state, "blocks.0.norm1.bias": np.zeros(32)}, "'blocks.0.norm1.bias' is not used"),
    ]
    for sd, needle in cases:
        with pytest.raises(CheckpointError) as e:
            load_qwen_vision(sd, cfg)
        assert needle in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------- M-RoPE

IMG, VID = 1, 2


def _row(*parts):
    return sum(([kind] * n for kind, n in parts), [])


ROPE_CASES = {
    "text_only": dict(types=[_row((0, 9)), _row((0, 9))]),
    "one_image": dict(types=[_row((0, 3), (IMG, 24), (0, 5))], image=[[1, 8, 12]]),
    "two_images": dict(
        types=[_row((0, 2), (IMG, 24), (0, 3), (IMG, 6), (0, 4))], image=[[1, 8, 12], [1, 6, 4]]
    ),
    "video": dict(
        types=[_row((0, 2), (VID, 16), (0, 3), (IMG, 6), (0, 2))],
        image=[[1, 6, 4]],
        video=[[4, 4, 4]],
        seconds=[1.5],
    ),
    "left_padded_batch": dict(
        types=[
            _row((0, 2), (0, 3), (IMG, 6), (0, 3)),
            _row((0, 2), (IMG, 6), (0, 1), (IMG, 4), (0, 1)),
            _row((0, 14)),
        ],
        mask=[_row((0, 2), (1, 12)), _row((1, 14)), _row((0, 10), (1, 4))],
        image=[[1, 6, 4], [1, 4, 6], [1, 4, 4]],
    ),
}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_index_matches_hf(case, family):
    c = ROPE_CASES[case]
    token_types = np.array(c["types"])
    mask = np.array(c["mask"]) if "mask" in c else None
    if mask is not None:  # padding rows carry pad tokens (text) where the mask is 0
        token_types = np.where(mask.astype(bool), token_types, 0)
    image = np.array(c["image"]) if "image" in c else None
    video = np.array(c["video"]) if "video" in c else None
    seconds = np.array(c["seconds"], np.float32) if "seconds" in c else None
    tps = 2 if family == "qwen2_5_vl" else None
    extra = dict(second_per_grid_ts=seconds) if family == "qwen2_5_vl" else {}
    want = hf_rope_index(
        family,
        token_types,
        tps,
        image_grid_thw=image,
        video_grid_thw=video,
        attention_mask=mask,
        **extra,
    )
    got = get_rope_index(
        token_types,
        spatial_merge_size=2,
        image_grid_thw=image,
        video_grid_thw=video,
        attention_mask=mask,
        tokens_per_second=tps,
        **extra,
    )
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].shape == (3, *token_types.shape) and got[1].shape == (len(token_types), 1)


def test_rope_index_rejects_mismatched_placeholders():
    ids = np.array([[5, 9, 9, 9, 9, 9, 5]])
    token_types = mm_token_types(ids, image_token_id=9, video_token_id=8)
    assert token_types.tolist() == [[0, 1, 1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="ends inside a image of 6 tokens"):
        get_rope_index(token_types, spatial_merge_size=2, image_grid_thw=[[1, 4, 6]])
    with pytest.raises(ValueError, match="more image placeholders than image grids"):
        get_rope_index(token_types, spatial_merge_size=2, image_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="more image grids than image placeholders"):
        get_rope_index(token_types, spatial_merge_size=2, image_grid_thw=[[1, 2, 10], [1, 2, 2]])


def test_multimodal_rotary_matches_hf():
    """q and k rotated by M-RoPE (`mrope_section` over time, row, column)
    equal HF's rotary embedding + apply_rotary_pos_emb."""
    section = [2, 3, 3]  # head_dim 16: 8 frequencies
    text_cfg = Qwen2VLTextConfig(
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    )
    c = ROPE_CASES["video"]
    pos, _ = get_rope_index(
        np.array(c["types"] * 2),
        spatial_merge_size=2,
        image_grid_thw=np.array(c["image"] * 2),
        video_grid_thw=np.array(c["video"] * 2),
        tokens_per_second=2,
        second_per_grid_ts=np.array(c["seconds"] * 2),
    )
    B, T = pos.shape[1:]
    rng = np.random.RandomState(0)
    q, k = (rng.randn(B, T, 2, 16).astype(np.float32) for _ in range(2))
    rotary = Qwen2VLRotaryEmbedding(text_cfg)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))
        ref_q, ref_k = apply_rotary_pos_emb(
            torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2), cos, sin
        )
    rope = mrope_cos_sin(pos, rope_inv_freq(16, 10000.0, None), section)
    np.testing.assert_allclose(
        np.asarray(apply_rope(q, rope)), ref_q.transpose(1, 2).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(apply_rope(k, rope)), ref_k.transpose(1, 2).numpy(), atol=1e-5
    )
    with pytest.raises(ValueError, match="does not sum to 8"):
        mrope_cos_sin(pos, rope_inv_freq(16, 10000.0, None), [2, 2, 2])
