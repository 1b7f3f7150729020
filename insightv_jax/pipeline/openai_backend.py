"""The `openai` backend: any OpenAI-compatible chat-completions endpoint.

Images travel as base64 data URLs. Requests run in a bounded thread pool; a
timeout, a 5xx/429 or a malformed reply is retried with exponential backoff and
counted; a request that still fails is counted and its job skipped (a rerun of
the stage retries it). A 4xx other than 408/429 means the endpoint, key or
model is wrong: that stops the run with a one-line error. With
`pipeline.step_schema` the generator's requests carry `response_format`
json_schema: the step object's schema for steps, the final answer's for the
final call (servers that enforce it, like `insightv serve`, then send only
objects that parse).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import lru_cache

from insightv_jax.config import PipelineConfig
from insightv_jax.data.prompts import judge_prompt, scorer_prompt
from insightv_jax.data.synthetic.oracle import parse_verdict
from insightv_jax.pipeline.backend_common import (
    VERDICT,
    BackendError,
    RetriesExhausted,
    Stats,
    chain_steps_text,
    job_seed,
    parse_final,
    parse_scores,
    parse_step,
)
from insightv_jax.sample.constrain import FINAL_JSON_SCHEMA, STEP_JSON_SCHEMA

RETRY_STATUS = (408, 429)
STEP, FINAL = ("step", STEP_JSON_SCHEMA), ("final_answer", FINAL_JSON_SCHEMA)


@lru_cache(maxsize=4096)
def image_data_url(path: str) -> str:
    """A file as a `data:<mime>;base64,...` URL."""
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def response_format(name: str, schema: dict) -> dict:
    """The chat-completions `response_format` asking for JSON that follows `schema`."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def user_content(text: str, image_path: str | None):
    """A user message's content: text, plus the image when there is one."""
    if image_path is None:
        return text
    return [
        {"type": "image_url", "image_url": {"url": image_data_url(image_path)}},
        {"type": "text", "text": text},
    ]


class ChatClient:
    """POST /chat/completions with timeouts, retries and backoff; counts into `stats`."""

    def __init__(self, cfg: PipelineConfig, stats: Stats):
        self.url = cfg.endpoint.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(cfg.api_key_env, "")
        self.timeout, self.retries, self.backoff = cfg.timeout_s, cfg.retries, cfg.backoff_s
        self.stats = stats

    def chat(self, model: str, messages: list[dict], **params) -> str:
        """The reply text; raises RetriesExhausted or BackendError."""
        body = json.dumps({"model": model, "messages": messages, **params}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        self.stats.add("requests")
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.add("retries")
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read())
                content = payload["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("content is not a string")
                return content
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in RETRY_STATUS:
                    raise BackendError(f"{self.url}: HTTP {e.code} ({e.reason})") from None
                self.stats.add(f"http_{e.code}")
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                timeout = isinstance(e, TimeoutError) or isinstance(reason, TimeoutError)
                self.stats.add("timeouts" if timeout else "connection_errors")
            except (ValueError, KeyError, IndexError, TypeError):
                self.stats.add("malformed_replies")
        self.stats.add("requests_failed")
        raise RetriesExhausted(self.url)


def _in_pool(fn, jobs: list, concurrency: int) -> Iterator[tuple[int, object]]:
    """(index, fn(job)) as they complete, at most `concurrency` in flight."""
    with ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


class OpenAIGenerator:
    """Progressive step dialogues (docs/method.md) against a chat endpoint."""

    def __init__(self, cfg: PipelineConfig, seed: int):
        self.cfg, self.seed, self.prompts = cfg, seed, cfg.prompts
        self.stats = Stats()
        self.client = ChatClient(cfg, self.stats)

    def _params(self, seed: int, max_tokens: int, schema: tuple[str, dict]) -> dict:
        c = self.cfg
        params = {"temperature": c.temperature, "top_p": c.top_p, "max_tokens": max_tokens}
        if c.repetition_penalty != 1.0:
            params["repetition_penalty"] = c.repetition_penalty
        if c.step_schema:
            params["response_format"] = response_format(*schema)
        return {**params, "seed": seed}

    def _ask(self, messages: list[dict], parse, schema: tuple[str, dict], seed: int,
             max_tokens: int):  # fmt: skip
        """(parsed, raw reply); re-asks in valid JSON `json_retries` times, then (None, raw).
        `schema` (name, JSON schema) is the reply's object, sent with `step_schema`."""
        extra: list[dict] = []
        raw = ""
        for attempt in range(self.cfg.json_retries + 1):
            if attempt:
                self.stats.add("json_retries")
            raw = self.client.chat(
                self.cfg.generator_model, messages + extra, **self._params(seed, max_tokens, schema)
            )
            parsed = parse(raw)
            if parsed is not None:
                return parsed, raw
            extra = [
                {"role": "assistant", "content": raw},
                {"role": "user", "content": self.prompts.invalid_json},
            ]
        return None, raw

    def dialogue(self, job: tuple[dict, int]) -> dict | None:
        query, sample = job
        p, c = self.prompts, self.cfg
        seed = job_seed(self.seed, query["id"], sample)
        messages = [
            {"role": "system", "content": p.generator_system},
            {"role": "user", "content": user_content(query["question"], query.get("image_path"))},
            {"role": "assistant", "content": p.generator_prefill},
        ]
        steps, errors = [], 0
        try:
            while len(steps) < p.max_steps:
                step, raw = self._ask(messages, parse_step, STEP, seed, c.max_new_tokens)
                if step is None:  # the public code's Error step, then the final answer
                    self.stats.add("error_steps")
                    errors += 1
                    step = {"title": "Error", "content": raw, "next_action": "final_answer"}
                steps.append(step)
                messages.append({"role": "assistant", "content": raw})
                if step["next_action"] == "final_answer":
                    break
                messages.append({"role": "user", "content": p.next_step})
            messages.append({"role": "user", "content": p.final_answer})
            final, raw = self._ask(messages, parse_final, FINAL, seed, c.final_tokens)
        except RetriesExhausted:
            self.stats.add("dialogues_failed")
            return None
        if final is None:
            self.stats.add("final_unparsed")
            final = raw.strip()
        return {"steps": steps, "final_answer": final, "error_steps": errors}

    def generate(self, jobs: list[tuple[dict, int]]) -> Iterator[tuple[int, dict | None]]:
        return _in_pool(self.dialogue, jobs, self.cfg.concurrency)


class OpenAIJudge:
    """Answer equivalence by a text LLM: `[1]`/`[0]`; unparseable or failed -> 0, counted."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.stats = Stats()
        self.client = ChatClient(cfg, self.stats)

    def _one(self, request: tuple[str, str, str]) -> int:
        q, gt, answer = request
        prompt = judge_prompt(q, gt, answer, self.cfg.prompts)
        try:
            raw = self.client.chat(
                self.cfg.judge_model, [{"role": "user", "content": prompt}],
                temperature=self.cfg.judge_temperature, top_p=self.cfg.judge_top_p,
                max_tokens=self.cfg.judge_max_tokens,
            )  # fmt: skip
        except RetriesExhausted:
            self.stats.add("judge_failed")
            return 0
        if not VERDICT.search(raw):
            self.stats.add("judge_unparseable")
        return parse_verdict(raw)

    def judge_many(self, requests: list[tuple[str, str, str]]) -> list[int]:
        out = [0] * len(requests)
        for i, v in _in_pool(self._one, requests, self.cfg.concurrency):
            out[i] = v
        return out


class OpenAIScorer:
    """All correct paths of a question in one prompt (with the image) -> 1–100 each."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.stats = Stats()
        self.client = ChatClient(cfg, self.stats)

    def _one(self, request: tuple[dict, list]) -> list[float | None]:
        query, chains = request
        paths = [chain_steps_text(c) for c in chains]
        prompt = scorer_prompt(query["question"], query["answer"], paths, self.cfg.prompts)
        try:
            raw = self.client.chat(
                self.cfg.scorer_model,
                [{"role": "user", "content": user_content(prompt, query.get("image_path"))}],
                temperature=self.cfg.scorer_temperature, max_tokens=self.cfg.scorer_max_tokens,
            )  # fmt: skip
        except RetriesExhausted:
            self.stats.add("scorer_failed")
            return [None] * len(chains)
        scores = parse_scores(raw, len(chains))
        missing = sum(s is None for s in scores)
        if missing:
            self.stats.add("scores_missing", missing)
        return scores

    def score_many(self, requests: list[tuple[dict, list]]) -> list[list[float | None]]:
        out: list = [None] * len(requests)
        for i, v in _in_pool(self._one, requests, self.cfg.concurrency):
            out[i] = v
        return out
