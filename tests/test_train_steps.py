"""SFT step: chunked loss, sharded == single-device training, overfitting, NaN skip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from insightv_jax.config import MeshConfig
from insightv_jax.models.factory import init_model
from insightv_jax.parallel import make_mesh
from insightv_jax.train.losses import chunked_ce_sum, fused_ce_sum, shift_labels, token_mean_ce
from insightv_jax.train.optim import param_part, split_trainable
from insightv_jax.train.toy_data import ToySource, toy_batches, toy_run_config
from insightv_jax.train.trainer import Trainer, build_program, global_batch


def test_chunked_loss_matches_full_logits():
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 11, 8, 19
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    labels = jnp.asarray(np.where(rng.random((B, T)) < 0.6, rng.integers(0, V, (B, T)), -100))

    def ref(h, w):
        logits = h @ w
        t = shift_labels(labels)
        valid = t != -100
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, t, 0))
        return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.sum(valid)

    def chunked(h, w):
        return token_mean_ce(h, labels, lambda x: x @ w, chunk=4)  # 11 -> 3 chunks, padded

    np.testing.assert_allclose(chunked(hidden, head), ref(hidden, head), rtol=1e-6)
    g1 = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    g2 = jax.grad(ref, argnums=(0, 1))(hidden, head)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    total, count = chunked_ce_sum(hidden, shift_labels(labels), lambda x: x @ head, 4)
    assert count == np.sum(np.asarray(labels)[:, 1:] != -100)


def test_fused_loss_matches_chunked_loss_and_its_gradients():
    """The SFT loss (label tokens sorted first, gradients from the forward pass,
    chunks past the last label skipped) = the per-row chunked loss, value and
    gradients; also inside jit, scaled by a cotangent, and under an 8-device
    mesh where the tokens are grouped per batch shard."""
    rng = np.random.default_rng(1)
    B, T, D, V = 8, 13, 8, 23
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    labels = np.where(rng.random((B, T)) < 0.3, rng.integers(0, V, (B, T)), -100)
    labels[3] = -100  # a row without labels
    targets = shift_labels(jnp.asarray(labels))

    def ref(h, w):
        return 3.0 * chunked_ce_sum(h, targets, lambda x: x @ w, 5)[0]

    want, want_grads = jax.value_and_grad(ref, argnums=(0, 1))(hidden, head)
    for chunk in (1, 4, 7, 200):

        def fused(h, w, chunk=chunk):
            return 3.0 * fused_ce_sum(h, targets, w, chunk)[0]

        got, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, head)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for a, b in zip(grads, want_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert float(fused_ce_sum(hidden, targets, head, chunk)[1]) == np.sum(targets != -100)
    mesh = make_mesh(MeshConfig(2, 4, 1))
    with jax.set_mesh(mesh):
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        h8 = jax.device_put(hidden, spec)
        t8 = jax.device_put(targets, spec)

        def fused8(h, w):
            return 3.0 * fused_ce_sum(h, t8, w, 2)[0]

        got, grads = jax.jit(jax.value_and_grad(fused8, argnums=(0, 1)))(h8, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_param_parts_and_split():
    assert param_part(("vision_tower", "encoder", "w")) == "vision"
    assert param_part(("projector", "linear_1", "kernel")) == "projector"
    assert param_part(("layers", "attn", "q_proj")) == "llm"
    params = {"vision_tower": {"w": 1}, "projector": {"w": 2}, "embed": 3, "layers": {"w": 4}}
    trainable, frozen = split_trainable(params, ("projector", "llm"))
    assert frozen == {"vision_tower": {"w": 1}}
    assert trainable == {"projector": {"w": 2}, "embed": 3, "layers": {"w": 4}}


def _train_losses(cfg, mesh, steps, batches):
    program = build_program(cfg.model, cfg, mesh, steps)
    params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, mesh, 0), nnx.Param))
    state = program.init_state(params)
    losses = []
    for b in batches[:steps]:
        state, m = program(state, global_batch(b, program))
        losses.append(float(m["loss"]))
    return np.array(losses), state, program


def test_sharded_fsdp_tensor_equals_single_device(tmp_path, eight_devices):
    pytest.importorskip("grain")  # toy_batches; absent from a model-only install
    it = toy_batches(n=40, seq_len=16, vocab=64, global_batch=8)
    batches = [next(it) for _ in range(20)]
    single = toy_run_config(str(tmp_path), "train.micro_batches=1")
    sharded = toy_run_config(str(tmp_path), "train.micro_batches=2")  # + grad accumulation
    l1, _, _ = _train_losses(single, make_mesh(MeshConfig(1, 1, 1), eight_devices[:1]), 20, batches)
    l8, state, program = _train_losses(sharded, make_mesh(MeshConfig(1, 4, 2)), 20, batches)
    assert l1[-1] < l1[0] - 0.3  # it learns
    np.testing.assert_allclose(l8, l1, rtol=1e-4)
    # parameters and optimizer state are really sharded: (layers, D, F) split fsdp×tensor
    gate = state["params"]["layers"]["mlp"]["gate_proj"]
    assert gate.shape == (2, 32, 64)
    assert gate.addressable_shards[0].data.shape == (2, 8, 32)
    mu = state["opt"][1][0].mu["layers"]["mlp"]["gate_proj"]
    assert mu.addressable_shards[0].data.shape == (2, 8, 32)
    assert state["params"]["embed"].addressable_shards[0].data.shape == (32, 8)


def test_overfits_tiny_preset_on_32_samples(tmp_path):
    cfg = toy_run_config(
        str(tmp_path),
        "model.decoder.vocab_size=256",
        "model.decoder.hidden_size=128",
        "model.decoder.intermediate_size=384",
        "model.decoder.num_heads=4",
        "model.decoder.num_kv_heads=4",
        "train.global_batch=32",
        "train.lr=3e-3",
        "train.schedule=constant",
        "train.warmup_fraction=0.05",
        "train.loss_chunk=16",
    )
    src = ToySource(32, 16, 256, seed=3)
    batch = {k: np.stack([src[i][k] for i in range(32)]) for k in src[0]}
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    losses, _, _ = _train_losses(cfg, mesh, 120, [batch] * 120)
    assert losses[0] > 4.0
    assert losses[-1] < 0.05, losses[-10:]


class _Inject:
    """Batches from a toy iterator with out-of-range token ids (-> NaN) at one step."""

    def __init__(self, it, bad_step):
        self.it, self.bad, self.n = it, bad_step, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = dict(next(self.it))
        self.n += 1
        if self.n == self.bad:
            b["input_ids"] = b["input_ids"].copy()
            b["input_ids"][0, 2] = 10_000  # jnp.take fills NaN for out-of-range ids
        return b


def test_nan_batch_is_skipped_and_counted(tmp_path):
    for package in ("grain", "tensorboardX"):  # the Trainer's data and event files
        pytest.importorskip(package)
    bad_step = 3
    cfg = toy_run_config(str(tmp_path / "run"), "train.steps=5", "train.checkpoint_every=5")
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    norms = {}

    def on_step(step, metrics, batch, state):
        norms[step] = np.asarray(state["params"]["norm"]["weight"]).copy()

    trainer = Trainer(
        cfg, _Inject(toy_batches(), bad_step), mesh=mesh, measure_peak=False, on_step=on_step
    )
    result = trainer.run()
    trainer.close()
    assert result.skipped == 1
    assert np.isnan(result.losses[bad_step - 1])
    assert np.isfinite(np.delete(result.losses, bad_step - 1)).all()
    np.testing.assert_array_equal(norms[bad_step], norms[bad_step - 1])  # update skipped
    assert not np.array_equal(norms[bad_step + 1], norms[bad_step])
    # the checkpoint written after the bad step is finite and restores
    again = Trainer(cfg, toy_batches(), mesh=mesh, measure_peak=False)
    state = again.restore_latest()
    again.close()
    assert int(state["step"]) == 5 and int(state["skipped"]) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
