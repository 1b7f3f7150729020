"""Cross-entropy over label tokens, computed in chunks from hidden states.

Neither loss materialises fp32 logits for the whole (tokens × vocabulary)
block: hidden states are cut into chunks, each chunk is projected to fp32
logits, reduced to (logsumexp − target logit), and thrown away. At 12,288
tokens and a 128k vocabulary that is the difference between ~6 GiB and
~0.5 GiB of logits per sequence.

- `fused_ce_sum` (the SFT loss) works on label tokens only and computes the
  gradient in the same pass: each chunk's logits give softmax − one-hot at
  once, so the backward pass does no matmul of its own and never recomputes
  logits, and chunks past the last label token are not computed at all
  (prompt, image and padding tokens need no logits).
- `chunked_sequence_nll` gives per-row sums (DPO needs one log-prob per
  sequence); its chunk body is rematerialised, so the backward pass
  recomputes one chunk's logits at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from insightv_jax.parallel import batch_shards

IGNORE = -100  # label of tokens that are not supervised


def shift_labels(labels: jax.Array) -> jax.Array:
    """Targets aligned with positions: target[t] = labels[t + 1] (last = IGNORE),
    so the logits at position t are scored against the next token's label."""
    pad = jnp.full(labels.shape[:-1] + (1,), IGNORE, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)


def chunked_ce_sum(
    hidden: jax.Array,
    targets: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of label tokens), both fp32 scalars:
    the batch total of `chunked_sequence_nll`."""
    nll, count = chunked_sequence_nll(hidden, targets, logits_fn, chunk)
    return jnp.sum(nll), jnp.sum(count)


def fused_ce_sum(
    hidden: jax.Array, targets: jax.Array, head: jax.Array, chunk: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of label tokens), both fp32 scalars,
    of the logits `hidden @ head` against the already-shifted `targets` (B, T).

    `hidden` (B, T, D) are final-normed hidden states, `head` (D, V) the output
    projection. Label tokens are moved to the front of each batch shard's
    tokens and processed `chunk` at a time; differentiation uses the gradients
    computed in that same pass (see the module docstring). Equals
    `chunked_ce_sum(hidden, targets, lambda h: h @ head)` with fp32 logits.
    """
    count = jnp.sum(targets != IGNORE).astype(jnp.float32)
    groups = batch_shards(hidden.shape[0])
    return _fused_ce(hidden, head, targets, max(1, chunk), groups), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_ce(hidden, head, targets, chunk, groups):
    return _fused_ce_pass(hidden, head, targets, chunk, groups, grads=False)[0]


def _fused_ce_fwd(hidden, head, targets, chunk, groups):
    total, d_hidden, d_head = _fused_ce_pass(hidden, head, targets, chunk, groups, grads=True)
    return total, (d_hidden, d_head)


def _fused_ce_bwd(chunk, groups, residuals, g):
    d_hidden, d_head = residuals
    return (d_hidden * g).astype(d_hidden.dtype), (d_head * g).astype(d_head.dtype), None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def _fused_ce_pass(hidden, head, targets, chunk, groups, grads):
    """The loop behind `fused_ce_sum`: (total, d total/d hidden, d total/d head),
    the gradients only with `grads`. Tokens are grouped per batch shard, so the
    sort and the chunks stay on the devices that hold them."""
    B, T, D = hidden.shape
    V = head.shape[1]
    n = B * T // groups
    h = hidden.reshape(groups, n, D)
    t = targets.reshape(groups, n)
    order = jnp.argsort(t == IGNORE, axis=1, stable=True)  # label tokens first
    h = jnp.take_along_axis(h, order[..., None], axis=1)
    t = jnp.take_along_axis(t, order, axis=1)
    chunk = min(chunk, n)
    pad = -n % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        t = jnp.pad(t, ((0, 0), (0, pad)), constant_values=IGNORE)
    labelled = jnp.max(jnp.sum(t != IGNORE, axis=1))
    needed = (labelled + chunk - 1) // chunk  # chunks past this hold no label token
    f32 = jnp.float32

    def body(i, carry):
        total, d_h, d_w = carry
        hc = jax.lax.dynamic_slice_in_dim(h, i * chunk, chunk, axis=1).reshape(-1, D)
        tc = jax.lax.dynamic_slice_in_dim(t, i * chunk, chunk, axis=1).reshape(-1)
        logits = jnp.matmul(hc, head, preferred_element_type=f32)  # (G*C, V)
        valid = tc != IGNORE
        safe = jnp.where(valid, tc, 0)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
        total = total + jnp.sum(jnp.where(valid, lse - picked, 0.0))
        if not grads:
            return total, d_h, d_w
        probs = jnp.exp(logits - lse[:, None])
        onehot = jnp.arange(V, dtype=safe.dtype) == safe[:, None]
        d_logits = jnp.where(valid[:, None], probs - onehot, 0.0)
        d_hc = jnp.matmul(d_logits.astype(head.dtype), head.T, preferred_element_type=f32)
        d_h = jax.lax.dynamic_update_slice_in_dim(
            d_h, d_hc.reshape(groups, chunk, D).astype(d_h.dtype), i * chunk, axis=1
        )
        d_w = d_w + jnp.matmul(hc.T, d_logits.astype(hc.dtype), preferred_element_type=f32)
        return total, d_h, d_w

    init = (
        jnp.zeros((), f32),
        jnp.zeros(h.shape if grads else (), hidden.dtype),
        jnp.zeros((D, V) if grads else (), f32),
    )
    total, d_h, d_w = jax.lax.fori_loop(0, needed, body, init)
    if not grads:
        return total, None, None
    back = jnp.argsort(order, axis=1)  # inverse permutation: sorted -> original token order
    d_hidden = jnp.take_along_axis(d_h[:, :n], back[..., None], axis=1).reshape(B, T, D)
    return total, d_hidden, d_w.astype(head.dtype)


def token_mean_ce(hidden, labels, logits_fn, chunk: int = 1024) -> jax.Array:
    """Token-mean cross-entropy of `labels` (unshifted, batch layout) in fp32."""
    total, count = chunked_ce_sum(hidden, shift_labels(labels), logits_fn, chunk)
    return total / jnp.maximum(count, 1.0)


def chunked_sequence_nll(
    hidden: jax.Array,
    targets: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """Per-row (sum of token negative log-likelihoods, number of label tokens), (B,) fp32.

    `hidden` (B, T, D) are final-normed hidden states, `targets` (B, T) the
    already-shifted labels (IGNORE = not scored), `logits_fn` maps (B, C, D) to
    fp32 logits (B, C, V). The sequence is scanned in chunks of `chunk` tokens,
    each rematerialised, so fp32 logits for the whole vocabulary and sequence
    never exist at once. A response's summed log-prob is `-nll`.
    """
    hs, ts = _token_chunks(hidden, targets, chunk)
    B = hidden.shape[0]

    @jax.checkpoint
    def one(h, t):
        return jnp.sum(_chunk_nll(logits_fn, h, t), axis=-1)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32), (hs, ts))
    count = jnp.sum(targets != IGNORE, axis=-1).astype(jnp.float32)
    return total, count


def chunked_segment_nll(
    hidden: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """`chunked_sequence_nll` per segment of packed rows: (summed NLL, label
    tokens), each (B, num_segments) fp32, column k - 1 for segment id k
    (`segment_ids` (B, T); 0, padding, and ids past `num_segments` are left
    out). A target at position t counts to the segment of token t; a packed
    row blanks each record's first label, so no target crosses a boundary."""
    hs, ts = _token_chunks(hidden, targets, chunk)
    n, B, c = ts.shape
    pad = n * c - segment_ids.shape[1]
    ss = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)
    ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)

    @jax.checkpoint
    def one(h, t, s):
        onehot = (s[..., None] == ids).astype(jnp.float32)  # (B, chunk, S)
        return jnp.einsum("bc,bcs->bs", _chunk_nll(logits_fn, h, t), onehot)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((B, num_segments), jnp.float32), (hs, ts, ss))
    scored = ((targets != IGNORE)[..., None] & (segment_ids[..., None] == ids)).astype(jnp.float32)
    return total, jnp.sum(scored, axis=1)


def _chunk_nll(logits_fn, h: jax.Array, t: jax.Array) -> jax.Array:
    """Per-token NLL (B, chunk) fp32 of one chunk; 0 where the target is IGNORE."""
    logits = logits_fn(h).astype(jnp.float32)
    valid = t != IGNORE
    safe = jnp.where(valid, t, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - picked, 0.0)


def _token_chunks(hidden: jax.Array, targets: jax.Array, chunk: int):
    """`hidden` (B, T, D) and `targets` (B, T) as (n, B, chunk, ·) chunks along the
    sequence, the last one padded (targets with IGNORE), for a scan over chunks."""
    B, T, D = hidden.shape
    chunk = max(1, min(chunk, T))
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
    hs = hidden.reshape(B, n, chunk, D).swapaxes(0, 1)
    ts = targets.reshape(B, n, chunk).swapaxes(0, 1)
    return hs, ts


def chunked_token_nll(
    hidden: jax.Array,
    targets: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int = 1024,
) -> jax.Array:
    """Per-token negative log-likelihoods (B, T) fp32, 0 where `targets` is IGNORE.

    The forward-only sibling of `chunked_sequence_nll` (same arguments, same
    chunking): estimators that work token by token, such as the k3 KL estimate,
    need the terms before they are summed.
    """
    hs, ts = _token_chunks(hidden, targets, chunk)
    B = hidden.shape[0]

    def body(carry, xs):
        return carry, _chunk_nll(logits_fn, *xs)

    _, nll = jax.lax.scan(body, None, (hs, ts))  # (n, B, chunk)
    return nll.swapaxes(0, 1).reshape(B, -1)[:, : hidden.shape[1]]


# ------------------------------------------------------------------ DPO family


DPO_LOSSES = ("sigmoid", "ipo", "ref_free")


def dpo_pair_losses(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float = 0.1,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-pair loss, chosen reward, rejected reward), all (B,) fp32.

    Inputs are summed response log-probs. With Δ = (π(c) − π(r)) − (π_ref(c) − π_ref(r)):
      sigmoid:  −(1−ε)·log σ(β·Δ') − ε·log σ(−β·Δ')    (ε = label smoothing; DPO at ε = 0)
                with Δ' = Δ − λ·max(0, π_ref(c) − π(c))  (λ = `dpop_lambda`)
      ipo:      (Δ − 1/(2β))²
      ref_free: the sigmoid loss with the reference terms left out (Δ = π(c) − π(r)).
    Rewards are β·(π − π_ref) (β·π for ref_free): the implicit DPO rewards.

    DPOP (Pal et al. 2024, "Smaug"): plain DPO only asks the chosen chain to gain
    on the rejected one, so both can fall ("likelihood displacement"). The penalty
    is zero while π(c) ≥ π_ref(c) and otherwise charges every nat the chosen chain
    lost, λ-weighted, against the margin. λ = 0 is plain DPO. The RPO-style term
    (γ·token-mean CE of the chosen chain, `dpo_loss`'s `gamma`) pulls the same way
    and is added outside this per-pair loss.
    """
    f32 = jnp.float32
    pc, pr = policy_chosen.astype(f32), policy_rejected.astype(f32)
    rc, rr = ref_chosen.astype(f32), ref_rejected.astype(f32)
    if dpop_lambda and loss != "sigmoid":
        raise ValueError(f"dpop_lambda applies to the sigmoid loss, not {loss!r}")
    if loss == "ref_free":
        rc, rr = jnp.zeros_like(rc), jnp.zeros_like(rr)
    h = (pc - pr) - (rc - rr)
    if dpop_lambda:
        h = h - dpop_lambda * jnp.maximum(0.0, rc - pc)
    if loss in ("sigmoid", "ref_free"):
        z = beta * h
        out = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * (
            jax.nn.log_sigmoid(-z)
        )
    elif loss == "ipo":
        out = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss {loss!r} is not one of {DPO_LOSSES}")
    return out, beta * (pc - rc), beta * (pr - rr)


def dpo_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    chosen_nll: jax.Array,
    chosen_tokens: jax.Array,
    mask: jax.Array | None = None,
    *,
    beta: float = 0.1,
    gamma: float = 1.0,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[jax.Array, dict]:
    """The batch DPO objective: mean over valid pairs of the pair loss
    (`dpo_pair_losses`, DPOP penalty included when `dpop_lambda` > 0) + γ·token-mean
    CE of the chosen responses (the RPO-style anchor against likelihood
    displacement). `policy_logps`/`ref_logps` are (B, 2) summed log-probs (chosen,
    rejected); `chosen_nll`/`chosen_tokens` (B,) the chosen responses' summed NLL
    and token counts; `mask` (B,) marks real pairs. Returns (loss, metrics)."""
    B = policy_logps.shape[0]
    mask = jnp.ones((B,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    pairs = jnp.maximum(jnp.sum(mask), 1.0)
    per_pair, rw_c, rw_r = dpo_pair_losses(
        policy_logps[:, 0], policy_logps[:, 1], ref_logps[:, 0], ref_logps[:, 1],
        beta=beta, loss=loss, label_smoothing=label_smoothing, dpop_lambda=dpop_lambda,
    )  # fmt: skip
    pref = jnp.sum(per_pair * mask) / pairs
    ce = jnp.sum(chosen_nll * mask) / jnp.maximum(jnp.sum(chosen_tokens * mask), 1.0)
    metrics = {
        "pref_loss": pref,
        "chosen_ce": ce,
        "reward_accuracy": jnp.sum((rw_c > rw_r) * mask) / pairs,
        "reward_margin": jnp.sum((rw_c - rw_r) * mask) / pairs,
    }
    return pref + gamma * ce, metrics
