"""Mixed precision: with bf16 compute the softmaxes, norms and losses of the SFT,
DPO and RL steps run in fp32; bf16 parameters with an fp32 master copy
(`train.master_weights`) track fp32 training while plain bf16 parameters drift;
the master copy (of the trainable parameters below fp32 only) is sharded like
its parameters and a checkpoint restores it bit-identically."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from insightv_jax.checkpoint import CheckpointMismatch
from insightv_jax.config import MeshConfig
from insightv_jax.models.attention import attention
from insightv_jax.models.factory import abstract_model
from insightv_jax.parallel import make_mesh
from insightv_jax.train.dpo import DPOProgram
from insightv_jax.train.optim import merge
from insightv_jax.train.rl import RLProgram
from insightv_jax.train.steps import SFTProgram
from insightv_jax.train.toy_data import ToySource, toy_batches, toy_run_config
from insightv_jax.train.trainer import Trainer, build_program, global_batch

BF16 = ("model.decoder.param_dtype=bfloat16", "model.decoder.dtype=bfloat16")
MASTER = (*BF16, "train.master_weights=true")
# Transcendentals whose bf16 rounding would reach the loss: softmax (exp), its
# normaliser and the log-probs (log, log1p), RMSNorm (rsqrt).
FP32_ONLY = ("exp", "log", "log1p", "rsqrt")


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scan, cond, remat,
    custom_vjp, pjit bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _fp32_only_ops(fn, *args) -> dict[str, int]:
    """How many FP32_ONLY operations `fn(*args)` traces; fails on one given bf16."""
    seen: dict[str, int] = {}
    for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
        name = eqn.primitive.name
        if name in FP32_ONLY:
            dtypes = [str(v.aval.dtype) for v in eqn.invars]
            assert dtypes == ["float32"], f"{name} on {dtypes}"
            seen[name] = seen.get(name, 0) + 1
    return seen


def _pairs(batch: dict) -> dict:
    """DPO's layout from 2B rows: (B, 2, ...) chosen/rejected, with reference log-probs."""
    out = {k: v.reshape(v.shape[0] // 2, 2, *v.shape[1:]) for k, v in batch.items()}
    return {**out, "ref_logps": np.zeros((batch["input_ids"].shape[0] // 2, 2), np.float32)}


def _rl(batch: dict) -> dict:
    B, T = batch["input_ids"].shape
    logps = np.full((B, T), -1.0, np.float32)
    adv = np.linspace(-1, 1, B).astype(np.float32)
    return {**batch, "old_logps": logps, "ref_logps": logps, "advantages": adv}


@pytest.mark.parametrize("kernel", ["xla", "blockwise"])
def test_bf16_steps_keep_softmax_norms_and_losses_in_fp32(tmp_path, eight_devices, kernel):
    """The gradient programs of the SFT, DPO and RL steps of a bf16 decoder (both
    training attention kernels) take every exp, log and rsqrt in fp32."""
    mesh = make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    src = ToySource(8, 16, 64, seed=0)
    rows = {k: np.stack([src[i][k] for i in range(8)]) for k in src[0]}
    cases = ((SFTProgram, rows), (DPOProgram, _pairs(rows)), (RLProgram, _rl(rows)))
    for cls, batch in cases:
        cfg = toy_run_config(
            str(tmp_path), *MASTER, f"model.decoder.attention={kernel}",
            "model.decoder.attention_block_size=8", "rl.beta=0.1",
        )  # fmt: skip
        extra = {DPOProgram: {"dpo": cfg.dpo}, RLProgram: {"rl": cfg.rl}}.get(cls, {})
        program = build_program(cfg.model, cfg, mesh, 10, functools.partial(cls, **extra))
        state = program.abstract_state
        assert jax.tree.leaves(state["params"])[0].dtype == jnp.bfloat16
        totals = program._totals(batch)

        def loss(p, program=program, batch=batch, totals=totals, frozen=state["frozen"]):
            return program._micro_loss(p, frozen, batch, totals)[0]

        seen = _fp32_only_ops(jax.value_and_grad(loss), state["params"])
        assert {"exp", "log", "rsqrt"} <= set(seen), (cls.__name__, seen)


def test_bf16_attention_softmax_and_logits_in_fp32(eight_devices):
    """Every attention implementation (`jax.nn.dot_product_attention`, the GPU
    path, included) takes its softmax in fp32 on bf16 inputs, forward and
    backward; decoder logits are the fp32 product of the bf16 operands, not a
    bf16 product widened (which is off by up to 2^-9 of a logit)."""
    q = jnp.ones((2, 8, 4, 16), jnp.bfloat16)
    kv = jnp.ones((2, 8, 2, 16), jnp.bfloat16)
    pos, valid = jnp.broadcast_to(jnp.arange(8), (2, 8)), jnp.ones((2, 8), bool)
    for backend in ("xla_dot_product", "xla_grouped", "blockwise"):

        def total(q, backend=backend):
            return attention(q, kv, kv, pos, pos, valid, backend=backend, block_size=4).sum()

        seen = _fp32_only_ops(jax.grad(total), q)
        assert "exp" in seen, (backend, seen)

    # a bf16 decoder with N(0, 1) weights (logits ~ 20), built without compiling an init
    mesh = make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    graphdef, abstract = abstract_model(toy_run_config("unused", *BF16).model, mesh)
    rng = np.random.default_rng(0)
    weights = nnx.to_pure_dict(abstract)
    weights = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), weights)
    nnx.replace_by_pure_dict(abstract, weights)
    model = nnx.merge(graphdef, abstract)
    hidden = rng.standard_normal((2, 8, 32)).astype(jnp.bfloat16)
    want = hidden.astype(np.float32) @ weights["lm_head"].astype(np.float32)  # exact products
    got = np.asarray(model.logits(jnp.asarray(hidden)))
    assert got.dtype == np.float32 and np.abs(want).max() > 16
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_master_copy_covers_trainable_params_below_fp32_only(eight_devices):
    """The tiny LLaVA with a bf16 decoder (the projector follows it), on 8 devices:
    the master copy holds fp32 twins of exactly the trainable bf16 leaves, each
    sharded like its parameter; a frozen bf16 tower and a trainable fp32 tower get
    none (AdamW's moments of the latter are fp32 as they are)."""
    from insightv_jax.config import load_config

    mesh = make_mesh(MeshConfig(1, 4, 2))
    tiny = str(Path(__file__).resolve().parent.parent / "configs/models/tiny.yaml")
    for vision_dtype, trainable in (
        ("bfloat16", "[projector,llm]"),
        ("float32", "[vision,projector,llm]"),
    ):
        cfg = load_config(tiny, [
            "model.decoder.param_dtype=bfloat16", f"model.vision.param_dtype={vision_dtype}",
            "train.master_weights=true", f"train.trainable={trainable}",
        ])  # fmt: skip
        program = build_program(cfg.model, cfg, mesh, 10)
        state = program.abstract_state
        params = {tuple(str(k.key) for k in p): a for p, a in _flat(state["params"])}
        master = {tuple(str(k.key) for k in p): a for p, a in _flat(state["master"])}
        want = {p for p, a in params.items() if a.dtype == jnp.bfloat16}
        assert set(master) == want and any(p[0] == "projector" for p in want)
        tower = [a for p, a in params.items() if p[0] == "vision"]  # trainable fp32 or frozen
        assert all(a.dtype == jnp.float32 for a in tower) and bool(tower) == ("vision" in trainable)
        assert all(a.dtype == jnp.float32 for a in master.values())
        assert all(a.sharding == params[p].sharding for p, a in master.items())
        assert any(a.sharding.spec != jax.sharding.PartitionSpec() for a in master.values())
        frozen = {str(p[0].key) for p, _ in _flat(state["frozen"])}
        assert frozen == ({"vision"} if vision_dtype == "bfloat16" else set())
        mu = jax.tree.leaves(state["opt"][1][0].mu)
        assert all(a.dtype == jnp.float32 for a in mu)


def _flat(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _initial_weights(mesh) -> dict:
    """fp32 weights (numpy) of the toy decoder drawn like its init (N(0, 0.02), norm
    gains 1), without compiling the init."""
    _, abstract = abstract_model(toy_run_config("unused").model, mesh)
    rng = np.random.default_rng(0)

    def draw(path, a):
        if path[-1].key == "weight":
            return np.ones(a.shape, np.float32)
        return (0.02 * rng.standard_normal(a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract))


def _on(program, params: dict) -> dict:
    """Fresh device copies of `params` (the state is donated) in the step's
    shardings, so that its second call does not compile again for others."""
    return jax.device_put(params, merge(program.shardings["params"], program.shardings["frozen"]))


def _train(overrides, params, batches, mesh):
    """Losses and final state of the toy decoder trained on `batches` from `params`
    (numpy, fp32: `init_state` casts them to the program's dtypes)."""
    cfg = toy_run_config("unused", *overrides)
    program = build_program(cfg.model, cfg, mesh, len(batches))
    state = program.init_state(_on(program, params))
    losses = []
    for b in batches:
        state, m = program(state, global_batch(b, program))
        losses.append(float(m["loss"]))
    return np.array(losses), state


def test_bf16_master_tracks_fp32_training_and_plain_bf16_drifts(eight_devices):
    """20 AdamW steps (lr 1e-4 constant, batch 8 x 16 tokens) of the toy decoder
    from the same fp32 initial weights, against fp32 training (loss 4.162 ->
    4.121 in these steps):

    - bf16 parameters and compute with an fp32 master copy: the loss stays
      within 1e-3 of fp32's at every step (measured: 2.3e-4 at most), and every
      tensor of the master copy reproduces fp32's update to within 10 % of its
      size (measured: at most 3.8 %);
    - plain bf16 parameters (bf16 moments and updates) drift: an update below
      half a bf16 step of its weight is lost, so RMSNorm gains (1.0, a step of
      2^-7) never move and every tensor misses more than 30 % of fp32's update
      (measured: 43 % to 100 %); its loss is more than 1e-3 and more than 5x the
      master copy's gap away from fp32's (measured: 4.4e-3, 19x)."""
    mesh = make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    it = toy_batches(n=64, seq_len=16, vocab=64, global_batch=8)
    batches = [next(it) for _ in range(20)]
    base = ("train.lr=1e-4", "train.schedule=constant", "train.warmup_fraction=0")
    params = _initial_weights(mesh)

    ref, ref_state = _train(base, params, batches, mesh)
    mixed, mixed_state = _train((*base, *MASTER), params, batches, mesh)
    plain, plain_state = _train((*base, *BF16), params, batches, mesh)
    assert ref[-1] < ref[0] - 0.03  # it learns

    # the state: bf16 parameters, fp32 master and AdamW moments; none without the option
    assert mixed_state["params"]["embed"].dtype == jnp.bfloat16
    assert mixed_state["master"]["embed"].dtype == jnp.float32
    assert mixed_state["opt"][1][0].mu["embed"].dtype == jnp.float32
    assert "master" not in plain_state
    assert plain_state["opt"][1][0].mu["embed"].dtype == jnp.bfloat16
    # the parameters are the master copy rounded
    rounded = jax.tree.map(lambda m: m.astype(jnp.bfloat16), mixed_state["master"])
    for a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(mixed_state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    mixed_gap, plain_gap = np.abs(mixed - ref).max(), np.abs(plain - ref).max()
    assert mixed_gap < 1e-3, mixed_gap
    assert plain_gap > max(1e-3, 5 * mixed_gap), (plain_gap, mixed_gap)

    def update_errors(weights) -> np.ndarray:
        """Per tensor: |w - w_fp32| / |w_fp32 - w_0|, the share of fp32's update missed."""
        out = []
        for w, want, start in zip(*map(jax.tree.leaves, (weights, ref_state["params"], params))):
            want = np.asarray(want)
            miss = np.linalg.norm(np.asarray(w, np.float32) - want)
            out.append(miss / np.linalg.norm(want - start))
        return np.array(out)

    assert update_errors(mixed_state["master"]).max() < 0.1
    assert update_errors(plain_state["params"]).min() > 0.3
    gain = np.asarray(plain_state["params"]["norm"]["weight"], np.float32)
    assert np.all(gain == 1.0) and np.all(np.asarray(ref_state["params"]["norm"]["weight"]) != 1)


def _trainer(workdir, mesh, *overrides):
    """A toy run's trainer, its initial weights `_initial_weights` (fp32: the master
    copy starts from them, the bf16 parameters from them rounded)."""
    cfg = toy_run_config(str(workdir), *overrides, "train.steps=3")
    trainer = Trainer(cfg, toy_batches(), mesh=mesh, measure_peak=False, print_fn=lambda s: None)
    trainer.init_params = _on(trainer.program, _initial_weights(mesh))
    return trainer


def test_bf16_master_is_sharded_checkpointed_and_restores_bit_identically(tmp_path, eight_devices):
    """On 8 devices (fsdp 4 × tensor 2) the master copy and the AdamW moments are
    sharded like their bf16 parameters; a checkpoint restores them bit for bit and
    in the same shardings (a resumed run then repeats its steps, as
    tests/test_train_resume.py shows for any state; the master copy after updates
    is the parameters' source: test above); restoring it with the option off is a
    config mismatch, and the checkpoint stays."""
    mesh = make_mesh(MeshConfig(1, 4, 2))
    trainer = _trainer(tmp_path, mesh, *MASTER)
    try:
        state = trainer.program.init_state(trainer.init_params)
        trainer.save(state, force=True)
    finally:
        trainer.close()
    gate = state["params"]["layers"]["mlp"]["gate_proj"]
    assert gate.dtype == jnp.bfloat16 and gate.shape == (2, 32, 64)
    assert gate.addressable_shards[0].data.shape == (2, 8, 32)
    for tree in (state["master"], state["opt"][1][0].mu):
        twin = tree["layers"]["mlp"]["gate_proj"]
        assert twin.dtype == jnp.float32 and twin.sharding == gate.sharding
    assert all(
        m.sharding == p.sharding
        for m, p in zip(jax.tree.leaves(state["master"]), jax.tree.leaves(state["params"]))
    )
    # the master copy holds what the bf16 parameters lost in rounding
    master = np.asarray(state["master"]["layers"]["mlp"]["gate_proj"])
    assert not np.array_equal(master, np.asarray(gate, np.float32))

    off = _trainer(tmp_path, mesh, *BF16)
    try:
        with pytest.raises(CheckpointMismatch, match="master_weights on, this run has it off"):
            off.restore_latest()
    finally:
        off.close()
    assert (tmp_path / "checkpoints" / "0").is_dir()

    again = _trainer(tmp_path, mesh, *MASTER)
    try:
        restored = again.restore_latest()
    finally:
        again.close()
    for key in ("params", "master", "opt"):
        for a, b in zip(jax.tree.leaves(restored[key]), jax.tree.leaves(state[key])):
            assert a.sharding == b.sharding
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
