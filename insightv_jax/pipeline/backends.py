"""One interface for the pipeline's three roles, and the oracle backends.

    generator.generate(jobs) -> yields (job index, chain or None)
        jobs: [(query, sample index)]; chain: {"steps": [{title, content,
        next_action}], "final_answer": str, ...}; None = failed (counted; a rerun
        retries it). Chains come back in any order as they complete.
    judge.judge_many([(question, ground_truth, answer)]) -> [0/1]
        answer equivalence; unparseable judge output counts as 0.
    scorer.score_many([(query, [chain, ...])]) -> [[score 1–100 or None]]
        all correct chains of one question in one request; None = missing.

A chain is a list of steps or `<thoughts>` text (so DPO rounds grade the
reasoning agent's chains with the same backends). Backends: `oracle` (the
synthetic suite, here), `openai` (openai_backend.py), `local` (local_backend.py).
Every backend counts its retries and failures in `stats`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

from insightv_jax.config import PipelineConfig
from insightv_jax.data.synthetic.oracle import OracleJudge, OracleScorer
from insightv_jax.data.synthetic.teacher import OracleTeacher
from insightv_jax.errors import DataError, InsightVError

NEXT_ACTIONS = ("continue", "final_answer")
VERDICT = re.compile(r"\[\s*[01]\s*\]")  # a parseable judge reply


class BackendError(InsightVError):
    """A backend cannot serve requests at all (bad endpoint, bad key, bad model)."""


class RetriesExhausted(Exception):
    """One request failed after all retries; the caller counts it and goes on."""


class Stats:
    """Thread-safe counters of retries, failures and parse fallbacks."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))


# ------------------------------------------------------------------ chains


def chain_steps_text(chain) -> str:
    """The `title: content` lines of a chain (steps, {"steps": ...} or <thoughts> text)."""
    if isinstance(chain, str):
        text = chain.strip()
        if text.startswith("<thoughts>"):
            text = text[len("<thoughts>") :]
        end = text.find("</thoughts>")
        return (text[:end] if end >= 0 else text).strip()
    if isinstance(chain, dict):
        chain = chain.get("steps", [])
    return "\n".join(f"{s.get('title', '')}: {s.get('content', '')}" for s in chain)


def thoughts(chain) -> str:
    """The reasoning agent's output for a chain: `<thoughts>\\n…\\n</thoughts>`."""
    return f"<thoughts>\n{chain_steps_text(chain)}\n</thoughts>"


def job_seed(seed: int, query_id: str, sample: int) -> int:
    """A stable 31-bit seed per (run seed, query, sample)."""
    digest = hashlib.sha256(f"{seed}/{query_id}/{sample}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# ----------------------------------------------------------------- parsing


def _json_object(text: str):
    text = text.strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            return None
    return None


def parse_step(text: str) -> dict | None:
    """A valid step {title, content, next_action} from a reply, or None."""
    obj = _json_object(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("title"), str):
        return None
    content, action = obj.get("content"), obj.get("next_action")
    if content is None or action not in NEXT_ACTIONS:
        return None
    content = content if isinstance(content, str) else json.dumps(content)
    return {"title": obj["title"], "content": content, "next_action": action}


def parse_final(text: str) -> str | None:
    """The final answer of a `{"title": "FINAL ANSWER", "content": ...}` reply, or None."""
    obj = _json_object(text)
    if not isinstance(obj, dict) or "content" not in obj:
        return None
    content = obj["content"]
    return content if isinstance(content, str) else json.dumps(content)


def parse_scores(text: str, n: int) -> list[float | None]:
    """`Path k: s` lines -> a score per path (clipped to 1–100; None where missing)."""
    out: list[float | None] = [None] * n
    for m in re.finditer(r"path\s*(\d+)\s*[:=\-]\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE):
        k = int(m.group(1)) - 1
        if 0 <= k < n and out[k] is None:
            out[k] = min(100.0, max(1.0, float(m.group(2))))
    return out


# ------------------------------------------------------------------ oracle


def _need_scene(query: dict) -> None:
    for key in ("scene", "family", "query"):
        if key not in query:
            raise DataError(
                f"record {query.get('id')}: no {key!r} (oracle backends need synthetic-suite records)"
            )


class OracleGenerator:
    """The synthetic suite's teacher: scene-grounded chains with injected errors."""

    def __init__(self, error_rate: float, style: str, seed: int, delay_s: float = 0.0):
        self.teacher = OracleTeacher(error_rate, style, seed)
        self.delay_s = delay_s
        self.stats = Stats()

    def generate(self, jobs: list[tuple[dict, int]]) -> Iterator[tuple[int, dict | None]]:
        for i, (query, sample) in enumerate(jobs):
            _need_scene(query)
            if self.delay_s:
                time.sleep(self.delay_s)
            yield i, self.teacher.chain(query, sample)


class OracleJudgeBackend:
    """Normalised answer match (the oracle judge)."""

    def __init__(self, seed: int = 0):
        self.judge = OracleJudge(seed)
        self.stats = Stats()

    def judge_many(self, requests: list[tuple[str, str, str]]) -> list[int]:
        return [self.judge.judge(q, gt, a)[0] for q, gt, a in requests]


class OracleScorerBackend:
    """Checks every claim of a chain against the scene (the oracle scorer)."""

    def __init__(self):
        self.scorer = OracleScorer()
        self.stats = Stats()

    def score_many(self, requests: list[tuple[dict, list]]) -> list[list[float | None]]:
        out = []
        for query, chains in requests:
            _need_scene(query)
            texts = [chain_steps_text(c) for c in chains]
            out.append([float(s) for s in self.scorer.score(query, texts)])
        return out


# ----------------------------------------------------------------- factory


def make_generator(cfg: PipelineConfig, seed: int):
    if cfg.generator == "oracle":
        return OracleGenerator(cfg.error_rate, cfg.oracle_style, seed, cfg.oracle_delay_s)
    if cfg.generator == "openai":
        from insightv_jax.pipeline.openai_backend import OpenAIGenerator

        return OpenAIGenerator(cfg, seed)
    from insightv_jax.pipeline.local_backend import LocalGenerator

    return LocalGenerator(cfg, seed)


def make_judge(cfg: PipelineConfig, seed: int):
    if cfg.judge == "oracle":
        return OracleJudgeBackend(seed)
    if cfg.judge == "openai":
        from insightv_jax.pipeline.openai_backend import OpenAIJudge

        return OpenAIJudge(cfg)
    from insightv_jax.pipeline.local_backend import LocalJudge

    return LocalJudge(cfg, seed)


def make_scorer(cfg: PipelineConfig, seed: int):
    if cfg.scorer == "oracle":
        return OracleScorerBackend()
    if cfg.scorer == "openai":
        from insightv_jax.pipeline.openai_backend import OpenAIScorer

        return OpenAIScorer(cfg)
    from insightv_jax.pipeline.local_backend import LocalScorer

    return LocalScorer(cfg, seed)
