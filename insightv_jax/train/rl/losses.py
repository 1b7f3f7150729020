"""The on-policy RL objectives (GRPO, Dr. GRPO, DAPO, GSPO) as pure jnp functions.

Conventions shared by every function here:

- a rollout batch holds `group_size` responses per prompt in CONTIGUOUS rows
  (rows g·G … g·G + G − 1 answer prompt g);
- per-token arrays are (B, T) in the layout of `shift_labels(labels)`: position
  t scores token t + 1; `mask` is 1.0 on scored response tokens, 0.0 elsewhere;
- log-probs are of the temperature-scaled logits (logits / rl.temperature), the
  distribution the rollout sampled from;
- everything is computed in fp32;
- the step's normalisers (`step_totals`) are computed once over the step's
  GLOBAL batch, so micro-batch shares add up to the step loss and a sharded
  batch gives the single-device loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from insightv_jax.config import RLConfig
from insightv_jax.train.losses import IGNORE, _token_chunks

ALGORITHMS = ("grpo", "dr_grpo", "dapo", "gspo")


def group_advantages(rewards: jax.Array, group_size: int, *, scale: bool, eps: float) -> jax.Array:
    """Group-relative advantages (N,) fp32 of `rewards` (N,) in contiguous groups
    of `group_size`: r − mean(group), divided by (std(group) + eps) when `scale`.

    The std is the population std (divides by G, no Bessel correction) and `eps`
    is added to it, not under the square root. A group whose rewards are all
    equal gets advantage 0 everywhere. `scale=True` is GRPO / DAPO / GSPO;
    Dr. GRPO leaves the std out (`scale=False`).
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    adv = g - jnp.mean(g, axis=1, keepdims=True)
    if scale:
        adv = adv / (jnp.std(g, axis=1, keepdims=True) + eps)
    return adv.reshape(-1)


def overlong_penalty(lengths: jax.Array, max_len: int, buffer: int) -> jax.Array:
    """DAPO's soft overlong penalty (N,) fp32 for response lengths (N,) in tokens:
    0 up to max_len − buffer, then linear down to −1 at max_len, −1 beyond
    ((max_len − buffer − length) / buffer on the ramp). `buffer` is L_cache; with
    buffer 0 only lengths above max_len are penalised (−1)."""
    n = jnp.asarray(lengths, jnp.float32)
    start = float(max_len - buffer)
    ramp = (start - n) / max(buffer, 1)
    return jnp.where(n <= start, 0.0, jnp.where(n <= max_len, ramp, -1.0))


def step_totals(mask: jax.Array) -> dict:
    """The step's normalisers from its WHOLE batch's (B, T) mask: `responses`
    (rows with at least one scored token) and `tokens` (scored tokens), fp32."""
    m = mask.astype(jnp.float32)
    return {
        "responses": jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32)),
        "tokens": jnp.sum(m),
    }


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: RLConfig,
    totals: dict,
    ref_logp: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """(share, sums): this micro-batch's share of the step loss and its metric sums.

    `logp`, `old_logp`, `ref_logp`, `mask` are (B, T) per response token (the
    policy being trained, the policy that sampled — recomputed, not the
    sampler's —, the reference); `advantages` (B,), one per response; `totals`
    = `step_totals(mask of the whole step)`. With ε_l, ε_h = cfg.epsilon_low,
    cfg.epsilon_high and clip(x) = clip(x, 1 − ε_l, 1 + ε_h), the per-token
    policy term is the PPO-clipped surrogate

        ℓ_t = max(−ρ_t·A, −clip(ρ_t)·A),  ρ_t = exp(logp_t − old_logp_t)

    and the KL term the k3 estimate of KL(π ‖ π_ref), κ_t = exp(ref_t − logp_t)
    − (ref_t − logp_t) − 1. Both are aggregated the same way, per algorithm
    (R = totals["responses"], N = totals["tokens"], n_i = response i's tokens,
    L = cfg.max_response_tokens):

        grpo     Σ_i (Σ_t x_it / n_i) / R           (token mean, then response mean)
        dr_grpo  Σ_i Σ_t x_it / (R · L)
        dapo     Σ_i Σ_t x_it / N                   (one token mean over the step)
        gspo     policy: Σ_i max(−s_i·A_i, −clip(s_i)·A_i) / R with one ratio per
                 response s_i = exp(Σ_t (logp − old_logp)_it / n_i); KL as grpo

    and the step loss is policy + cfg.beta · KL. Rows without scored tokens add
    nothing. `ref_logp` is needed when cfg.beta > 0; without it the KL is 0.

    `sums` add across micro-batches: `pg` and `kl` (this micro-batch's shares of
    the step's policy term and of its β-free KL term), `clipped` (scored tokens
    in the clipped region: ρ > 1 + ε_h with A > 0 or ρ < 1 − ε_l with A < 0; for
    gspo every token of a response whose s_i is), `ratio_sum` (Σ of ρ_t over
    scored tokens; gspo: s_i once per token), `tokens`, `responses`.
    """
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"rl.algorithm {cfg.algorithm!r} is not one of {ALGORITHMS}")
    f32 = jnp.float32
    m = mask.astype(f32)
    on = m > 0
    adv = advantages.astype(f32)[:, None]
    n_i = jnp.sum(m, axis=-1)
    has = (n_i > 0).astype(f32)
    responses = jnp.maximum(totals["responses"], 1.0)
    tokens = jnp.maximum(totals["tokens"], 1.0)
    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    # masked before exp: padding positions may hold anything
    log_ratio = jnp.where(on, logp.astype(f32) - old_logp.astype(f32), 0.0)

    def aggregate(x):  # (B, T) per-token terms -> this micro-batch's share
        if cfg.algorithm == "dapo":
            return jnp.sum(x * m) / tokens
        if cfg.algorithm == "dr_grpo":
            return jnp.sum(x * m) / (responses * cfg.max_response_tokens)
        return jnp.sum(jnp.sum(x * m, axis=-1) / jnp.maximum(n_i, 1.0)) / responses

    if cfg.algorithm == "gspo":
        s = jnp.exp(jnp.sum(log_ratio * m, axis=-1) / jnp.maximum(n_i, 1.0))  # (B,)
        a = adv[:, 0]
        per_seq = jnp.maximum(-s * a, -jnp.clip(s, lo, hi) * a)
        pg = jnp.sum(per_seq * has) / responses
        seq_clipped = ((s > hi) & (a > 0)) | ((s < lo) & (a < 0))
        clipped = jnp.sum(seq_clipped.astype(f32) * n_i)
        ratio_sum = jnp.sum(s * n_i)
    else:
        ratio = jnp.exp(log_ratio)
        pg = aggregate(jnp.maximum(-ratio * adv, -jnp.clip(ratio, lo, hi) * adv))
        tok_clipped = ((ratio > hi) & (adv > 0)) | ((ratio < lo) & (adv < 0))
        clipped = jnp.sum(tok_clipped.astype(f32) * m)
        ratio_sum = jnp.sum(ratio * m)

    if ref_logp is None:
        if cfg.beta > 0:
            raise ValueError(f"rl.beta={cfg.beta} > 0 needs reference log-probs")
        kl = jnp.zeros((), f32)
    else:
        d = jnp.where(on, ref_logp.astype(f32) - logp.astype(f32), 0.0)
        kl = aggregate(jnp.exp(d) - d - 1.0)
    sums = {
        "pg": pg,
        "kl": kl,
        "clipped": clipped,
        "ratio_sum": ratio_sum,
        "tokens": jnp.sum(m),
        "responses": jnp.sum(has),
    }
    return pg + cfg.beta * kl, sums


def chunked_token_logps(
    hidden: jax.Array,
    targets: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """Per-token (log-prob of the target, entropy of the distribution), both (B, T)
    fp32 and 0 where `targets` is IGNORE; differentiable in the log-probs.

    `hidden` (B, T, D), `targets` (B, T) already shifted, `logits_fn` (B, C, D) ->
    fp32 logits (B, C, V) (the temperature scaling goes inside it). The sequence
    is scanned `chunk` tokens at a time and each chunk is rematerialised, so the
    backward pass recomputes one chunk's logits at a time and fp32 logits for the
    whole sequence never exist at once. The entropy is a metric: no gradient.
    """
    hs, ts = _token_chunks(hidden, targets, chunk)
    B, T = targets.shape

    @jax.checkpoint
    def one(h, t):
        logits = logits_fn(h).astype(jnp.float32)
        valid = t != IGNORE
        safe = jnp.where(valid, t, 0)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        z = jax.lax.stop_gradient(logits)
        probs = jax.nn.softmax(z, axis=-1)
        entropy = jax.lax.stop_gradient(lse) - jnp.sum(probs * z, axis=-1)
        return jnp.where(valid, picked - lse, 0.0), jnp.where(valid, entropy, 0.0)

    def body(carry, xs):
        return carry, one(*xs)

    _, (logp, ent) = jax.lax.scan(body, None, (hs, ts))  # (n, B, chunk) each

    def back(x):
        return x.swapaxes(0, 1).reshape(B, -1)[:, :T]

    return back(logp), back(ent)
