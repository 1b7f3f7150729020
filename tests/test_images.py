"""Our preprocessing equals transformers' LlavaNextImageProcessorPil; bad images
fail with one line naming the sample."""

import numpy as np
import pytest
from hf_models import PINPOINTS, TILE, llava_image_processor, random_images
from PIL import Image

from insightv_jax.data.images import ImageProcessor, load_image, pack_samples
from insightv_jax.errors import DataError

SIZES = [(40, 40), (30, 90), (90, 30), (57, 23), (1, 33), (50, 1), (123, 77)]


@pytest.fixture(scope="module")
def ours():
    return ImageProcessor(
        shortest_edge=TILE, crop_size=(TILE, TILE), pinpoints=tuple(map(tuple, PINPOINTS))
    )


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_matches_transformers(mode, ours):
    images = random_images(SIZES, seed=7, mode=mode)
    ref = llava_image_processor()(images, return_tensors="np")
    got = ours(images)
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["image_sizes"], ref["image_sizes"])


def test_real_size_tiles_match(tmp_path):
    """336-px tiles, 1x1..3x3 grids, an image read back from a JPEG file."""
    from transformers import LlavaNextImageProcessorPil

    pins = [[336 * i, 336 * j] for i in range(1, 4) for j in range(1, 4)]
    ref_proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=pins,
    )
    path = tmp_path / "x.jpg"
    random_images([(500, 700)], seed=2)[0].save(path)
    ref = ref_proc([Image.open(path)], return_tensors="np")
    got = ImageProcessor(pinpoints=tuple(map(tuple, pins)))([path])
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["image_sizes"], ref["image_sizes"])


def test_config_file_roundtrip_loads_in_transformers(tmp_path, ours):
    from transformers import LlavaNextImageProcessorPil

    ours.save_pretrained(tmp_path)
    assert ImageProcessor.from_pretrained(tmp_path) == ours
    hf = LlavaNextImageProcessorPil.from_pretrained(str(tmp_path))
    images = random_images([(45, 70)], seed=1)
    np.testing.assert_allclose(
        ours(images)["pixel_values"], hf(images, return_tensors="np")["pixel_values"], atol=1e-5
    )


def test_pack_samples_per_sample_layout(ours):
    from insightv_jax.config import LlavaConfig, ModelConfig, VisionConfig

    cfg = ModelConfig(
        kind="llava_next",
        vision=VisionConfig(image_size=TILE, patch_size=10, hidden_size=32, num_heads=4),
        llava=LlavaConfig(image_grid_pinpoints=tuple(map(tuple, PINPOINTS)), images_per_sample=2),
    )
    imgs = random_images([(40, 40), (30, 90), (90, 30)])
    pv, sizes = pack_samples([[(imgs[0], "a")], [(imgs[1], "b"), (imgs[2], "c")]], ours, cfg)
    assert pv.shape == (2, 2, 5, 3, TILE, TILE) and sizes.tolist()[0][1] == [0, 0]
    ref = ours(imgs)["pixel_values"]
    np.testing.assert_array_equal(pv[1, 1, :4], ref[2, :4])


def test_bad_images_name_the_sample(tmp_path, ours):
    path = tmp_path / "cut.png"
    random_images([(60, 60)])[0].save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        DataError, match=r"sample 3 \(cut.png\): unreadable image \(image file is truncated"
    ) as e:
        load_image(path, f"sample 3 ({path.name})")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="sample 1: image has zero size"):
        ours([Image.new("RGB", (0, 5))], names=["sample 1"])
    with pytest.raises(DataError, match="sample 2: unreadable image"):
        load_image(b"not an image", "sample 2")
