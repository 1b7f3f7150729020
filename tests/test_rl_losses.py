"""The RL objectives against an independent NumPy implementation (loops over
responses and tokens, written from the papers' formulas), micro-batch shares,
and the loss under jit on 8 sharded devices."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from insightv_jax.config import RLConfig
from insightv_jax.train.rl import group_advantages, overlong_penalty, policy_loss, step_totals

# ------------------------------------------------------------- the reference


def np_advantages(rewards, G, scale, eps):
    out = []
    for g in range(len(rewards) // G):
        r = [float(x) for x in rewards[g * G : (g + 1) * G]]
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / G)  # population std
        out += [(x - mean) / (std + eps) if scale else x - mean for x in r]
    return np.array(out)


def np_penalty(lengths, L, cache):
    out = []
    for n in lengths:
        if n <= L - cache:
            out.append(0.0)
        elif n <= L:
            out.append(((L - cache) - n) / cache)
        else:
            out.append(-1.0)
    return np.array(out)


def np_loss(logp, old, adv, mask, cfg, ref=None):
    """(policy term, KL term, clipped tokens, ratio sum) over the whole batch."""
    lo, hi = 1 - cfg.epsilon_low, 1 + cfg.epsilon_high
    clip = lambda x: min(max(x, lo), hi)  # noqa: E731
    rows = [[t for t in range(logp.shape[1]) if mask[i, t]] for i in range(len(logp))]
    rows = [(i, ts) for i, ts in enumerate(rows) if ts]
    R, N = len(rows), sum(len(ts) for _, ts in rows)
    pg_terms, kl_terms, clipped, ratio_sum = {}, {}, 0, 0.0
    for i, ts in rows:
        a = float(adv[i])
        for t in ts:
            rho = math.exp(logp[i, t] - old[i, t])
            pg_terms[i, t] = max(-rho * a, -clip(rho) * a)
            if cfg.algorithm != "gspo":
                clipped += (rho > hi and a > 0) or (rho < lo and a < 0)
                ratio_sum += rho
            if ref is not None:
                d = ref[i, t] - logp[i, t]
                kl_terms[i, t] = math.exp(d) - d - 1

    def agg(terms, algorithm):
        if not terms:
            return 0.0
        if algorithm == "dapo":
            return sum(terms.values()) / N
        if algorithm == "dr_grpo":
            return sum(terms.values()) / (R * cfg.max_response_tokens)
        return sum(sum(terms[i, t] for t in ts) / len(ts) for i, ts in rows) / R

    if cfg.algorithm == "gspo":
        pg = 0.0
        for i, ts in rows:
            a = float(adv[i])
            s = math.exp(sum(logp[i, t] - old[i, t] for t in ts) / len(ts))
            pg += max(-s * a, -clip(s) * a) / R
            clipped += len(ts) * ((s > hi and a > 0) or (s < lo and a < 0))
            ratio_sum += s * len(ts)
        kl = agg(kl_terms, "grpo")
    else:
        pg = agg(pg_terms, cfg.algorithm)
        kl = agg(kl_terms, cfg.algorithm)
    return pg, kl, clipped, ratio_sum


# ------------------------------------------------------------------ the data


def batch(seed=0, B=8, T=12, spread=0.4, row_spread=0.0):
    """Log-probs with ratios well beyond any clip range on both sides, ragged
    masks (one row empty), advantages of both signs and a reference."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    shift = rng.normal(0.0, row_spread, (B, 1))  # moves whole sequences (GSPO's ratios)
    old = (logp + shift + rng.normal(0.0, spread, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    for i in range(B):
        start = int(rng.integers(1, 4))
        mask[i, start : start + int(rng.integers(1, T - start + 1))] = 1.0
    mask[3] = 0.0  # a row without scored tokens adds nothing
    adv = rng.normal(0.0, 1.0, B).astype(np.float32)
    return logp, old, adv, mask, ref


CONFIGS = [
    RLConfig(algorithm="grpo", beta=0.05),
    RLConfig(algorithm="dr_grpo", beta=0.05, max_response_tokens=16),
    RLConfig(algorithm="dapo", epsilon_high=0.28, beta=0.05),
    RLConfig(algorithm="gspo", epsilon_low=0.03, epsilon_high=0.04, beta=0.05),
    RLConfig(algorithm="grpo"),
]


def run(args, cfg, ref=True, totals_mask=None):
    logp, old, adv, mask, r = (jnp.asarray(x) for x in args)
    totals = step_totals(mask if totals_mask is None else jnp.asarray(totals_mask))
    return policy_loss(logp, old, adv, mask, cfg, totals, r if ref else None)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.algorithm}-beta{c.beta}")
def test_policy_loss_matches_numpy(cfg):
    gspo = cfg.algorithm == "gspo"
    args = batch(seed=7 if gspo else 1, spread=0.05 if gspo else 0.4, row_spread=0.06 * gspo)
    logp, old, adv, mask, ref = args
    share, sums = run(args, cfg, ref=cfg.beta > 0)
    pg, kl, clipped, ratio_sum = np_loss(logp, old, adv, mask, cfg, ref if cfg.beta > 0 else None)
    lo, hi = 1 - cfg.epsilon_low, 1 + cfg.epsilon_high
    rho = np.exp(logp - old)
    if not gspo:  # ratios clipped on both sides, and unclipped ones
        assert np.any((rho > hi) & (adv[:, None] > 0) & (mask > 0))
        assert np.any((rho < lo) & (adv[:, None] < 0) & (mask > 0))
    assert 0 < clipped < mask.sum()
    np.testing.assert_allclose(float(share), pg + cfg.beta * kl, atol=1e-5)
    np.testing.assert_allclose(float(sums["pg"]), pg, atol=1e-5)
    np.testing.assert_allclose(float(sums["kl"]), kl, atol=1e-5)
    assert float(sums["clipped"]) == clipped and float(sums["tokens"]) == mask.sum()
    np.testing.assert_allclose(float(sums["ratio_sum"]), ratio_sum, rtol=1e-5)
    assert float(sums["responses"]) == 7
    if cfg.beta > 0:
        assert kl > 1e-3


def test_clipping_both_sides_stops_the_gradient():
    """Tokens past 1 + ε_h with A > 0 and below 1 − ε_l with A < 0 get no gradient;
    inside the range the gradient is −A·ρ / (n_i·R) per token (grpo)."""
    cfg = RLConfig(algorithm="grpo")
    old = jnp.log(jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    logp = jnp.log(jnp.array([[1.5, 1.1, 0.5], [0.5, 0.9, 1.5]]))
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 3))
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, cfg, step_totals(mask))[0])(logp)
    # row 0 (A>0): ρ=1.5 clipped -> 0; ρ=1.1 -> -1.1/6; ρ=0.5 is below: kept (min picks it)
    # row 1 (A<0): ρ=0.5 clipped -> 0; ρ=0.9 -> +0.9/6; ρ=1.5 above: kept
    want = np.array([[0.0, -1.1 / 6, -0.5 / 6], [0.0, 0.9 / 6, 1.5 / 6]])
    np.testing.assert_allclose(np.asarray(grad), want, atol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: c.algorithm)
def test_micro_batch_shares_add_up(cfg):
    args = batch(seed=2)
    share, sums = run(args, cfg)
    halves = [run([x[:4] for x in args], cfg, totals_mask=args[3]),
              run([x[4:] for x in args], cfg, totals_mask=args[3])]  # fmt: skip
    np.testing.assert_allclose(float(halves[0][0] + halves[1][0]), float(share), atol=1e-6)
    for k, v in sums.items():
        np.testing.assert_allclose(float(halves[0][1][k] + halves[1][1][k]), float(v), atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: c.algorithm)
def test_sharded_equals_single_device(cfg, eight_devices):
    args = [jnp.asarray(x) for x in batch(seed=3, B=16)]

    def loss(logp, old, adv, mask, ref):
        share, sums = policy_loss(logp, old, adv, mask, cfg, step_totals(mask), ref)
        return share, sums

    single = jax.jit(loss)(*[jax.device_put(x, eight_devices[0]) for x in args])
    mesh = Mesh(np.array(eight_devices), ("data",))
    spread = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))) for x in args]
    assert len(spread[0].sharding.device_set) == 8
    sharded = jax.jit(loss)(*spread)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6, atol=1e-7)


def test_group_advantages():
    rng = np.random.default_rng(4)
    rewards = rng.integers(0, 2, 24).astype(np.float32) + rng.normal(0, 0.1, 24) * (
        rng.random(24) < 0.5
    )
    rewards[8:12] = 1.0  # an all-equal group: advantage 0
    for scale in (True, False):
        got = np.asarray(group_advantages(jnp.asarray(rewards), 4, scale=scale, eps=1e-6))
        np.testing.assert_allclose(got, np_advantages(rewards, 4, scale, 1e-6), atol=1e-5)
        assert np.all(got[8:12] == 0.0)
    # G = 2, rewards (1, 0): mean 0.5, population std 0.5 -> ±1/(1 + 2e-6·…)
    two = np.asarray(group_advantages(jnp.array([1.0, 0.0]), 2, scale=True, eps=1e-6))
    np.testing.assert_allclose(two, [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)], rtol=1e-7)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(jnp.ones(6), 4, scale=True, eps=1e-6)


def test_overlong_penalty():
    lengths = np.array([0, 100, 191, 192, 193, 200, 224, 255, 256, 257, 400])
    got = np.asarray(overlong_penalty(jnp.asarray(lengths), 256, 64))
    np.testing.assert_allclose(got, np_penalty(lengths, 256, 64), atol=1e-6)
    assert got[3] == 0.0 and got[8] == -1.0 and got[6] == -0.5
    np.testing.assert_array_equal(
        np.asarray(overlong_penalty(jnp.array([255, 256, 257]), 256, 0)), [0.0, 0.0, -1.0]
    )


def test_beta_without_reference_is_an_error():
    args = batch()
    with pytest.raises(ValueError, match="reference"):
        run(args, dataclasses.replace(CONFIGS[0]), ref=False)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("rl.algorithm=ppo", "rl.algorithm: 'ppo' is not one of"),
        ("rl.group_size=1", "rl.group_size=1 must be >= 2"),
        ("rl.epsilon_low=1.5", "epsilon_low=1.5 must be in [0, 1)"),
        ("rl.beta=-1", "beta=-1.0 must be >= 0"),
        ("rl.temperature=0", "temperature=0.0 must be > 0"),
        ("rl.overlong=soft", "rl.overlong=soft needs rl.overlong_buffer >= 1"),
        ("rl.overlong_buffer=256", "rl.overlong_buffer=256 must be in [0, max_response_tokens"),
        ("rl.minibatches=0", "rl.minibatches=0 must be >= 1"),
        ("rl.reference=sft", "rl.reference: 'sft' is not one of"),
    ],
)
def test_config_errors_are_one_line(override, needle):
    from insightv_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)
    cfg = load_config(None, ["rl.algorithm=dapo", "rl.epsilon_high=0.28", "rl.epochs=2"])
    assert cfg.rl.updates_per_batch == 2 and cfg.rl == RLConfig(
        algorithm="dapo", epsilon_high=0.28, epochs=2
    )
