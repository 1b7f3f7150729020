"""Continuous batching over one agent's sampler.

One thread owns the sampler and one `DecodeState` of `slots` rows whose
caches hold `context` tokens: static shapes, so the decode program compiles
once per rule set (greedy or sampling, constrained or not, penalised or not)
whatever the traffic. It loops:

  1. join: waiting requests take free rows, first come first served. Each is
     prefilled alone (a batch of one, padded to its length's bucket), its `n`
     samples copied from that one prefill (`DecodeState.repeat_rows`), given
     the keys `row_keys(seed, i)` for its samples i, and written into free
     rows of the running state (`DecodeState.put_rows`). Alone because in a
     batch a prompt is padded to the longest one there: the shapes its floats
     come from would depend on the other requests.
  2. decode `chunk` tokens for every occupied row, each by its own request's
     rules (`RowParams`: temperature, top-p, penalty, budget, step
     constraint), so a greedy request gets the tokens it gets alone, and a
     seeded one the same draws whatever else is in the batch.
  3. leave: a row that stopped (end of turn, a stop string, its budget, its
     JSON object complete, or its client gone) frees its slot at once: a
     cache is only read below its row's length, so the next request simply
     writes over it.

The chunk trades the time a new request waits to join (at most one chunk)
against the fixed cost of a decode call (a host round trip).

Requests reach the thread through `submit`; results come back on each job's
queue. Past `max_queue` waiting requests a submit is refused (429); on
shutdown (`drain`) waiting requests are refused (503) and running ones finish.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import secrets
import sys
import threading
import traceback
from collections.abc import Iterator

import jax
import numpy as np

from insightv_jax.errors import InsightVError
from insightv_jax.sample.constrain import StepConstraint
from insightv_jax.sample.reasoning import encoder_of
from insightv_jax.sample.sampler import (
    RowParams,
    Sampler,
    SamplingParams,
    cache_bucket,
    next_pow2,
    row_keys,
)
from insightv_jax.serve.protocol import ApiError
from insightv_jax.serve.text import ReplyText


@dataclasses.dataclass(frozen=True)
class Rules:
    """How each row of a job decodes."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 64
    seed: int = 0  # taken modulo 2**32 (as jax.random.key does)
    stop: tuple[str, ...] = ()  # stop strings (checked on the host after each chunk)
    schema: str | None = None  # "step" / "final": constrained to our JSON object


@dataclasses.dataclass
class Sample:
    """One finished row of a job."""

    tokens: list[int]
    logprob: float
    finish_reason: str  # "stop" or "length"


class Job:
    """One request on one agent: a prompt, `n` samples of it, their rules.

    The scheduler puts events on `events`: ("tokens", i, tokens so far) after
    each chunk of sample i (streaming jobs only), ("done", i, Sample), or
    ("error", ApiError). Sample i draws with key `row_keys(seed, first_key + i)`.
    """

    def __init__(self, ids, images: dict, n: int, rules: Rules, stream: bool = False,
                 first_key: int = 0, followup: bool = False):  # fmt: skip
        if not ids:
            raise ApiError(400, "the prompt is empty", "invalid_value")
        self.ids, self.images, self.n, self.rules = list(ids), images, n, rules
        self.stream, self.first_key = stream, first_key
        self.followup = followup  # part of a request already running (accepted while draining)
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client is gone: the scheduler frees its rows at the next chunk."""
        self.cancelled.set()


@dataclasses.dataclass
class _Row:
    job: Job
    index: int  # which of the job's samples
    reply: ReplyText  # for its stop strings
    cstate: int  # its state in the step constraint
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprob: float = 0.0


class Scheduler:
    """Continuous batching for one agent (see the module docstring)."""

    def __init__(self, sampler: Sampler, slots: int = 8, context: int | None = None,
                 chunk: int = 16, max_queue: int = 64, name: str = "agent",
                 prefill_bucket: int = 64):  # fmt: skip
        self.sampler, self.name = sampler, name
        self.encoder = encoder_of(sampler)
        self.ends = tuple(self.encoder.end_of_turn())
        limit = sampler.cfg.max_position_embeddings
        self.context = cache_bucket(min(context or 2048, limit))
        if self.context > limit:  # the bucket rounds up; positions past the model's are unseen
            self.context = limit
        self.slots, self.chunk, self.max_queue = slots, chunk, max_queue
        # prompts up to this many tokens prefill in one program (padded to it), longer
        # ones in the powers of two above: a handful of programs for any traffic
        self.prefill_bucket = prefill_bucket
        self.tokenizer_lock = threading.Lock()  # prompts are encoded on the HTTP threads
        self._constraint: StepConstraint | None = None
        self._constraint_lock = threading.Lock()
        self._rows: list[_Row | None] = [None] * slots
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._draining = self._closed = False
        # every key set here: /health reads the counts from another thread
        self.stats = dict.fromkeys(("jobs", "rows", "peak_rows", "decode_calls", "row_steps",
                                    "tokens", "rejected_queue_full"), 0)  # fmt: skip
        self._state = None
        self._params = SamplingParams(stop_token_ids=self.ends)
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ any thread

    def constraint(self) -> StepConstraint:
        """The step constraint for this agent's tokenizer (built on first use)."""
        with self._constraint_lock:
            if self._constraint is None:
                self._constraint = StepConstraint(self.sampler.tokenizer)
            return self._constraint

    def start_state(self, schema: str | None) -> int:
        c = self.constraint() if schema else None
        return 0 if c is None else c.start_final if schema == "final" else c.start_step

    def submit(self, job: Job) -> None:
        """Queue a job; ApiError if it cannot be served now (429 / 503 / 400)."""
        if job.n > self.slots:
            raise ApiError(400, f"n {job.n} is more than the server's {self.slots} decode slots",
                           "invalid_value", "n")  # fmt: skip
        if len(job.ids) + job.rules.max_tokens > self.context:
            raise ApiError(400, f"{len(job.ids)} prompt tokens + {job.rules.max_tokens} new "
                           f"tokens exceed the context of {self.context}",
                           "context_length_exceeded", "messages")  # fmt: skip
        with self._cv:
            if self._closed or (self._draining and not job.followup):
                raise ApiError(503, "the server is shutting down", "shutting_down")
            if not self._thread.is_alive():
                raise ApiError(500, f"the {self.name} scheduler has stopped", "server_error")
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise ApiError(429, f"{len(self._waiting)} requests are already waiting for "
                               f"{self.name}; retry later", "queue_full")  # fmt: skip
            self._waiting.append(job)
            self.stats["jobs"] += 1
            self._cv.notify()

    def events(self, job: Job) -> Iterator[tuple]:
        """A job's events until all its samples are done; raises its ApiError."""
        left = job.n
        while left:
            try:
                event = job.events.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise ApiError(500, f"the {self.name} scheduler has stopped",
                                   "server_error") from None  # fmt: skip
                continue
            if event[0] == "error":
                raise event[1]
            left -= event[0] == "done"
            yield event

    def drain(self) -> None:
        """Refuse new requests and those still waiting (503); running rows go on."""
        with self._cv:
            self._draining = True
            for job in self._waiting:
                if not job.followup:  # followups: the rest of a request already running
                    job.events.put(("error", ApiError(503, "the server is shutting down",
                                                      "shutting_down")))  # fmt: skip
            self._waiting = collections.deque(j for j in self._waiting if j.followup)
            self._cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Drain, let the running rows finish, stop the thread."""
        self.drain()
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    def snapshot(self) -> dict:
        """Load figures for /health."""
        with self._cv:
            waiting = len(self._waiting)
        busy = sum(r is not None for r in self._rows)
        return {"slots": self.slots, "busy_rows": busy, "waiting": waiting,
                "context": self.context, **self.stats}  # fmt: skip

    # ------------------------------------------------------ scheduler thread

    def _fresh_state(self):
        state = self.sampler.start(self.slots, self.context)
        return state.replace(rng=row_keys(0, np.arange(self.slots)))

    def _run(self) -> None:
        try:
            self._state = self._fresh_state()
            while True:
                with self._cv:
                    while not self._waiting and not self._busy():
                        if self._closed:
                            return
                        self._cv.wait()
                    joining = self._take_joining()
                for job in joining:
                    self._join(job)
                for slot, row in enumerate(self._rows):
                    if row is not None and row.job.cancelled.is_set():
                        self._rows[slot] = None
                if self._busy():
                    self._decode_chunk()
        except BaseException as e:  # a bug: fail everything rather than hang clients
            traceback.print_exc()
            self._fail_all(ApiError(500, f"scheduler failed ({type(e).__name__})",
                                    "server_error"))  # fmt: skip
            with self._cv:
                while self._waiting:
                    self._waiting.popleft().events.put(("error", ApiError(
                        500, "scheduler failed", "server_error")))  # fmt: skip

    def _busy(self) -> bool:
        return any(r is not None for r in self._rows)

    def _take_joining(self) -> list[Job]:
        """Waiting jobs that fit the free rows, in order (a job needing more rows
        than are free waits, and so do those behind it: no starving n > 1)."""
        free = sum(r is None for r in self._rows)
        joining = []
        while self._waiting:
            job = self._waiting[0]
            if not job.cancelled.is_set():
                if job.n > free:
                    break
                joining.append(job)
                free -= job.n
            self._waiting.popleft()
        return joining

    def _join(self, job: Job) -> None:
        """Prefill a job alone and write its rows into free slots."""
        try:
            # The chunk's padding past a context that is no power of two is dropped
            # (cache writes past the last slot are), never read: rows are valid below
            # their lengths.
            bucket = next_pow2(max(len(job.ids), self.prefill_bucket))
            small = self.sampler.start(1, min(bucket, self.context))
            small = self.sampler.extend(small, [job.ids], pad_to=bucket, **job.images)
            if job.n > 1:
                small = small.repeat_rows(job.n)
            keys = (job.first_key + np.arange(job.n)) % (1 << 32)
            small = small.replace(rng=row_keys(job.rules.seed % (1 << 32), keys))
            slots = [i for i, r in enumerate(self._rows) if r is None][: job.n]
            self._state = self._state.put_rows(slots, small)
        except InsightVError as e:
            job.events.put(("error", ApiError(400, str(e), "invalid_request")))
            return
        except Exception as e:  # noqa: BLE001 - the state may be lost: start afresh
            traceback.print_exc()
            job.events.put(("error", ApiError(500, f"prefill failed ({type(e).__name__})",
                                              "server_error")))  # fmt: skip
            self._reset()
            return
        start = self.start_state(job.rules.schema)
        for i, slot in enumerate(slots):
            reply = ReplyText(self.sampler.tokenizer, self.ends, job.rules.stop)
            self._rows[slot] = _Row(job, i, reply, start)
        self.stats["rows"] += job.n
        self.stats["peak_rows"] = max(
            self.stats["peak_rows"], sum(r is not None for r in self._rows)
        )

    def _decode_chunk(self) -> None:
        rows = self._rows
        active = np.array([r is not None for r in rows])

        def col(get, idle):
            return [get(r) if r is not None else idle for r in rows]

        params = RowParams.make(
            temperature=col(lambda r: r.job.rules.temperature, 0.0),
            top_p=col(lambda r: r.job.rules.top_p, 1.0),
            penalty=col(lambda r: r.job.rules.repetition_penalty, 1.0),
            budget=col(lambda r: r.job.rules.max_tokens - len(r.tokens), 0),
            constrained=col(lambda r: r.job.rules.schema is not None, False),
        )
        constraint = self.constraint() if params.constrained.any() else None
        try:
            self._state, out = self.sampler.decode(
                self._state, self._params, steps=self.chunk, active=active, constraint=constraint,
                start_states=np.asarray(col(lambda r: r.cstate, 0), np.int32), rows=params,
            )  # fmt: skip
            tokens, logprobs, nums, stopped, cstates = (np.asarray(x) for x in jax.device_get(
                (out.tokens, out.logprobs, out.num_tokens, out.stopped, out.constraint_state)))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the donated state is gone: start afresh
            traceback.print_exc()
            self._fail_all(ApiError(500, f"decode failed ({type(e).__name__})", "server_error"))
            self._reset()
            return
        self.stats["decode_calls"] += 1
        self.stats["row_steps"] += int(active.sum()) * self.chunk
        for slot, row in enumerate(rows):
            if row is None:
                continue
            n = int(nums[slot])
            row.tokens += tokens[slot, :n].tolist()
            row.logprob += float(logprobs[slot, :n].sum())
            row.cstate = int(cstates[slot])
            self.stats["tokens"] += n
            reason = None
            if stopped[slot] or row.reply.stopped(row.tokens):
                reason = "stop"
            elif len(row.tokens) >= row.job.rules.max_tokens:
                reason = "length"
            if row.job.stream and n:
                row.job.events.put(("tokens", row.index, list(row.tokens)))
            if reason is not None:
                row.job.events.put(("done", row.index, Sample(row.tokens, row.logprob, reason)))
                rows[slot] = None

    def _fail_all(self, error: ApiError) -> None:
        failed = set()
        for slot, row in enumerate(self._rows):
            if row is not None and id(row.job) not in failed:
                row.job.events.put(("error", error))
                failed.add(id(row.job))
            self._rows[slot] = None

    def _reset(self) -> None:
        """A fresh state after a failure (the old one may have been donated)."""
        self._fail_all(ApiError(500, "the decode batch was reset", "server_error"))
        try:
            self._state = self._fresh_state()
        except Exception:  # noqa: BLE001
            print(f"scheduler {self.name}: cannot allocate a fresh state", file=sys.stderr)
            raise


def new_seed() -> int:
    """A random seed for a request that gives none."""
    return secrets.randbits(32)
