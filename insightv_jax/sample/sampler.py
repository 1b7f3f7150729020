"""A jitted KV-cache sampler: prefill, then the whole decode loop in one
`lax.while_loop`.

It takes a `models.interface.CausalLM` and runs its decode form
(`sample.decode_transform.for_decoding`) through the `DecodingLM` interface:
`embed_inputs`, `forward_cached`, `logits` and `decoder_config`.

Two calls make a step-wise API a server can build on: `extend` appends a
right-padded chunk of tokens (a prompt, or the next dialogue turn) to every
row's cache, and `decode` generates up to k tokens per row from there. Shapes
are bucketed (powers of two) so a run compiles a handful of programs.

For continuous batching (`insightv serve`) the rows of one state belong to
different requests: `DecodeState.put_rows` writes a request prefilled on its
own into free rows of a running state, and `decode(rows=RowParams(...))`
gives each row its own temperature, top-p, penalty, token budget and whether
it follows the step constraint, so a row decodes as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from insightv_jax.errors import InsightVError
from insightv_jax.models.cache import KVCache
from insightv_jax.models.interface import CausalLM, DecodingLM
from insightv_jax.sample.decode_transform import for_decoding
from insightv_jax.sample.processors import process_logits, process_logits_rows


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding rules. temperature 0 = greedy (after penalties and constraints)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0


@struct.dataclass
class DecodeState:
    """Everything a row needs to continue: cache, next-token logits, the
    tokens seen so far (repetition penalty) and the random key."""

    cache: KVCache
    logits: jax.Array  # (B, V) fp32 logits for each row's next token
    seen: jax.Array  # (B, V) bool
    rng: jax.Array  # one key for the batch, or (B,) keys: one per row (`row_keys`)

    def repeat_rows(self, n: int) -> DecodeState:
        """Each row copied n times (row b -> rows b*n .. b*n+n-1): n samples of a
        prompt share one prefill. Per-row keys are repeated too; give the copies
        their own with `.replace(rng=row_keys(...))`."""
        rng = self.rng if self.rng.ndim == 0 else jnp.repeat(self.rng, n, axis=0)
        return DecodeState(
            cache=self.cache.repeat_rows(n),
            logits=jnp.repeat(self.logits, n, axis=0),
            seen=jnp.repeat(self.seen, n, axis=0),
            rng=rng,
        )

    def put_rows(self, slots: Sequence[int] | np.ndarray, rows: DecodeState) -> DecodeState:
        """This state with `rows` (a state of len(slots) rows, e.g. one request
        prefilled on its own and `repeat_rows`-ed) written over rows `slots`:
        how a request joins a running batch between decode calls. Its cache may
        be shorter than this one's (slots past it keep stale values, beyond the
        rows' lengths, so never read). With per-row keys here, `rows` must have
        per-row keys too. This state is donated (do not use it afterwards)."""
        if rows.cache.max_length > self.cache.max_length:
            raise InsightVError(
                f"rows of {rows.cache.max_length} cache slots do not fit a state of "
                f"{self.cache.max_length}"
            )
        if self.rng.ndim != 0 and rows.rng.ndim == 0:
            raise InsightVError("put_rows: this state has per-row keys; give the rows theirs")
        return _put_rows(self, jnp.asarray(slots, jnp.int32), rows)


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(state: DecodeState, slots: jax.Array, rows: DecodeState) -> DecodeState:
    rng = state.rng if state.rng.ndim == 0 else state.rng.at[slots].set(rows.rng)
    return DecodeState(
        cache=state.cache.put_rows(slots, rows.cache),
        logits=state.logits.at[slots].set(rows.logits),
        seen=state.seen.at[slots].set(rows.seen),
        rng=rng,
    )


@struct.dataclass
class RowParams:
    """Each row's own decoding rules (`Sampler.decode(rows=...)`), (B,) arrays:
    the rows of a server's batch belong to different requests. top-k is not
    per row (none), and stop tokens stay the call's `SamplingParams`'."""

    temperature: np.ndarray | jax.Array  # fp32; 0 = greedy
    top_p: np.ndarray | jax.Array  # fp32; 1 = no nucleus cut
    penalty: np.ndarray | jax.Array  # fp32 repetition penalty; 1 = none
    budget: np.ndarray | jax.Array  # int32: tokens the row may still generate (this call or later)
    constrained: np.ndarray | jax.Array  # bool: the row follows the call's `constraint`

    @classmethod
    def make(cls, temperature, top_p, penalty, budget, constrained) -> RowParams:
        """From per-row sequences (host arrays of the dtypes above)."""
        return cls(
            temperature=np.asarray(temperature, np.float32),
            top_p=np.asarray(top_p, np.float32),
            penalty=np.asarray(penalty, np.float32),
            budget=np.asarray(budget, np.int32),
            constrained=np.asarray(constrained, bool),
        )


def row_keys(seed: int, ids: Sequence[int] | np.ndarray) -> jax.Array:
    """One random key per row, `fold_in(key(seed), id)`: a row's draws depend on its
    own id, never on the batch it is decoded in (so a resumed or re-batched run
    samples the same tokens for the same ids)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids, jnp.uint32))


@struct.dataclass
class Decoded:
    tokens: jax.Array  # (B, k) int32, pad_id after a row stops
    logprobs: jax.Array  # (B, k) fp32 log p(token) under the unprocessed model
    num_tokens: jax.Array  # (B,) tokens generated per row
    stopped: jax.Array  # (B,) bool: hit a stop token/sequence or the constraint finished
    # (B,) int32: each row's state in the constraint after the call (its start
    # state where there is none), for a row that goes on in the next call
    constraint_state: jax.Array


def next_pow2(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def cache_bucket(n: int) -> int:
    """Cache lengths: powers of two up to 256, then multiples of 128 (decode
    reads every slot each token, so coarse buckets cost long contexts directly:
    at most 128 idle slots, at the price of one program per 128 tokens)."""
    return next_pow2(n) if n <= 256 else -(-n // 128) * 128


def pad_rows(
    rows: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows to `length`: (ids, mask) int32."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _stop_table(seqs: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """Stop sequences right-aligned in a (n, width) table; -1 = don't care."""
    table = np.full((max(1, len(seqs)), width), -1, np.int32)
    if not seqs:
        table[:] = -3  # matches nothing (recent tokens are >= -2)
    for i, s in enumerate(seqs):
        table[i, width - len(s) :] = s
    return table


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _extend(graphdef, params, state: DecodeState, ids, mask, pixel_values, image_sizes, positions):
    model: DecodingLM = nnx.merge(graphdef, params)
    embeds = model.embed_inputs(ids, pixel_values, image_sizes)
    hidden, cache = model.forward_cached(embeds, state.cache, mask, positions)
    counts = mask.sum(-1)
    last = jnp.take_along_axis(hidden, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)
    logits = model.logits(last)[:, 0]
    logits = jnp.where((counts > 0)[:, None], logits, state.logits)
    seen = state.seen.at[jnp.arange(ids.shape[0])[:, None], ids].max(mask.astype(bool))
    return DecodeState(cache=cache, logits=logits, seen=seen, rng=state.rng)


class _Loop(NamedTuple):
    """The decode loop's carry."""

    step: jax.Array  # () int32: tokens generated so far (the loop index)
    state: DecodeState
    tokens: jax.Array  # (B, steps) int32, pad_id where none was generated
    logprobs: jax.Array  # (B, steps) fp32
    done: jax.Array  # (B,) bool: inactive, stopped, or the constraint finished
    recent: jax.Array  # (B, width) int32: the last tokens, for stop sequences
    constraint_state: jax.Array  # (B,) int32: each row's state in the constraint
    num_tokens: jax.Array  # (B,) int32: tokens generated per row
    stopped: jax.Array  # (B,) bool: stopped by a stop token/sequence or the constraint


def _decode_loop(
    graphdef,
    params,
    state: DecodeState,
    stop_ids,
    stop_table,
    active,
    constraint,
    start_states,
    rows: RowParams | None = None,
    *,
    steps: int,
    temperature: float,
    top_k: int,
    top_p: float,
    penalty: float,
    pad_id: int,
    row_rules: tuple[bool, bool] = (False, False),
):
    model: DecodingLM = nnx.merge(graphdef, params)
    B = state.logits.shape[0]
    width = stop_table.shape[1]
    c_next, c_finish, c_dist = constraint  # see StepConstraint.device_tables

    def cond(carry: _Loop):
        return (carry.step < steps) & ~jnp.all(carry.done)

    def body(carry: _Loop) -> _Loop:
        i, st, done, cstate = carry.step, carry.state, carry.done, carry.constraint_state
        raw = st.logits
        allowed = None
        if c_next is not None:
            # tokens the row may still write: this call's, or its own budget across calls
            left = steps - i if rows is None else (rows.budget - carry.num_tokens)[:, None]
            budget = jnp.minimum(left, jnp.iinfo(c_finish.dtype).max - 1)  # max = dead
            allowed = c_finish[cstate] <= budget  # live, and finishable within the budget
            if rows is not None:
                allowed |= ~rows.constrained[:, None]
        if st.rng.ndim == 0:
            rng, key = jax.random.split(st.rng)
        else:  # a key per row: each row's stream is its own
            pairs = jax.vmap(jax.random.split)(st.rng)
            rng, key = pairs[:, 0], pairs[:, 1]
        if rows is None:
            tok = process_logits(
                raw,
                st.seen,
                key,
                allowed,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                penalty=penalty,
            )
        else:
            sample, penalise = row_rules
            tok = process_logits_rows(
                raw, st.seen, key, allowed, rows.temperature, rows.top_p, rows.penalty,
                sample=sample, penalise=penalise,
            )  # fmt: skip
        logp = jnp.take_along_axis(jax.nn.log_softmax(raw, -1), tok[:, None], axis=1)[:, 0]
        tok = jnp.where(done, pad_id, tok)
        tokens = carry.tokens.at[:, i].set(tok)
        logprobs = carry.logprobs.at[:, i].set(jnp.where(done, 0.0, logp))
        recent = jnp.concatenate([carry.recent[:, 1:], tok[:, None]], axis=1)
        hit = jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
        hit |= jnp.any(
            jnp.all((stop_table[None] == -1) | (recent[:, None, :] == stop_table[None]), -1), -1
        )
        if c_next is not None:
            follows = ~done if rows is None else ~done & rows.constrained
            cstate = jnp.where(follows, c_next[cstate, tok], cstate)
            hit |= follows & (c_dist[cstate] == 0)
        nums = carry.num_tokens + (~done).astype(jnp.int32)
        stopped = carry.stopped | (hit & ~done)
        feed = ~done
        done = done | hit
        if rows is not None:
            done |= nums >= rows.budget
        seen = st.seen.at[jnp.arange(B), tok].max(feed)
        hidden, cache = model.forward_cached(
            model.embed_inputs(tok[:, None]), st.cache, feed[:, None].astype(jnp.int32)
        )
        logits = jnp.where(feed[:, None], model.logits(hidden)[:, 0], st.logits)
        return _Loop(
            step=i + 1,
            state=DecodeState(cache=cache, logits=logits, seen=seen, rng=rng),
            tokens=tokens,
            logprobs=logprobs,
            done=done,
            recent=recent,
            constraint_state=cstate,
            num_tokens=nums,
            stopped=stopped,
        )

    init = _Loop(
        step=jnp.int32(0),
        state=state,
        tokens=jnp.full((B, steps), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, steps), jnp.float32),
        done=~active if rows is None else ~active | (rows.budget <= 0),
        recent=jnp.full((B, width), -2, jnp.int32),
        constraint_state=start_states,
        num_tokens=jnp.zeros((B,), jnp.int32),
        stopped=jnp.zeros((B,), bool),
    )
    out = jax.lax.while_loop(cond, body, init)
    decoded = Decoded(
        tokens=out.tokens,
        logprobs=out.logprobs,
        num_tokens=out.num_tokens,
        stopped=out.stopped,
        constraint_state=out.constraint_state,
    )
    return out.state, decoded


# XLA:CPU hands small matmuls to YNNPACK fusions by default. The decode loop's
# matmuls have one row per sequence (batch x hidden), and for those its other
# matmul path is faster (`insightv bench sample`; the same tokens). The training
# step, whose matmuls have thousands of rows, keeps the default (as fast or
# faster there); prefill (`_extend`) keeps it too, unmeasured.
# Fast min/max drops NaN propagation from max and min, which XLA:CPU otherwise
# runs unvectorised, several times slower over a batch of vocabulary-wide logit
# rows (the same tokens). Logits with a NaN are a broken model; in this loop
# such a row's NaNs may be skipped over rather than poison the argmax.
CPU_DECODE_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_enable_fast_min_max": True,
}


@functools.cache
def _decode_program(backend: str):
    """The jitted decode loop, with the backend's compiler options."""
    return jax.jit(
        _decode_loop,
        static_argnames=(
            "graphdef",
            "steps",
            "temperature",
            "top_k",
            "top_p",
            "penalty",
            "pad_id",
            "row_rules",
        ),  # fmt: skip
        donate_argnames=("state",),
        compiler_options=CPU_DECODE_OPTIONS if backend == "cpu" else None,
    )


class Sampler:
    """Batched generation with a model and its tokenizer (a `transformers`
    tokenizer, or None when callers pass token ids)."""

    def __init__(self, model: CausalLM, tokenizer=None, pad_id: int | None = None, encoder=None):
        self.graphdef, self.params = nnx.split(for_decoding(model))
        self.encoder = encoder  # a sample.prompting.PromptEncoder for chat prompts
        self.cfg = model.decoder_config
        self.tokenizer = tokenizer
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            if pad_id is None:
                pad_id = getattr(tokenizer, "eos_token_id", None) or 0
        self.pad_id = int(pad_id)

    # ------------------------------------------------------------ step-wise API

    def start(self, batch: int, max_length: int, seed: int = 0) -> DecodeState:
        """An empty decode state with a cache of `max_length` slots (bucketed)."""
        cache = KVCache.empty(self.cfg, batch, cache_bucket(max_length))
        V = self.cfg.vocab_size
        return DecodeState(
            cache=cache,
            logits=jnp.zeros((batch, V), jnp.float32),
            seen=jnp.zeros((batch, V), bool),
            rng=jax.random.key(seed),
        )

    def extend(
        self,
        state: DecodeState,
        rows: Sequence[Sequence[int]],
        pixel_values=None,
        image_sizes=None,
        vision=None,
        pad_to: int = 8,
    ):
        """Append each row's tokens (possibly none) to its cache.

        Images come either as LLaVA's `pixel_values` / `image_sizes`, or as
        `vision`, an object that lays itself out against the padded chunk:
        `vision.pack(ids, mask)` -> (the model's `pixel_values`, its rotary
        positions of the chunk or None) -- Qwen-VL's `VisionPrompt`.

        The chunk is right-padded to a power of two of at least `pad_to`
        tokens: a server prefilling prompts of many lengths pads them to one
        bucket so that they share one program."""
        longest = max((len(r) for r in rows), default=0)
        lengths = np.asarray(jax.device_get(state.cache.lengths))
        need = int(max((lengths[i] + len(r) for i, r in enumerate(rows)), default=0))
        if need > state.cache.max_length:
            raise InsightVError(
                f"prompt of {need} tokens does not fit the cache of {state.cache.max_length} slots"
            )
        ids, mask = pad_rows(rows, next_pow2(longest, pad_to), self.pad_id)
        positions = None
        if vision is not None:
            if pixel_values is not None or image_sizes is not None:
                raise InsightVError("give images either as vision= or as pixel_values, not both")
            pixel_values, positions = vision.pack(ids, mask)
        return _extend(
            self.graphdef, self.params, state, ids, mask, pixel_values, image_sizes, positions
        )

    def decode(
        self,
        state: DecodeState,
        params: SamplingParams,
        steps: int | None = None,
        active: np.ndarray | None = None,
        constraint=None,
        start_states: np.ndarray | None = None,
        rows: RowParams | None = None,
    ) -> tuple[DecodeState, Decoded]:
        """Generate up to `steps` tokens per active row (one jitted while loop).

        With a `StepConstraint`, each row starts in `start_states[row]`
        (default: the step schema) and stops when its object is complete.

        With `rows`, each row decodes by its own rules (`RowParams`) and
        `params` gives only the stop tokens and strings: a row stops after its
        `budget` tokens, and follows `constraint` only where `constrained`,
        finishing its object within its budget (which may span later calls:
        pass back `Decoded.constraint_state` as its next start state).
        """
        steps = steps or params.max_new_tokens
        B = state.logits.shape[0]
        active = np.ones((B,), bool) if active is None else np.asarray(active, bool)
        lengths = np.asarray(jax.device_get(state.cache.lengths))
        writes = np.full((B,), steps) if rows is None else np.minimum(steps, rows.budget)
        need = np.where(active, lengths + writes, 0)  # idle rows write nothing
        if need.max(initial=0) > state.cache.max_length:
            b = int(np.argmax(need))
            raise InsightVError(
                f"{lengths[b]} cached + {writes[b]} new tokens exceed the cache of "
                f"{state.cache.max_length} slots"
            )
        stop_ids = np.asarray(sorted(set(params.stop_token_ids)) or [-3], np.int32)
        seqs = (
            [self.tokenizer.encode(s, add_special_tokens=False) for s in params.stop_strings]
            if (self.tokenizer is not None)
            else []
        )
        width = max([len(s) for s in seqs] + [1])
        tables = (
            constraint.device_tables(self.cfg.vocab_size)
            if constraint is not None
            else (None, None, None)
        )
        if start_states is None:
            start_states = np.full((B,), constraint.start_step if constraint is not None else 0)
        if constraint is not None:
            follows = active if rows is None else active & np.asarray(rows.constrained, bool)
            need_tokens = constraint.dist[np.asarray(start_states)]
            room = np.full((B,), steps) if rows is None else np.asarray(rows.budget)
            short = follows & (need_tokens > room)
            if short.any():
                b = int(np.argmax(short))
                raise InsightVError(
                    f"{int(room[b])} new tokens cannot fit a schema step (needs "
                    f"{int(need_tokens[b])})"
                )
        rules = dict(temperature=float(params.temperature), top_k=int(params.top_k),
                     top_p=float(params.top_p), penalty=float(params.repetition_penalty))  # fmt: skip
        row_rules = (False, False)
        if rows is not None:
            # per-row rules: the scalars are unused (fixed, not to compile again);
            # skip the sampling / penalty work when no active row needs it
            rules = dict(temperature=0.0, top_k=0, top_p=1.0, penalty=1.0)
            rows = RowParams.make(rows.temperature, rows.top_p, rows.penalty, rows.budget,
                                  rows.constrained)  # fmt: skip
            row_rules = (
                bool((active & (rows.temperature > 0)).any()),
                bool((active & (rows.penalty != 1.0)).any()),
            )
        return _decode_program(jax.default_backend())(
            self.graphdef,
            self.params,
            state,
            stop_ids,
            _stop_table(seqs, width),
            active,
            tables,
            np.asarray(start_states, np.int32),
            rows,
            steps=int(steps),
            pad_id=self.pad_id,
            row_rules=row_rules,
            **rules,
        )

    # -------------------------------------------------------------- one call

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        pixel_values=None,
        image_sizes=None,
        constraint=None,
        vision=None,
    ) -> list[dict]:
        """Prefill + decode for a batch of token-id prompts (images as in
        `extend`).

        Returns one dict per row: `tokens`, `logprobs`, `text` (if a tokenizer
        is set; cut after the first stop string) and `finish_reason`
        ('stop' or 'length').
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InsightVError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        state = self.start(len(prompts), next_pow2(longest, 8) + params.max_new_tokens, params.seed)
        state = self.extend(state, prompts, pixel_values, image_sizes, vision)
        _, out = self.decode(state, params, constraint=constraint)
        return self.unpack(out, params)

    def unpack(self, out: Decoded, params: SamplingParams) -> list[dict]:
        """Host-side results of a `decode` call."""
        tokens, logprobs, nums, stopped = (
            np.asarray(x)
            for x in jax.device_get((out.tokens, out.logprobs, out.num_tokens, out.stopped))
        )
        results = []
        for i in range(tokens.shape[0]):
            n = int(nums[i])
            row = {
                "tokens": tokens[i, :n].tolist(),
                "logprobs": logprobs[i, :n].tolist(),
                "finish_reason": "stop" if stopped[i] else "length",
            }
            if self.tokenizer is not None:
                text = self.tokenizer.decode(row["tokens"], skip_special_tokens=False)
                for s in params.stop_strings:
                    cut = text.find(s)
                    if cut >= 0:
                        text = text[: cut + len(s)]
                        row["finish_reason"] = "stop"
                row["text"] = text
            results.append(row)
        return results
