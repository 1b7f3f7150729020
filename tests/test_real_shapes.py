"""Real-size configs build abstractly with the expected parameter counts."""

import jax
import numpy as np
from flax import nnx

from insightv_jax.config import MeshConfig, load_config
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
