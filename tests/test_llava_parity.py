"""LLaVA / LLaVA-NeXT parity with transformers (fp32, tiny random models):
vision hidden states, projected image features, merged embeddings, logits."""

import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import (
    build_llava,
    llava_image_processor,
    llava_processor,
    random_images,
    save,
    token_row,
    torch_llava_logits,
)

from insightv_jax import vision_grid
from insightv_jax.hf.convert import import_hf
from insightv_jax.models.llava import to_sample_layout
from insightv_jax.parallel import single_device_mesh

ATOL = 1e-4
SIZES = [(40, 40), (30, 90), (90, 30)]  # square, wide, tall (height, width)


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    hf = build_llava("llava_next", "clip")
    model, cfg = import_hf(save(hf, tmp_path_factory.mktemp("next") / "m"), single_device_mesh())
    return hf, model, cfg


@pytest.fixture(scope="module")
def siglip_pair(tmp_path_factory):
    hf = build_llava("llava", "siglip", seed=1, layer=-1)
    model, cfg = import_hf(save(hf, tmp_path_factory.mktemp("sig") / "m"), single_device_mesh())
    return hf, model, cfg


@pytest.fixture(scope="module")
def batch(next_pair):
    """Sample 0: one square image; sample 1: a wide and a tall image; right-padded."""
    _, _, cfg = next_pair
    out = llava_image_processor()(random_images(SIZES), return_tensors="np")
    pv, sizes = out["pixel_values"], out["image_sizes"]
    n = [vision_grid.num_image_tokens(tuple(s), cfg) for s in sizes]
    length = n[1] + n[2] + 8
    rows = [token_row([n[0]], length), token_row([n[1], n[2]], length)]
    ids = np.array([r[0] for r in rows])
    mask = np.array([r[1] for r in rows])
    return ids, mask, pv, sizes


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_vision_hidden_states(which, next_pair, siglip_pair):
    hf, model, cfg = next_pair if which == "clip" else siglip_pair
    px = np.random.RandomState(0).randn(3, 3, 20, 20).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.vision_tower(torch.tensor(px), output_hidden_states=True).hidden_states
    assert len(ref) == cfg.vision.num_layers + 1
    for layer in (0, -2, -1):
        ours = nnx.jit(lambda m, x, k=layer: m.vision.hidden_state(x, k))(model, px)
        np.testing.assert_allclose(np.asarray(ours), ref[layer].numpy(), atol=ATOL, rtol=0)


def test_image_features_and_merged_embeddings(next_pair, batch):
    hf, model, cfg = next_pair
    ids, mask, pv, sizes = batch
    with torch.no_grad():
        ref_feats = hf.model.get_image_features(
            torch.tensor(pv), torch.tensor(sizes), return_dict=True
        ).pooler_output
        out = hf.model(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pv),
            image_sizes=torch.tensor(sizes),
            attention_mask=torch.tensor(mask),
            output_hidden_states=True,
        )
    spv, ssizes = to_sample_layout(ids, pv, sizes, cfg)
    feats, counts = nnx.jit(lambda m, p, s: m.image_features(p, s))(model, spv, ssizes)
    flat = [np.asarray(feats[b, i, : counts[b, i]]) for b, i in [(0, 0), (1, 0), (1, 1)]]
    assert [f.shape[0] for f in flat] == [r.shape[0] for r in ref_feats]
    for ours, ref in zip(flat, ref_feats):
        np.testing.assert_allclose(ours, ref.numpy(), atol=ATOL, rtol=0)
    # The projector alone, on the selected vision features of every tile.
    hidden = np.random.RandomState(4).randn(5, 4, 32).astype(np.float32)
    with torch.no_grad():
        ref_proj = hf.model.multi_modal_projector(torch.tensor(hidden)).numpy()
    np.testing.assert_allclose(np.asarray(model.projector(hidden)), ref_proj, atol=ATOL, rtol=0)
    # Merged input embeddings = the decoder's hidden state 0.
    embeds = np.asarray(nnx.jit(lambda m, *a: m.embed_inputs(*a))(model, ids, spv, ssizes))
    ref_embeds = out.hidden_states[0].numpy()
    np.testing.assert_allclose(embeds[mask == 1], ref_embeds[mask == 1], atol=ATOL, rtol=0)


def test_llava_next_logits_padded_batch_mixed_sizes(next_pair, batch):
    hf, model, _ = next_pair
    ids, mask, pv, sizes = batch
    ref = torch_llava_logits(hf, ids, pv, sizes, mask)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_llava_next_logits_single_image(size, next_pair):
    hf, model, cfg = next_pair
    out = llava_image_processor()(random_images([size], seed=3), return_tensors="np")
    n = vision_grid.num_image_tokens(size, cfg)
    ids = np.array([token_row([n], 30)[0]])  # one length: one compiled shape
    ref = torch_llava_logits(hf, ids, out["pixel_values"], out["image_sizes"])
    ours = np.asarray(
        model(input_ids=ids, pixel_values=out["pixel_values"], image_sizes=out["image_sizes"])
    )
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_llava_siglip_logits_two_images_per_sample(siglip_pair):
    hf, model, cfg = siglip_pair
    n = vision_grid.num_image_tokens((20, 20), cfg)
    assert n == 4  # SigLIP, strategy "full": every patch, no class token
    px = np.random.RandomState(1).randn(3, 3, 20, 20).astype(np.float32)
    length = 2 * n + 6
    rows = [token_row([n], length), token_row([n, n], length)]
    ids, mask = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    ref = torch_llava_logits(hf, ids, px, mask=mask)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, pixel_values=px))
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)


def test_text_only_rows_need_no_images(next_pair):
    hf, model, _ = next_pair
    ids = np.array([[5, 6, 7, 8, 9]])
    np.testing.assert_allclose(
        np.asarray(model(input_ids=ids)), torch_llava_logits(hf, ids), atol=ATOL, rtol=0
    )


def test_processor_outputs_by_name(next_pair, siglip_pair):
    """`model(**processor(images=..., text=..., return_tensors="np"))` with the
    transformers LlavaNextProcessor / LlavaProcessor equals transformers' logits;
    the call is keyword-only and a key the model does not take is a TypeError."""
    hf, model, _ = next_pair
    text = ["w5 <image> w6 w7", "w5 <image> w6 <image> w7 w8"]
    processor = llava_processor("llava_next")
    inputs = processor(
        images=random_images(SIZES, seed=6), text=text, padding=True, return_tensors="np"
    )
    assert sorted(inputs) == ["attention_mask", "image_sizes", "input_ids", "pixel_values"]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert not mask.all()  # right-padded
    ref = torch_llava_logits(hf, ids, inputs["pixel_values"], inputs["image_sizes"], mask)
    ours = np.asarray(model(**inputs))
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)
    with pytest.raises(TypeError):
        model(ids, inputs["pixel_values"], inputs["image_sizes"], mask)
    typed = processor(
        images=random_images(SIZES[:1]),
        text=text[:1],
        return_tensors="np",
        return_mm_token_type_ids=True,  # only on request: the model does not take it
    )
    with pytest.raises(TypeError, match="mm_token_type_ids"):
        model(**typed)

    hf, model, _ = siglip_pair
    inputs = llava_processor("llava", "full")(
        images=random_images([(20, 20)]), text=["w5 <image> w6 w7"], return_tensors="np"
    )
    assert sorted(inputs) == ["attention_mask", "input_ids", "pixel_values"]
    ref = torch_llava_logits(hf, inputs["input_ids"], inputs["pixel_values"])
    np.testing.assert_allclose(np.asarray(model(**inputs)), ref, atol=ATOL, rtol=0)
