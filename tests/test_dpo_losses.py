"""DPO losses: equal to a direct NumPy implementation; the gradient raises the
chosen log-prob and lowers the rejected one on a toy model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from insightv_jax.train.losses import (
    chunked_ce_sum,
    chunked_sequence_nll,
    chunked_token_nll,
    dpo_loss,
    dpo_pair_losses,
    shift_labels,
)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, loss, eps):
    if loss == "ref_free":
        rc, rr = 0.0 * rc, 0.0 * rr
    h = (pc - pr) - (rc - rr)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "ref_free"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_matches_numpy(loss, eps):
    rng = np.random.default_rng(1)
    B, beta, gamma = 16, 0.3, 0.7
    pol = rng.normal(-40, 15, (B, 2))
    ref = rng.normal(-40, 15, (B, 2))
    nll = rng.uniform(5, 50, B)
    tokens = rng.integers(3, 30, B).astype(np.float64)
    mask = (rng.random(B) < 0.8).astype(np.float64)
    got, m = dpo_loss(
        jnp.asarray(pol, jnp.float32), jnp.asarray(ref, jnp.float32),
        jnp.asarray(nll, jnp.float32), jnp.asarray(tokens, jnp.float32), jnp.asarray(mask),
        beta=beta, gamma=gamma, loss=loss, label_smoothing=eps,
    )  # fmt: skip
    per = np_dpo(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta, loss, eps)
    want = np.sum(per * mask) / mask.sum() + gamma * np.sum(nll * mask) / np.sum(tokens * mask)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    rc = beta * (pol[:, 0] - (0 if loss == "ref_free" else ref[:, 0]))
    rr = beta * (pol[:, 1] - (0 if loss == "ref_free" else ref[:, 1]))
    np.testing.assert_allclose(float(m["reward_accuracy"]), np.sum((rc > rr) * mask) / mask.sum())
    np.testing.assert_allclose(
        float(m["reward_margin"]), np.sum((rc - rr) * mask) / mask.sum(), rtol=1e-4
    )
    # the gradient raises the chosen log-prob and lowers the rejected one
    g = jax.grad(lambda p: dpo_loss(p, jnp.asarray(ref, jnp.float32), jnp.asarray(nll, jnp.float32),
                                    jnp.asarray(tokens, jnp.float32), beta=beta, loss=loss,
                                    label_smoothing=eps)[0])(jnp.asarray(pol, jnp.float32))  # fmt: skip
    g = np.asarray(g)
    if loss == "ipo":  # pushes h towards 1/(2β): signs follow h - 1/(2β)
        h = (pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])
        assert np.all(np.sign(g[:, 0]) == np.sign(h - 1 / (2 * beta)))
    else:  # up for chosen, down for rejected — unless smoothing says "too confident"
        z = rc - rr
        push = (1 - eps) / (1 + np.exp(z)) - eps / (1 + np.exp(-z))
        assert np.all(np.sign(-g[:, 0]) == np.sign(push)) and np.all(
            np.sign(g[:, 1]) == np.sign(push)
        )
        if eps == 0.0:
            assert np.all(g[:, 0] < 0) and np.all(g[:, 1] > 0)


def test_sequence_nll_per_row_matches_total():
    rng = np.random.default_rng(0)
    B, T, D, V = 3, 13, 8, 17
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    labels = jnp.asarray(np.where(rng.random((B, T)) < 0.6, rng.integers(0, V, (B, T)), -100))
    t = shift_labels(labels)
    nll, count = chunked_sequence_nll(hidden, t, lambda x: x @ head, chunk=4)
    total, n = chunked_ce_sum(hidden, t, lambda x: x @ head, chunk=5)
    np.testing.assert_allclose(float(nll.sum()), float(total), rtol=1e-5)
    assert float(count.sum()) == float(n)
    logp = jax.nn.log_softmax(hidden @ head)
    tt = np.asarray(t)
    want = [
        -sum(float(logp[b, i, tt[b, i]]) for i in range(T) if tt[b, i] != -100) for b in range(B)
    ]
    np.testing.assert_allclose(np.asarray(nll), want, rtol=1e-5)
    per_token = chunked_token_nll(hidden, t, lambda x: x @ head, chunk=4)  # the terms of those sums
    assert per_token.shape == (B, T) and np.all(np.asarray(per_token)[tt == -100] == 0)
    np.testing.assert_allclose(np.asarray(per_token).sum(-1), want, rtol=1e-5)


def np_dpop(pc, pr, rc, rr, beta, lam):
    """DPOP (Pal et al. 2024): −log σ(β·(Δ − λ·max(0, log π_ref(c) − log π(c))))."""
    delta = (pc - pr) - (rc - rr)
    return -np_log_sigmoid(beta * (delta - lam * np.maximum(0.0, rc - pc)))


@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
def test_dpop_loss_matches_numpy(lam):
    rng = np.random.default_rng(2)
    B, beta, gamma = 16, 0.2, 0.4
    ref = rng.normal(-40, 10, (B, 2))
    # the first half of the pairs lost chosen log-prob (the case DPOP penalises),
    # the second half gained it; the rejected side moves either way
    shift = np.where(np.arange(B) < B // 2, -1.0, 1.0) * rng.uniform(0.5, 6, B)
    pol = np.stack([ref[:, 0] + shift, ref[:, 1] + rng.normal(0, 4, B)], axis=1)
    nll = rng.uniform(5, 50, B)
    tokens = rng.integers(3, 30, B).astype(np.float64)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)

    def loss(p):
        return dpo_loss(p, f32(ref), f32(nll), f32(tokens), beta=beta, gamma=gamma,
                        dpop_lambda=lam)  # fmt: skip

    got, m = loss(f32(pol))
    per = np_dpop(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta, lam)
    np.testing.assert_allclose(float(got), per.mean() + gamma * nll.sum() / tokens.sum(), rtol=2e-5)
    if lam == 0.0:  # plain DPO
        np.testing.assert_allclose(per, np_dpo(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1],
                                               beta, "sigmoid", 0.0))  # fmt: skip
    # the implicit rewards do not include the penalty
    margin = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    np.testing.assert_allclose(float(m["reward_margin"]), margin.mean(), rtol=1e-4)
    # d/d log π(c): −β·σ(−z)·(1 + λ) where the chosen log-prob fell, −β·σ(−z) where it rose
    g = np.asarray(jax.grad(lambda p: loss(p)[0])(f32(pol)))[:, 0]
    z = beta * ((pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])
                - lam * np.maximum(0.0, ref[:, 0] - pol[:, 0]))  # fmt: skip
    fell = ref[:, 0] > pol[:, 0]
    want = -beta / (1 + np.exp(z)) * np.where(fell, 1 + lam, 1.0) / B
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-9)


def test_dpop_needs_the_sigmoid_loss():
    x = jnp.zeros((2,))
    with pytest.raises(ValueError, match="dpop_lambda"):
        dpo_pair_losses(x, x, x, x, loss="ipo", dpop_lambda=1.0)
