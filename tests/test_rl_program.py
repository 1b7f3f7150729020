"""The RL step on a toy decoder: the log-prob pass is log-softmax(logits / T),
on-policy ratios are 1, advantages move log-probs their way, and 8 sharded
devices (with micro-batches) equal 1 device over μ = 3 updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_init import numpy_params

from insightv_jax.config import MeshConfig
from insightv_jax.parallel import make_mesh
from insightv_jax.train.losses import IGNORE, shift_labels
from insightv_jax.train.optim import merge
from insightv_jax.train.rl import RLProgram
from insightv_jax.train.toy_data import ToySource, toy_run_config
from insightv_jax.train.trainer import build_program, global_batch

# one config for every test (GRPO with a reference and DAPO's clip-higher), so
# the single-device program compiles once
OVERRIDES = (
    "train.schedule=constant", "train.warmup_fraction=0", "train.global_batch=16",
    "train.lr=3e-3", "rl.beta=0.1", "rl.epsilon_high=0.28", "rl.temperature=0.7",
)  # fmt: skip
B = 16


def make_program(tmp, mesh, *overrides):
    cfg = toy_run_config(str(tmp), *OVERRIDES, *overrides)
    return build_program(
        cfg.model, cfg, mesh, 100, program_cls=functools.partial(RLProgram, rl=cfg.rl)
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory, eight_devices):
    """(single-device program, initial parameters as numpy)."""
    tmp = tmp_path_factory.mktemp("rl")
    mesh = make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    program = make_program(tmp, mesh)
    return program, numpy_params(program_model(tmp), seed=0)


def program_model(tmp):
    return toy_run_config(str(tmp), *OVERRIDES).model


def on(program, params):
    """Fresh device copies of `params` in the program's layout (init_state donates)."""
    return jax.device_put(params, merge(program.shardings["params"], program.shardings["frozen"]))


def responses(seed=0):
    """Rows of a prompt (IGNORE labels) and a response (labelled), right-padded."""
    src = ToySource(B, 16, 64, seed)
    rows = [src[i] for i in range(B)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def rl_batch(program, params, batch, advantages):
    """The step batch: old and reference log-probs from `params` (policy == reference)."""
    out = dict(batch, advantages=np.asarray(advantages, np.float32))
    out["old_logps"] = program.token_logps(params, batch)
    out["ref_logps"] = program.token_logps(params, batch)
    return out


def test_token_logps_and_on_policy_ratio(single):
    program, params = single
    batch = responses()
    logp = program.token_logps(on(program, params), batch)
    # eager reference: log-softmax of the model's logits / T at the next token
    model = program.model({"params": on(program, params), "frozen": {}})
    logits = model(jnp.asarray(batch["input_ids"]), attention_mask=batch["attention_mask"])
    lsm = np.asarray(jax.nn.log_softmax(logits / 0.7, axis=-1))
    targets = np.asarray(shift_labels(batch["labels"]))
    scored = targets != IGNORE
    want = np.take_along_axis(lsm, np.where(scored, targets, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(logp, np.where(scored, want, 0.0), atol=1e-5)
    assert logp.shape == (B, 16) and logp.dtype == np.float32 and np.all(logp[~scored] == 0)

    rl = rl_batch(program, on(program, params), batch, np.linspace(-1, 1, B))
    _, m = program(program.init_state(on(program, params)), global_batch(rl, program))
    assert abs(float(m["ratio_mean"]) - 1.0) < 1e-6 and float(m["clip_fraction"]) == 0.0
    assert float(m["kl"]) < 1e-10 and abs(float(m["loss"]) - float(m["pg_loss"])) < 1e-10
    assert float(m["response_tokens"]) == scored.sum() and float(m["responses"]) == B
    assert 0.0 < float(m["entropy"]) <= np.log(64) + 1e-4
    assert bool(m["finite"]) and float(m["grad_norm"]) > 0


def test_advantage_sign_moves_logprob(single):
    program, params = single
    batch = responses(seed=1)
    adv = np.array([1.0, -1.0] * (B // 2), np.float32)
    rl = rl_batch(program, on(program, params), batch, adv)
    state, _ = program(program.init_state(on(program, params)), global_batch(rl, program))
    after = program.token_logps(program.full_params(state), batch).sum(-1)
    moved = after - rl["old_logps"].sum(-1)
    assert np.all(np.sign(moved) == adv), moved


def test_sharded_equals_single_device(single, tmp_path):
    """Three updates (μ = 3) on one rollout batch: a 2×2×2 mesh with 2 micro-batches
    gives the single device's metrics (rtol 1e-5) and parameters (atol 1e-5)."""
    batch = responses(seed=2)
    adv = np.random.default_rng(0).normal(size=B).astype(np.float32)
    sharded = make_program(tmp_path, make_mesh(MeshConfig(2, 2, 2)), "train.micro_batches=2")
    results = {}
    for name, program in (("single", single[0]), ("sharded", sharded)):
        rl = rl_batch(program, on(program, single[1]), batch, adv)
        state = program.init_state(on(program, single[1]))
        rows = []
        for _ in range(3):
            state, m = program(state, global_batch(rl, program))
            rows.append([float(m[k]) for k in ("loss", "kl", "ratio_mean", "clip_fraction")])
        params = jax.tree.map(np.asarray, jax.device_get(program.full_params(state)))
        results[name] = (np.array(rows), params)
    (s, ps), (m, pm) = results["single"], results["sharded"]
    assert s[-1, 1] > 1e-4 and s[-1, 3] > 0  # the policy moved: KL and clipping at work
    np.testing.assert_allclose(m, s, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(ps), jax.tree.leaves(pm), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
