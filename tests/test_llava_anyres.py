"""Anyres geometry: host token counts equal transformers' processor; the traced
(integer) version inside jit equals the host one on a sweep of image sizes."""

import functools
import types

import jax
import numpy as np
import pytest

from insightv_jax import vision_grid
from insightv_jax.config import LlavaConfig, ModelConfig, VisionConfig
from insightv_jax.models import anyres

REAL_PINS = tuple((336 * i, 336 * j) for i in range(1, 4) for j in range(1, 4))


def _cfg(tile, patch, pins):
    return ModelConfig(
        kind="llava_next",
        vision=VisionConfig(image_size=tile, patch_size=patch, hidden_size=32, num_heads=4),
        llava=LlavaConfig(image_grid_pinpoints=pins),
    )


CASES = {
    "tiny": _cfg(20, 10, ((20, 40), (40, 20), (40, 40), (20, 60), (60, 20))),
    "real": _cfg(336, 14, REAL_PINS),
}


def _sizes(seed=0, n=400):
    rs = np.random.RandomState(seed)
    sizes = np.exp(rs.uniform(0, np.log(4000), (n, 2))).astype(int) + 1
    extra = [(1, 1), (1, 4000), (4000, 1), (336, 336), (672, 336), (30, 90), (90, 30), (1000, 3)]
    return np.concatenate([sizes, np.array(extra)])


@pytest.mark.parametrize("case", list(CASES))
def test_host_counts_equal_transformers_processor(case):
    from transformers import LlavaNextProcessor
    from transformers.image_processing_utils import select_best_resolution

    cfg = CASES[case]
    t = cfg.vision.image_size
    ns = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(
            image_grid_pinpoints=[list(p) for p in cfg.llava.image_grid_pinpoints]
        ),
        patch_size=cfg.vision.patch_size,
        num_additional_image_tokens=0,
    )
    ns._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, ns)
    for h, w in _sizes():
        h, w = int(h), int(w)
        assert vision_grid.best_resolution(h, w, cfg.llava.image_grid_pinpoints) == tuple(
            select_best_resolution((h, w), ns.image_processor.image_grid_pinpoints)
        )
        ref = LlavaNextProcessor._get_number_of_features(ns, h, w, t, t)
        assert vision_grid.num_image_tokens((h, w), cfg) == ref, (h, w)


@pytest.mark.parametrize("case", list(CASES))
def test_traced_counts_equal_host(case):
    cfg = CASES[case]
    sizes = _sizes(1)
    _, counts = jax.jit(lambda s: anyres.feature_index(s, cfg, vision_grid.max_tiles(cfg)))(sizes)
    host = [vision_grid.num_image_tokens((int(h), int(w)), cfg) for h, w in sizes]
    np.testing.assert_array_equal(np.asarray(counts), host)
    assert max(host) <= vision_grid.max_image_tokens(cfg)


def test_presets_build_abstractly_with_expected_sizes():
    from flax import nnx

    from insightv_jax.config import load_config
    from insightv_jax.models.factory import construct

    def count(name):
        cfg = load_config(f"configs/models/{name}.yaml").model
        model = nnx.eval_shape(lambda: construct(cfg))
        return cfg, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    cfg, n = count("tiny")
    assert 0.4e6 < n < 0.6e6 and vision_grid.num_image_tokens((40, 40), cfg) == 16
    # Llama-3-8B + CLIP ViT-L/14-336 + projector + image_newline (llama3-llava-next-8b).
    cfg, n = count("llava-next-llama3-8b")
    assert n == 8_354_752_512 and vision_grid.max_tiles(cfg) == 10
    assert vision_grid.num_image_tokens((336, 336), cfg) == 576 + 24 * 25
