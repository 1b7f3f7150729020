"""The `local` backend: our JAX models through the jitted sampler.

The generator runs progressive generation (docs/method.md) with decoding
constrained to the step schema, batched over questions × samples (the N
samples of a question share one prefill); the judge and the scorer are
free-text generations parsed like remote replies. Images go to the model when
it is a VLM (the query's image file); a text-only model gets the question only.
`stats["sampler_ms"]` is the time inside the sampler's prefill/decode calls, so
`1 - sampler_ms / total` is the share of time spent outside the jitted sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterator

import jax

from insightv_jax.config import ConfigError, PipelineConfig
from insightv_jax.data.prompts import judge_prompt, scorer_prompt
from insightv_jax.data.synthetic.oracle import parse_verdict
from insightv_jax.pipeline.backend_common import (
    VERDICT,
    Stats,
    chain_steps_text,
    job_seed,
    parse_scores,
    parse_step,
)
from insightv_jax.sample.constrain import StepConstraint
from insightv_jax.sample.infer import load_agent
from insightv_jax.sample.reasoning import progressive_generate
from insightv_jax.sample.sampler import SamplingParams

CHUNK = 64  # rows per judge/scorer generate call


@functools.lru_cache(maxsize=4)
def _load(path: str):
    return load_agent(path)


def agent(path: str | None, role: str):
    """The sampler of a role's checkpoint (loaded once per path)."""
    if path is None:
        raise ConfigError(f"pipeline.{role}_checkpoint is not set (the local {role}'s model)")
    return _load(path)


def _timed(sampler, stats: Stats):
    """Wrap the sampler's device calls so their (blocking) time goes to `stats`."""
    sampler._pipeline_stats = stats
    if getattr(sampler, "_pipeline_timed", False):
        return sampler
    for name in ("extend", "decode"):
        fn = getattr(sampler, name)

        def wrapped(*args, _fn=fn, **kw):
            t0 = time.perf_counter()
            out = jax.block_until_ready(_fn(*args, **kw))
            sampler._pipeline_stats.add("sampler_ms", round(1000 * (time.perf_counter() - t0)))
            return out

        setattr(sampler, name, wrapped)
    sampler._pipeline_timed = True
    return sampler


def _images(sampler, query: dict) -> list:
    takes_images = getattr(getattr(sampler.encoder, "model_cfg", None), "takes_images", False)
    return [query["image_path"]] if takes_images and query.get("image_path") else []


class LocalGenerator:
    """Constrained progressive generation with a local checkpoint."""

    def __init__(self, cfg: PipelineConfig, seed: int, sampler=None):
        self.cfg, self.seed = cfg, seed
        self.stats = Stats()
        self.sampler = _timed(sampler or agent(cfg.generator_checkpoint, "generator"), self.stats)
        self.constraint = StepConstraint(self.sampler.tokenizer)
        self.params = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.step_tokens,
        )  # fmt: skip

    def generate(self, jobs: list[tuple[dict, int]]) -> Iterator[tuple[int, dict | None]]:
        if not jobs:
            return
        t0 = time.perf_counter()
        order: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(jobs):
            order.setdefault(query["id"], []).append(i)
        queries = [jobs[idx[0]][0] for idx in order.values()]
        n = max(len(idx) for idx in order.values())
        seed = job_seed(self.seed, queries[0]["id"], jobs[0][1])
        samples = progressive_generate(
            self.sampler, [q["question"] for q in queries], n,
            dataclasses.replace(self.params, seed=seed), self.constraint,
            prompts=self.cfg.prompts, images=[_images(self.sampler, q) for q in queries],
            step_tokens=self.cfg.step_tokens, final_tokens=self.cfg.final_tokens,
        )  # fmt: skip
        self.stats.add("total_ms", round(1000 * (time.perf_counter() - t0)))
        for idx, per_query in zip(order.values(), samples):
            for i, s in zip(idx, per_query):
                bad = sum(parse_step(json.dumps(step)) is None for step in s.steps)
                self.stats.add("steps", len(s.steps))
                if bad:
                    self.stats.add("steps_invalid", bad)
                yield (
                    i,
                    {
                        "steps": s.steps,
                        "final_answer": s.final_answer or "",
                        "num_tokens": s.num_tokens,
                        "logprob": s.logprob,
                    },
                )


class _LocalText:
    """Free-text generation for one role (judge or scorer) in row chunks."""

    def __init__(self, sampler, stats: Stats, temperature: float, top_p: float, max_tokens: int,
                 seed: int):  # fmt: skip
        self.sampler = _timed(sampler, stats)
        stop = tuple(sampler.encoder.end_of_turn()) if sampler.encoder else ()
        self.params = SamplingParams(
            temperature=temperature, top_p=top_p, max_new_tokens=max_tokens,
            stop_token_ids=stop, seed=seed,
        )  # fmt: skip

    def replies(self, rows: list[tuple[str, list]]) -> list[str]:
        """One reply per (user text, images) row."""
        enc, out = self.sampler.encoder, []
        for start in range(0, len(rows), CHUNK):
            encoded = [
                enc.prompt([{"role": "user", "content": ("<image>\n" if ims else "") + text}], ims)
                for text, ims in rows[start : start + CHUNK]
            ]
            got = self.sampler.generate(
                [e.ids for e in encoded], self.params, **enc.images(encoded)
            )
            out += [g["text"] for g in got]
        return out


class LocalJudge:
    """Answer equivalence by a local model; unparseable -> 0, counted."""

    def __init__(self, cfg: PipelineConfig, seed: int, sampler=None):
        self.cfg, self.stats = cfg, Stats()
        sampler = sampler or agent(cfg.judge_checkpoint, "judge")
        self.text = _LocalText(sampler, self.stats, cfg.judge_temperature, cfg.judge_top_p,
                               cfg.judge_max_tokens, seed)  # fmt: skip

    def judge_many(self, requests: list[tuple[str, str, str]]) -> list[int]:
        if not requests:
            return []
        rows = [(judge_prompt(q, gt, a, self.cfg.prompts), []) for q, gt, a in requests]
        raw = self.text.replies(rows)
        unparsed = sum(not VERDICT.search(r) for r in raw)
        if unparsed:
            self.stats.add("judge_unparseable", unparsed)
        return [parse_verdict(r) for r in raw]


class LocalScorer:
    """All correct paths of a question in one prompt to a local model; missing -> None."""

    def __init__(self, cfg: PipelineConfig, seed: int, sampler=None):
        self.cfg, self.stats = cfg, Stats()
        self.sampler = sampler or agent(cfg.scorer_checkpoint, "scorer")
        self.text = _LocalText(self.sampler, self.stats, cfg.scorer_temperature, 1.0,
                               cfg.scorer_max_tokens, seed)  # fmt: skip

    def score_many(self, requests: list[tuple[dict, list]]) -> list[list[float | None]]:
        if not requests:
            return []
        rows = [
            (
                scorer_prompt(
                    q["question"],
                    q["answer"],
                    [chain_steps_text(c) for c in chains],
                    self.cfg.prompts,
                ),  # fmt: skip
                _images(self.sampler, q),
            )
            for q, chains in requests
        ]
        out = []
        for (_, chains), raw in zip(requests, self.text.replies(rows)):
            scores = parse_scores(raw, len(chains))
            missing = sum(s is None for s in scores)
            if missing:
                self.stats.add("scores_missing", missing)
            out.append(scores)
        return out
