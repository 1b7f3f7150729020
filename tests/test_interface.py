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
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve("flash", "gpu")
