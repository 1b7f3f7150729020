"""What a model name serves.

`AgentModel`: one agent. The request's messages are its prompt (rendered by
its `PromptEncoder`, as `insightv infer` and training render them), and each
choice is a reply as `sample.reasoning.generate_encoded` gives it.

`TwoAgentModel` (`two-agent`): Insight-V's inference as
`sample.reasoning.two_agent_answer` runs it. The question (the one user
message's text) and its images go to the reasoning agent in the wording it was
trained with; the chain it writes inside <thoughts> goes with the question to
the summary agent, whose reply is the answer. The chain comes back beside the
answer as `message.reasoning_content` (the field OpenAI-compatible servers use
for reasoning), and the `n` chains of a request share one prefill. The
request's temperature, top-p and seed rule both agents; `max_tokens` and
`stop` apply to the answer, the chain has the server's `--reason-max-tokens`.

`complete(request, emit)` returns the choices and usage; with `emit` (a
stream) it also calls `emit(index, delta)` with each piece as it is decided.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from insightv_jax.data.prompts import Prompts
from insightv_jax.errors import InsightVError
from insightv_jax.sample.reasoning import (
    IMAGE_MARKER,
    _reasoning_prompts,
    _summary_prompts,
    extract_chain,
)
from insightv_jax.serve.protocol import ApiError, ChatRequest, usage_body
from insightv_jax.serve.scheduler import Job, Rules, Sample, Scheduler, new_seed
from insightv_jax.serve.text import ReplyText

Emit = Callable[[int, dict], None]


@dataclasses.dataclass
class Choice:
    index: int
    content: str
    finish_reason: str
    reasoning_content: str | None = None

    def to_dict(self) -> dict:
        message = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return {"index": self.index, "message": message, "finish_reason": self.finish_reason,
                "logprobs": None}  # fmt: skip


def run_job(scheduler: Scheduler, job: Job, replies: list[ReplyText], emit: Emit | None,
            index_of=lambda i: i) -> list[tuple[str, Sample]]:  # fmt: skip
    """Submit a job and wait for it (`collect`)."""
    scheduler.submit(job)
    return collect(scheduler, job, replies, emit, index_of)


def collect(scheduler: Scheduler, job: Job, replies: list[ReplyText], emit: Emit | None,
            index_of=lambda i: i) -> list[tuple[str, Sample]]:  # fmt: skip
    """A submitted job's samples: [(reply text, Sample)] by sample. Streams
    each sample's pieces to `emit(index_of(i), {"content": piece})`. A failing
    `emit` (the client went away) cancels the job and raises."""
    done: list = [None] * job.n
    try:
        for kind, i, payload in scheduler.events(job):
            if kind == "tokens" and emit is not None:
                piece = replies[i].piece(payload)
                if piece:
                    emit(index_of(i), {"content": piece})
            elif kind == "done":
                if emit is not None:
                    last = replies[i].last_piece(payload.tokens)
                    if last:
                        emit(index_of(i), {"content": last})
                done[i] = (replies[i].final(payload.tokens), payload)
    except BaseException:
        job.cancel()
        raise
    return done


class AgentModel:
    """A model name served by one agent (see the module docstring)."""

    def __init__(self, name: str, scheduler: Scheduler, max_tokens: int):
        self.name, self.scheduler, self.max_tokens = name, scheduler, max_tokens

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "insightv"}

    def encode(self, request: ChatRequest):
        """The request's prompt for this agent; ApiError (400) if it cannot be one."""
        try:
            with self.scheduler.tokenizer_lock:
                return self.scheduler.encoder.prompt(request.messages, request.images, "request")
        except InsightVError as e:
            raise ApiError(400, str(e), "invalid_prompt", "messages") from None

    def rules(self, request: ChatRequest, prompt_tokens: int, max_tokens: int | None,
              seed: int, stop=None) -> Rules:  # fmt: skip
        """The request's decoding rules for a prompt of `prompt_tokens` on this
        agent: max_tokens defaults to what the limit and the context leave."""
        room = self.scheduler.context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt of {prompt_tokens} tokens leaves no room in the "
                           f"context of {self.scheduler.context}", "context_length_exceeded",
                           "messages")  # fmt: skip
        if max_tokens is None:
            max_tokens = min(self.max_tokens, room)
        if request.schema is not None:
            c = self.scheduler.constraint()
            need = c.min_tokens(final=request.schema == "final")
            if max_tokens < need:
                raise ApiError(400, f"max_tokens {max_tokens} cannot fit a {request.schema} "
                               f"object (it needs at least {need} tokens)", "max_tokens_too_small",
                               "max_tokens")  # fmt: skip
        return Rules(
            temperature=request.temperature,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            max_tokens=max_tokens,
            seed=seed,
            stop=request.stop if stop is None else stop,
            schema=request.schema,
        )

    def complete(self, request: ChatRequest, emit: Emit | None = None) -> tuple[list[Choice], dict]:
        encoded = self.encode(request)
        seed = new_seed() if request.seed is None else request.seed
        rules = self.rules(request, len(encoded.ids), request.max_tokens, seed)
        job = Job(encoded.ids, self.scheduler.encoder.images([encoded]), request.n, rules,
                  stream=emit is not None)  # fmt: skip
        tok, ends = self.scheduler.sampler.tokenizer, self.scheduler.ends
        replies = [ReplyText(tok, ends, rules.stop) for _ in range(request.n)]
        done = run_job(self.scheduler, job, replies, emit)
        choices = [Choice(i, text, s.finish_reason) for i, (text, s) in enumerate(done)]
        usage = usage_body(len(encoded.ids), sum(len(s.tokens) for _, s in done))
        return choices, usage


class TwoAgentModel:
    """`two-agent`: reasoning agent -> chain -> summary agent -> answer."""

    name = "two-agent"

    def __init__(self, reasoner: AgentModel, summarizer: AgentModel, prompts: Prompts,
                 reason_max_tokens: int = 256):  # fmt: skip
        self.reasoner, self.summarizer, self.prompts = reasoner, summarizer, prompts
        self.reason_max_tokens = reason_max_tokens

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "insightv",
                "reasoner": self.reasoner.name, "summarizer": self.summarizer.name}  # fmt: skip

    def _question(self, request: ChatRequest) -> str:
        roles = [m["role"] for m in request.messages]
        if roles != ["user"]:
            raise ApiError(400, f"model {self.name} answers one user message (a question, "
                           f"optionally with images); got roles {roles}", "invalid_value",
                           "messages")  # fmt: skip
        if request.schema is not None:
            raise ApiError(400, f"model {self.name} answers in free text; response_format "
                           "json_schema is for single agents", "unsupported_parameter",
                           "response_format")  # fmt: skip
        question = request.messages[0]["content"].replace(IMAGE_MARKER, "").strip()
        if not question:
            raise ApiError(400, "the question is empty", "invalid_value", "messages")
        return question

    def _encode(self, agent: AgentModel, build):
        try:
            with agent.scheduler.tokenizer_lock:
                return build()
        except InsightVError as e:
            raise ApiError(400, str(e), "invalid_prompt", "messages") from None

    def complete(self, request: ChatRequest, emit: Emit | None = None) -> tuple[list[Choice], dict]:
        question, images = self._question(request), list(request.images)
        seed = new_seed() if request.seed is None else request.seed
        r, s = self.reasoner, self.summarizer
        r_enc = self._encode(r, lambda: _reasoning_prompts(r.scheduler.sampler, [question],
                                                           self.prompts, [images])[0])  # fmt: skip
        max_chain = min(self.reason_max_tokens, r.scheduler.context - len(r_enc.ids))
        plain = dataclasses.replace(request, schema=None)
        r_rules = r.rules(plain, len(r_enc.ids), max(max_chain, 1), seed, stop=("</thoughts>",))
        job = Job(r_enc.ids, r.scheduler.encoder.images([r_enc]), request.n, r_rules)
        tok, ends = r.scheduler.sampler.tokenizer, r.scheduler.ends
        chains_done = run_job(r.scheduler, job, [ReplyText(tok, ends, r_rules.stop)
                                                 for _ in range(request.n)], None)  # fmt: skip
        # A chain is text: an <image> the reasoning agent wrote is no image placeholder.
        chains = [extract_chain(text).replace(IMAGE_MARKER, "").strip() for text, _ in chains_done]
        if emit is not None:
            for i, chain in enumerate(chains):
                emit(i, {"reasoning_content": chain})
        # The summary prompts, one per chain, all submitted before any is awaited
        # so that they decode side by side.
        jobs, replies, prompt_tokens = [], [], len(r_enc.ids)
        for i, chain in enumerate(chains):
            s_enc = self._encode(s, lambda c=chain: _summary_prompts(
                s.scheduler.sampler, [question], [c], self.prompts, [images])[0])  # fmt: skip
            rules = s.rules(plain, len(s_enc.ids), request.max_tokens, seed)
            jobs.append(Job(s_enc.ids, s.scheduler.encoder.images([s_enc]), 1, rules,
                            stream=emit is not None, first_key=i, followup=True))  # fmt: skip
            replies.append(ReplyText(s.scheduler.sampler.tokenizer, s.scheduler.ends,
                                     rules.stop, strip=True))  # fmt: skip
            prompt_tokens += len(s_enc.ids)
        try:
            for sjob in jobs:
                s.scheduler.submit(sjob)
            choices, completion_tokens = [], sum(len(x.tokens) for _, x in chains_done)
            for i, (sjob, reply) in enumerate(zip(jobs, replies)):
                ((answer, sample),) = collect(s.scheduler, sjob, [reply], emit,
                                              index_of=lambda _, i=i: i)  # fmt: skip
                completion_tokens += len(sample.tokens)
                choices.append(Choice(i, answer, sample.finish_reason, reasoning_content=chains[i]))
        except BaseException:
            for sjob in jobs:
                sjob.cancel()
            raise
        return choices, usage_body(prompt_tokens, completion_tokens)
