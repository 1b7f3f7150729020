"""The same forward with the state sharded over 8 fake devices equals the
unsharded one, and the parameters really are split across devices."""

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import build_decoder, save

from insightv_jax.config import MeshConfig
from insightv_jax.hf.convert import import_hf
from insightv_jax.parallel import logical_to_spec, make_mesh, single_device_mesh


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_unsharded(shape, tmp_path, eight_devices):
    src = save(build_decoder("qwen2_gqa2_untied"), tmp_path / "m")
    ids = np.random.RandomState(0).randint(0, 97, (4, 24))
    ref = np.asarray(import_hf(src, single_device_mesh())[0](ids))

    mesh = make_mesh(MeshConfig(*shape))
    model, _ = import_hf(src, mesh)
    graphdef, state = nnx.split(model)
    q = state["layers"]["attn"]["q_proj"][...]
    # (layers, embed, heads, head_dim): embed over fsdp, heads over tensor.
    assert q.sharding.shard_shape(q.shape) == (2, 64 // shape[1], 4 // shape[2], 16)
    gate = state["layers"]["mlp"]["gate_proj"][...]
    assert len({d for d in gate.sharding.device_set}) == 8

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    with jax.set_mesh(mesh):
        ids_sharded = jax.device_put(ids, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        out = forward(state, ids_sharded)
    # sharded matmuls sum in another order: fp32 rounding, relative to the logits' size
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_rules_fall_back_to_replication_on_odd_sizes(eight_devices):
    mesh = make_mesh(MeshConfig(1, 4, 2))
    assert logical_to_spec(("embed", "mlp"), (64, 96), mesh) == jax.P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (66, 97), mesh) == jax.P(None, None)
    assert logical_to_spec(("act_batch", None), (8, 3), mesh) == jax.P(("data", "fsdp"), None)


def test_mesh_errors(eight_devices):
    from insightv_jax.config import ConfigError

    with pytest.raises(ConfigError, match="needs 12 devices"):
        make_mesh(MeshConfig(3, 2, 2))
    with pytest.raises(ConfigError, match="at most one"):
        make_mesh(MeshConfig(-1, -1, 1))
    assert make_mesh(MeshConfig(2, -1, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
