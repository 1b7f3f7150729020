"""Greedy generation with images equals transformers' LLaVA-NeXT `generate`."""

import numpy as np
import torch
from hf_models import (
    IMAGE_TOKEN,
    build_llava,
    hf_greedy,
    llava_image_processor,
    random_images,
    save,
)

from insightv_jax import vision_grid
from insightv_jax.hf.convert import import_hf
from insightv_jax.models.llava import to_sample_layout
from insightv_jax.parallel import single_device_mesh
from insightv_jax.sample.sampler import Sampler, SamplingParams

NEW = 10


def test_greedy_with_images_matches_transformers(tmp_path):
    hf = build_llava("llava_next", "clip", seed=3)
    model, cfg = import_hf(save(hf, tmp_path / "m"), single_device_mesh())
    sizes_hw = [(40, 40), (30, 90)]
    proc = llava_image_processor()(random_images(sizes_hw, seed=4), return_tensors="np")
    rows = []
    for k, size in enumerate(proc["image_sizes"]):
        n = vision_grid.num_image_tokens(tuple(size), cfg)
        rows.append([7 + k, 11] + [IMAGE_TOKEN] * n + [12 + k] * (1 + 3 * k))  # different lengths
    ours_pv = [
        to_sample_layout(
            np.array([r]), proc["pixel_values"][k : k + 1], proc["image_sizes"][k : k + 1], cfg
        )
        for k, r in enumerate(rows)
    ]
    pv = np.concatenate([p[0] for p in ours_pv])
    sizes = np.concatenate([p[1] for p in ours_pv])
    res = Sampler(model, pad_id=0).generate(rows, SamplingParams(max_new_tokens=NEW), pv, sizes)
    cuts = 0
    for k, r in enumerate(rows):
        ref, cut = hf_greedy(
            hf,
            r,
            NEW,
            stop_cut_at=IMAGE_TOKEN,
            pixel_values=torch.tensor(proc["pixel_values"][k : k + 1]),
            image_sizes=torch.tensor(proc["image_sizes"][k : k + 1]),
        )
        cuts += cut < NEW
        assert res[k]["tokens"][: cut - 1] == ref[: cut - 1], (k, res[k]["tokens"], ref)
    assert cuts <= 1
