"""Our decoder vs transformers' Llama / Qwen2 on tiny random models (fp32)."""

import numpy as np
import pytest
from hf_models import DECODER_CASES, build_decoder, save, torch_logits

from insightv_jax.hf.convert import import_hf
from insightv_jax.parallel import single_device_mesh

TOL = 1e-4


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, 97, (2, 33))


@pytest.mark.parametrize("case", sorted(DECODER_CASES))
def test_logits_match_transformers(case, tmp_path, ids):
    hf = build_decoder(case)
    ours, _ = import_hf(save(hf, tmp_path / case), single_device_mesh())
    ref = torch_logits(hf, ids)
    out = np.asarray(ours(ids))
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero tensors
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_padded_batch_matches_transformers(tmp_path):
    """Right-padded rows: logits on real tokens equal the unpadded ones."""
    hf = build_decoder("qwen2_gqa2_untied")
    ours, _ = import_hf(save(hf, tmp_path / "m"), single_device_mesh())
    ids = np.random.RandomState(1).randint(0, 97, (2, 20))
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    ref = torch_logits(hf, ids, mask)
    out = np.asarray(ours(input_ids=ids, attention_mask=mask))  # by name, as a tokenizer's
    np.testing.assert_allclose(out[0], ref[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1, :12], ref[1, :12], atol=TOL, rtol=0)
    alone = np.asarray(ours(ids[1:, :12]))
    np.testing.assert_allclose(out[1, :12], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama_gqa4_odd_rope", "qwen2_gqa4_tied_odd"])
def test_per_layer_parity(case, tmp_path, ids):
    """Embedding output, each decoder block's output and the final norm."""
    import torch

    hf = build_decoder(case, layers=3)
    ours, _ = import_hf(save(hf, tmp_path / case), single_device_mesh())
    captured = {}

    def hook(name):
        def fn(_module, _inputs, output):
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach().numpy()

        return fn

    hf.model.embed_tokens.register_forward_hook(hook("embed"))
    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_hook(hook(f"layer{i}"))
    hf.model.norm.register_forward_hook(hook("norm"))
    with torch.no_grad():
        hf(torch.tensor(ids))

    emb = np.asarray(ours.embed_tokens(ids))
    np.testing.assert_allclose(emb, captured["embed"], atol=TOL, rtol=0)
    normed, per_layer = ours.hidden_and_layer_outputs(ours.embed_tokens(ids))
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(per_layer[i]), captured[f"layer{i}"], atol=TOL, rtol=0
        )
    np.testing.assert_allclose(np.asarray(normed), captured["norm"], atol=TOL, rtol=0)
