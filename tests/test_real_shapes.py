"""Real-size configs build abstractly with the expected parameter counts."""

import jax
import numpy as np
import pytest
from flax import nnx

from insightv_jax.config import MeshConfig, load_config
from insightv_jax.hf.configs import model_to_hf
from insightv_jax.models.factory import abstract_model
from insightv_jax.parallel import make_mesh


def test_llama3_8b_abstract_param_count_and_sharding(eight_devices):
    cfg = load_config("configs/models/llama3-8b.yaml")
    mesh = make_mesh(MeshConfig(1, 8, 1))
    _, state = abstract_model(cfg.model, mesh)
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    n = sum(int(np.prod(x.shape)) for x in leaves)
    assert n == 8_030_261_248  # Meta-Llama-3-8B
    q = state["layers"]["attn"]["q_proj"].get_value()
    assert q.shape == (32, 4096, 32, 128)
    assert q.sharding.shard_shape(q.shape) == (32, 512, 32, 128)


# Published sizes (the checkpoints' safetensors): Qwen2-VL-7B-Instruct,
# Qwen2.5-VL-3B-Instruct (embeddings tied), Qwen2.5-VL-7B-Instruct.
QWEN_VL = {
    "qwen2-vl-7b": ("Qwen2VLConfig", 8_291_375_616, 3584, 28, 4, 18944),
    "qwen2_5-vl-3b": ("Qwen2_5_VLConfig", 3_754_622_976, 2048, 16, 2, 11008),
    "qwen2_5-vl-7b": ("Qwen2_5_VLConfig", 8_292_166_656, 3584, 28, 4, 18944),
}


@pytest.mark.parametrize("name", list(QWEN_VL))
def test_qwen_vl_configs_match_hugging_face(name, eight_devices):
    """Each real Qwen-VL config validates, exports to the transformers config of
    its family with the published sizes, and builds (abstractly, sharded) to
    the published parameter count. (transformers' own model of each exported
    config, built on the meta device, counts the same: checked by hand, as
    importing its modelling code costs ~5 s.)"""
    from transformers import AutoConfig

    cls, count, width, heads, kv_heads, mlp = QWEN_VL[name]
    cfg = load_config(f"configs/models/{name}.yaml").model
    hf = AutoConfig.for_model(**model_to_hf(cfg))
    assert type(hf).__name__ == cls
    text, vision = hf.text_config, hf.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (
        width, heads, kv_heads,
    )  # fmt: skip
    assert text.intermediate_size == mlp and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    assert hf.tie_word_embeddings == (name == "qwen2_5-vl-3b")
    assert vision.depth == 32 and vision.num_heads == 16 and vision.patch_size == 14
    if cls == "Qwen2VLConfig":
        assert (vision.embed_dim, vision.mlp_ratio, vision.hidden_size) == (1280, 4, width)
    else:
        assert (vision.hidden_size, vision.intermediate_size, vision.out_hidden_size) == (
            1280, 3420, width,
        )  # fmt: skip
        assert vision.fullatt_block_indexes == [7, 15, 23, 31] and vision.window_size == 112

    _, state = abstract_model(cfg, make_mesh(MeshConfig(1, 8, 1)))
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    assert sum(int(np.prod(x.shape)) for x in leaves) == count
