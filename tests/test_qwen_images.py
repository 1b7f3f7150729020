"""QwenImageProcessor against transformers' Qwen2VLImageProcessorPil."""

import json

import numpy as np
import pytest
from PIL import Image

from insightv_jax.data.qwen_images import QwenImageProcessor, smart_resize
from insightv_jax.errors import DataError

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
Reference = hf_pil.Qwen2VLImageProcessorPil


def photo(h, w, seed=0, mode="RGB"):
    """A smooth random picture: upsampled noise plus gradients."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 4), dtype=np.uint8)
    img = Image.fromarray(small, "RGBA").resize((w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int32)
    arr[..., 0] = (arr[..., 0] + np.linspace(0, 60, w)[None, :]).astype(np.int32)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    if mode == "RGBA":
        arr[..., 3] = rng.integers(0, 256, (h, w), dtype=np.uint8)
        return Image.fromarray(arr, "RGBA")
    rgb = Image.fromarray(arr[..., :3], "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def check(images, **kw):
    ours = QwenImageProcessor(**kw)(images)
    ref = Reference(**kw)(images, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["image_grid_thw"].dtype == np.int64
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
    return ours


def test_photograph_matches_reference():
    out = check([photo(480, 640)])
    grid = out["image_grid_thw"][0]
    assert grid[0] == 1 and out["pixel_values"].shape == (grid.prod(), 3 * 2 * 14 * 14)


@pytest.mark.parametrize("size", [(37, 251), (1000, 33)])
def test_odd_sizes(size):
    check([photo(*size, seed=1)])


def test_min_pixels():
    out = check([photo(20, 20, seed=2)])
    assert out["image_grid_thw"][0].tolist() == [1, 4, 4]  # 56x56


def test_max_pixels():
    max_px = 28 * 28 * 64
    out = check([photo(2000, 3000, seed=3)], max_pixels=max_px, min_pixels=28 * 28)
    _, gh, gw = out["image_grid_thw"][0]
    assert gh * gw * 14 * 14 <= max_px


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_modes(mode):
    check([photo(90, 130, seed=4, mode=mode)])


def test_two_images_one_call():
    out = check([photo(200, 300, seed=5), photo(123, 77, seed=6)])
    assert out["image_grid_thw"].shape == (2, 3)


def test_paths(tmp_path):
    path = tmp_path / "a.png"
    photo(64, 96, seed=7).save(path)
    ours = QwenImageProcessor()([str(path)])
    ref = Reference()([Image.open(path)], return_tensors="np")
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)


def test_patch_order_is_merge_units():
    """Rows 0..3 are one 2x2 merge unit; each row is (C, T, 14, 14) with T copies."""
    img = photo(56, 84, seed=8)
    proc = QwenImageProcessor()
    pv = proc([img])["pixel_values"].reshape(-1, 3, 2, 14, 14)
    np.testing.assert_array_equal(pv[:, :, 0], pv[:, :, 1])
    x = np.asarray(img, np.float64) / 255
    x = ((x - np.array(proc.image_mean)) / np.array(proc.image_std)).transpose(2, 0, 1)
    np.testing.assert_allclose(pv[1, :, 0], x[:, 0:14, 14:28], atol=1e-5)  # unit 0, top right
    np.testing.assert_allclose(pv[2, :, 0], x[:, 14:28, 0:14], atol=1e-5)  # unit 0, bottom left
    np.testing.assert_allclose(pv[4, :, 0], x[:, 0:14, 28:42], atol=1e-5)  # unit 1, top left


def test_smart_resize_grid():
    sizes = [1, 2, 13, 14, 27, 28, 29, 41, 42, 56, 70, 97, 333, 1000, 2801]
    bounds = [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 16), (3136, 12845056)]
    for lo, hi in bounds:
        for h in sizes:
            for w in sizes:
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(ValueError):
                        smart_resize(h, w, min_pixels=lo, max_pixels=hi)
                    continue
                want = hf_pil.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                assert smart_resize(h, w, 28, lo, hi) == tuple(want), (h, w, lo, hi)
    assert smart_resize(300, 500, factor=32) == tuple(hf_pil.smart_resize(300, 500, factor=32))


def test_round_trip(tmp_path):
    proc = QwenImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 100)
    proc.save_pretrained(tmp_path)
    ref = Reference.from_pretrained(str(tmp_path))
    assert (ref.size["shortest_edge"], ref.size["longest_edge"]) == (
        proc.min_pixels,
        proc.max_pixels,
    )
    assert QwenImageProcessor.from_pretrained(tmp_path) == proc
    img = photo(500, 700, seed=9)
    np.testing.assert_allclose(
        proc([img])["pixel_values"],
        ref([img], return_tensors="np")["pixel_values"],
        atol=1e-5,
        rtol=0,
    )
    # the reference's own file, and an older Qwen2-VL style one, read back
    Reference(min_pixels=5000, max_pixels=90000).save_pretrained(str(tmp_path / "hf"))
    back = QwenImageProcessor.from_pretrained(tmp_path / "hf")
    assert (back.min_pixels, back.max_pixels) == (5000, 90000)
    old = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(old))
    back = QwenImageProcessor.from_pretrained(tmp_path / "old")
    assert (back.min_pixels, back.max_pixels) == (3136, 12845056)


def test_bad_files(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(DataError, match="nope.jpg: image file not found") as e:
        QwenImageProcessor()([str(missing)])
    assert "\n" not in str(e.value)
    corrupt = tmp_path / "bad.png"
    buf = tmp_path / "good.png"
    photo(64, 64).save(buf)
    corrupt.write_bytes(buf.read_bytes()[:100])
    with pytest.raises(DataError, match="bad.png: unreadable image") as e:
        QwenImageProcessor()([str(corrupt)])
    assert "\n" not in str(e.value)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.jpg: unreadable image") as e:
        QwenImageProcessor()([str(tmp_path / "junk.jpg")])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="cannot resize"):
        QwenImageProcessor()([Image.new("RGB", (1000, 3))])


def test_video_frames_into_temporal_patches():
    """A still image is a video of its frame repeated along time: the same
    patches and grid. An odd frame count repeats the last frame; frames of
    different sizes are refused. (transformers' video processor needs
    torchvision, which cannot run here: no reference for videos.)"""
    bounds = dict(min_pixels=56 * 56, max_pixels=224 * 224)
    proc = QwenImageProcessor(**bounds, video_min_pixels=56 * 56, video_max_pixels=224 * 224)
    frames = [photo(120, 200, seed=s) for s in range(3)]
    still = proc.video([frames[0], frames[0]], fps=2.0)
    image = proc([frames[0]])
    np.testing.assert_array_equal(still["pixel_values_videos"], image["pixel_values"])
    np.testing.assert_array_equal(still["video_grid_thw"], image["image_grid_thw"])
    assert still["second_per_grid_ts"].tolist() == [1.0]

    three = proc.video(frames, fps=4.0)
    t, h, w = three["video_grid_thw"][0]
    assert (t, three["second_per_grid_ts"][0]) == (2, 0.5)
    last = proc.video([frames[2], frames[2]])["pixel_values_videos"]
    np.testing.assert_array_equal(three["pixel_values_videos"][h * w :], last)
    with pytest.raises(DataError, match="frames of different sizes") as e:
        proc.video([frames[0], photo(64, 64)], name="clip.mp4")
    assert "clip.mp4" in str(e.value) and "\n" not in str(e.value)
