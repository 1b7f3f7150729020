"""Next-token selection rules, in the order `transformers` applies them:
repetition penalty, then (constraint mask), temperature, top-k, top-p, sample."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Divide positive / multiply negative logits of already-seen tokens."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, _NEG, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep_sorted = before < p  # the first token is always kept
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    return jnp.where(keep, logits, _NEG)


def first_argmax(x: jax.Array) -> jax.Array:
    """Index of the first maximum along the last axis (int32), as `jnp.argmax`
    for finite inputs. A max and a min over an iota instead of argmax's paired
    (value, index) reduction, which XLA:CPU runs as a scalar loop (~7x slower
    over an 8192-token vocabulary). A row of NaNs, which matches nothing, gives
    the last index (under default compiler options; the CPU decode loop's fast
    min/max may skip NaNs instead)."""
    n = x.shape[-1]
    best = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(x == best, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
    return jnp.minimum(idx, n - 1)


def process_logits(
    logits: jax.Array,
    seen: jax.Array,
    key: jax.Array,
    allowed: jax.Array | None,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    penalty: float,
) -> jax.Array:
    """Choose one token per row (B,) from fp32 logits (B, V). `key` is one key
    for the batch or (B,) keys, one per row."""
    logits = repetition_penalty(logits.astype(jnp.float32), seen, penalty)
    if allowed is not None:
        logits = jnp.where(allowed, logits, _NEG)
    if temperature <= 0.0:
        return first_argmax(logits)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    # Gumbel-max, the draw `jax.random.categorical` makes, with the faster argmax
    if key.ndim == 0:
        noise = jax.random.gumbel(key, logits.shape, logits.dtype)
    else:
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(key)
    return first_argmax(logits + noise)


def process_logits_rows(
    logits: jax.Array,
    seen: jax.Array,
    key: jax.Array,
    allowed: jax.Array | None,
    temperature: jax.Array,
    top_p: jax.Array,
    penalty: jax.Array,
    *,
    sample: bool,
    penalise: bool,
) -> jax.Array:
    """`process_logits` with each row's own rules, (B,) arrays (top-k: none):
    the rows of a server's batch belong to different requests. A row's token
    is the one `process_logits` picks for it alone with its rules as scalars,
    whatever the other rows ask for: greedy rows (temperature 0) take the
    argmax of the same processed logits, a top-p of 1 keeps every token (not
    just those before the cumulative mass reaches 1.0 in float), a penalty of 1
    changes nothing. `sample` and `penalise` (static) say whether any row
    samples or is penalised; when none does, that work is skipped. `key` must
    be per-row keys (B,) for a row's draws to be its own."""
    logits = logits.astype(jnp.float32)
    if penalise:
        p = penalty[:, None]
        penalised = jnp.where(logits < 0, logits * p, logits / p)
        logits = jnp.where(seen & (p != 1.0), penalised, logits)
    if allowed is not None:
        logits = jnp.where(allowed, logits, _NEG)
    greedy = first_argmax(logits)
    if not sample:
        return greedy
    hot = temperature > 0.0
    scaled = logits / jnp.where(hot, temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (before < top_p[:, None]) | (top_p >= 1.0)[:, None]
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    scaled = jnp.where(keep, scaled, _NEG)
    if key.ndim == 0:
        noise = jax.random.gumbel(key, scaled.shape, scaled.dtype)
    else:
        noise = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[1:], scaled.dtype))(key)
    return jnp.where(hot, first_argmax(scaled + noise), greedy)
