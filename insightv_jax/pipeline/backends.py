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
synthetic suite, here), `openai` (openai_backend.py), `local` (local_backend.py);
`make_generator` / `make_judge` / `make_scorer` pick one per role. Every backend
counts its retries and failures in `stats` (what they share: backend_common.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from insightv_jax.config import PipelineConfig
from insightv_jax.data.synthetic.oracle import OracleJudge, OracleScorer
from insightv_jax.data.synthetic.teacher import OracleTeacher
from insightv_jax.errors import DataError
from insightv_jax.pipeline.backend_common import Stats, chain_steps_text
from insightv_jax.pipeline.local_backend import LocalGenerator, LocalJudge, LocalScorer
from insightv_jax.pipeline.openai_backend import OpenAIGenerator, OpenAIJudge, OpenAIScorer

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
        return OpenAIGenerator(cfg, seed)
    return LocalGenerator(cfg, seed)


def make_judge(cfg: PipelineConfig, seed: int):
    if cfg.judge == "oracle":
        return OracleJudgeBackend(seed)
    if cfg.judge == "openai":
        return OpenAIJudge(cfg)
    return LocalJudge(cfg, seed)


def make_scorer(cfg: PipelineConfig, seed: int):
    if cfg.scorer == "oracle":
        return OracleScorerBackend()
    if cfg.scorer == "openai":
        return OpenAIScorer(cfg)
    return LocalScorer(cfg, seed)
