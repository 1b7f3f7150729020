"""LLaVA checkpoints: HF -> ours -> HF round trip through the CLI, the original
LLaVA-NeXT repository format, load_pretrained, sharding, bad inputs."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import (
    PINPOINTS,
    build_llava,
    llava_image_processor,
    llava_processor,
    random_images,
    save,
    token_row,
    torch_llava_logits,
)
from safetensors.numpy import load_file, save_file

from insightv_jax import cli, vision_grid
from insightv_jax.config import MeshConfig
from insightv_jax.errors import DataError
from insightv_jax.hf.convert import import_hf
from insightv_jax.models.llava import to_sample_layout
from insightv_jax.parallel import make_mesh, single_device_mesh


@pytest.fixture(scope="module")
def hf_next(tmp_path_factory):
    hf = build_llava("llava_next", "clip", seed=2)
    folder = save(hf, tmp_path_factory.mktemp("next") / "m")
    llava_image_processor().save_pretrained(str(folder))
    return hf, folder


@pytest.fixture(scope="module")
def inputs(hf_next):
    out = llava_image_processor()(random_images([(40, 40), (30, 90)], seed=5), return_tensors="np")
    pv, sizes = out["pixel_values"], out["image_sizes"]
    from insightv_jax.hf.configs import llava_from_hf

    cfg = llava_from_hf(json.loads((hf_next[1] / "config.json").read_text()))
    n = [vision_grid.num_image_tokens(tuple(s), cfg) for s in sizes]
    rows = [token_row([n[0]], 40), token_row([n[1]], 40)]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), pv, sizes


def _keys(folder):
    return {k: v.shape for k, v in load_file(str(folder / "model.safetensors")).items()}


@pytest.mark.parametrize("kind", ["llava_next", "llava"])
def test_roundtrip_through_cli(kind, hf_next, inputs, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ids, mask, pv, sizes = inputs
    if kind == "llava_next":
        hf, src = hf_next
    else:
        hf = build_llava("llava", "clip", seed=3)
        src = save(hf, tmp_path / "src")
        pv, sizes = pv[:, 0], None
        ids = np.array([token_row([4], 12)[0], token_row([4], 12)[0]])
        mask = None
    assert cli.main(["convert", "hf2jax", "--src", str(src), "--out", str(tmp_path / "ck")]) == 0
    reference = llava_processor(kind)
    reference.tokenizer.save_pretrained(str(tmp_path / "ck" / "tokenizer"))
    assert (
        cli.main(
            ["convert", "jax2hf", "--src", str(tmp_path / "ck"), "--out", str(tmp_path / "back")]
        )
        == 0
    )
    back = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "back")).eval()
    assert type(back).__name__ == type(hf).__name__
    ref = torch_llava_logits(hf, ids, pv, sizes, mask)
    np.testing.assert_allclose(
        torch_llava_logits(back, ids, pv, sizes, mask), ref, atol=1e-5, rtol=0
    )
    assert _keys(tmp_path / "back") == _keys(src)

    # AutoProcessor reads the export's processor_config.json (patch size, CLS
    # token, anyres grids) into the processor these models were built for
    processor = AutoProcessor.from_pretrained(str(tmp_path / "back"))
    assert type(processor) is type(reference)
    images = random_images([(40, 40), (30, 90)], seed=5)
    text = "w5 <image> w6 <image> w7"
    got, want = (p(images=images, text=text, return_tensors="np") for p in (processor, reference))
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-6, rtol=0)


def test_load_pretrained_returns_processor(hf_next, inputs, tmp_path):
    from insightv_jax.hf import load_pretrained

    hf, src = hf_next
    ids, mask, pv, sizes = inputs
    model, tok, proc, cfg = load_pretrained(src)
    assert cfg.kind == "llava_next" and tok is None
    images = random_images([(40, 40), (30, 90)], seed=5)
    np.testing.assert_allclose(proc(images)["pixel_values"], pv, atol=1e-6)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes))
    ref = torch_llava_logits(hf, ids, pv, sizes, mask)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


def _to_original(src, dst):
    """Rewrite a hub-layout LLaVA-NeXT folder in the LLaVA-NeXT repository layout."""
    renames = [
        ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("image_newline", "model.image_newline"),
    ]
    out = {}
    for key, value in load_file(str(src / "model.safetensors")).items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    hf_cfg = json.loads((src / "config.json").read_text())
    cfg = dict(hf_cfg["text_config"])
    cfg.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower="tiny-clip-vit-20",
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[w, h] for h, w in PINPOINTS],  # (width, height) there
        image_token_index=hf_cfg["image_token_index"],
        vision_config={"num_attention_heads": 4},
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_original_llava_next_format(hf_next, inputs, tmp_path):
    from insightv_jax.hf.configs import parse_pinpoints

    hf, src = hf_next
    ids, mask, pv, sizes = inputs
    model, cfg = import_hf(_to_original(src, tmp_path / "orig"), single_device_mesh())
    assert cfg.kind == "llava_next" and cfg.llava.feature_layer == -2
    assert cfg.llava.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
    assert cfg.vision.num_layers == 2 and cfg.vision.image_size == 20
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes))
    ref = torch_llava_logits(hf, ids, pv, sizes, mask)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)
    grids = parse_pinpoints("(1x1),...,(3x3)", 336)
    assert len(grids) == 9 and grids[0] == (336, 336) and grids[-1] == (1008, 1008)


def test_sharded_forward_equals_unsharded(hf_next, inputs, eight_devices):
    hf, src = hf_next
    ids, mask, pv, sizes = inputs
    ref_model, cfg = import_hf(src, single_device_mesh())
    spv, ssizes = to_sample_layout(ids, pv, sizes, cfg)
    ids4, mask4 = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])
    spv4, ssizes4 = np.concatenate([spv, spv[::-1]]), np.concatenate([ssizes, ssizes[::-1]])

    def fwd(state, graphdef, *a):
        model = nnx.merge(graphdef, state)
        return model.logits(model.hidden_states(a[0], a[1], None, a[2], a[3]))

    graphdef, state = nnx.split(ref_model)
    ref = jax.jit(fwd, static_argnums=1)(state, graphdef, ids4, mask4, spv4, ssizes4)

    mesh = make_mesh(MeshConfig(2, 2, 2))
    model, _ = import_hf(src, mesh)
    graphdef, state = nnx.split(model)
    q = state["vision"]["layers"]["attn"]["q_proj"][...]  # (layers, 32, 4 heads, 8)
    assert q.sharding.shard_shape(q.shape) == (2, 16, 2, 8)
    with jax.set_mesh(mesh):
        batch = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
        args = [jax.device_put(x, batch) for x in (ids4, mask4, spv4, ssizes4)]
        out = jax.jit(fwd, static_argnums=1)(state, graphdef, *args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_image_token_mismatch_names_the_sample(hf_next, inputs):
    _, src = hf_next
    ids, mask, pv, sizes = inputs
    model, cfg = import_hf(src, single_device_mesh())
    more = ids.copy()
    more[1, -1] = cfg.llava.image_token_id
    with pytest.raises(DataError, match="sample 1: .* image tokens") as e:
        model(input_ids=more, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    assert "\n" not in str(e.value)
    fewer = ids.copy()
    fewer[0, np.flatnonzero(ids[0] == cfg.llava.image_token_id)[0]] = 5
    with pytest.raises(DataError, match="sample 0: "):
        model(input_ids=fewer, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    with pytest.raises(DataError, match="sample 0: image tokens in input_ids but no pixel_values"):
        model(input_ids=ids)
    from insightv_jax.models.llava import check_image_tokens

    spv, ssizes = to_sample_layout(ids, pv, sizes, cfg)
    with pytest.raises(DataError, match="sample 1: .* need"):
        check_image_tokens(more, ssizes, cfg)


def test_a_bf16_checkpoint_imports_as_bf16():
    """transformers writes the model's dtype at the top of a LLaVA config.json and
    leaves `text_config.dtype` null: the import reads the top one."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from insightv_jax.hf.configs import llava_from_hf

    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=300)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, image_size=30, patch_size=10)  # fmt: skip
    d = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                    dtype="bfloat16").to_dict()  # fmt: skip
    assert d["text_config"].get("dtype") is None  # the layout this test is about
    assert llava_from_hf(d).decoder.param_dtype == "bfloat16"
