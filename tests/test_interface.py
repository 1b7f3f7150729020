"""The top-level models and their decode forms provide the interface that
train/ and sample/ program against; kernel choices are resolved per platform
where a model is built."""

import pytest

from insightv_jax.config import load_config
from insightv_jax.models import attention
from insightv_jax.models.factory import construct
from insightv_jax.models.interface import CausalLM
from insightv_jax.sample.decode_transform import for_decoding


@pytest.mark.parametrize("preset", ["tiny-lm", "tiny"])
def test_models_and_their_decode_forms_are_causal_lms(preset):
    model = construct(load_config(f"configs/models/{preset}.yaml").model, seed=0)
    assert isinstance(model, CausalLM)
    for fuse in (False, True):
        form = for_decoding(model, fuse=fuse, pack=False)
        assert isinstance(form, CausalLM) and type(form) is not type(model)
        assert for_decoding(form) is form  # already a decode form


def test_attention_backend_resolves_per_platform():
    assert attention.resolve("xla", "cpu") == "xla_grouped"
    assert attention.resolve("xla", "gpu") == "xla_dot_product"
    assert attention.resolve("blockwise", "tpu") == "blockwise"
    assert attention.resolve("splash", "tpu") == "splash"
    assert attention.resolve("cudnn", "gpu", "bfloat16") == "cudnn"
    # auto: splash on TPU, cuDNN on GPU in half precision, else xla
    assert attention.resolve("auto", "tpu", "float32") == "splash"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float32") == "xla_dot_product"
    assert attention.resolve("auto", "cpu", "bfloat16") == "xla_grouped"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve("flash", "gpu")


def test_construct_resolves_auto_once_from_platform_and_dtype():
    """`auto` becomes a concrete kernel where the model is built: the decoder's
    from its compute dtype, the vision tower's from its own."""
    import dataclasses

    cfg = load_config("configs/models/tiny.yaml").model
    half = dataclasses.replace(cfg.decoder, attention="auto", dtype="bfloat16")
    cfg = dataclasses.replace(
        cfg, decoder=half, vision=dataclasses.replace(cfg.vision, attention="auto")
    )
    model = construct(cfg, platform="gpu")
    assert model.decoder.layers.attn.attention_impl == "cudnn"
    assert model.vision.layers.attn.attention_impl == "xla_dot_product"  # fp32 tower
    tpu = construct(cfg, platform="tpu")
    assert tpu.decoder.layers.attn.attention_impl == "splash"
    assert tpu.vision.layers.attn.attention_impl == "splash"
