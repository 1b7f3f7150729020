"""Stage 2 (docs/method.md): judge every final answer, score the correct paths of
each question together, bucket them; wrong-answer paths get the floor score.

One record per query (key = query id) in `<out>/assess/shard-k-of-n.jsonl`:
{"id", "image", "question", "answer", "samples": [{"sample", "steps",
"final_answer", "chain", "correct", "score", "bucket"}]} where bucket is
high / mid / low (correct, by score), wrong, or unscored (correct, but the
scorer's reply gave it no score).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from insightv_jax.config import PipelineConfig, RunConfig
from insightv_jax.pipeline.backend_common import chain_steps_text
from insightv_jax.pipeline.backends import make_judge, make_scorer
from insightv_jax.pipeline.generate import load_queries, resolve_shard
from insightv_jax.pipeline.progress import Progress
from insightv_jax.pipeline.records import ShardWriter, my_share, read_shards, shard_path

SCORE_BUCKETS = ("high", "mid", "low", "wrong", "unscored")


def score_bucket(score: float | None, correct: bool, cfg: PipelineConfig) -> str:
    """Which of `SCORE_BUCKETS` a judged and scored sample falls in."""
    if not correct:
        return "wrong"
    if score is None:
        return "unscored"
    if score >= cfg.high_threshold:
        return "high"
    return "mid" if score >= cfg.mid_threshold else "low"


def judge_and_score(
    questions: dict[str, dict], samples: list[dict], judge, scorer, answer_of, chain_of
) -> tuple[list[bool], list[float | None]]:
    """The judge's verdict on every sample's answer, and the scorer's score of every
    correct one (None for a wrong sample, or where the scorer's reply gave none).

    `questions` maps a sample's `id` to its question record (question, answer, and
    what the scorer reads); `answer_of(sample)` is the answer judged and
    `chain_of(sample)` the chain scored. The judge sees the samples in order; the
    correct samples of one question are scored in one request, questions in the
    order their first correct sample comes. Shared by stage 2 (`assess_queries`)
    and the DPO rounds (train/iterate.py)."""
    verdicts = judge.judge_many(
        [
            (questions[s["id"]]["question"], questions[s["id"]]["answer"], answer_of(s))
            for s in samples
        ]
    )
    correct = [bool(v) for v in verdicts]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if correct[i]:
            groups.setdefault(s["id"], []).append(i)
    requests = [
        (questions[q], [chain_of(samples[i]) for i in group]) for q, group in groups.items()
    ]
    scores: list[float | None] = [None] * len(samples)
    for group, got in zip(groups.values(), scorer.score_many(requests)):
        for i, score in zip(group, got):
            scores[i] = score
    return correct, scores


def assess_queries(queries, samples_by_query, judge, scorer, cfg: PipelineConfig) -> list[dict]:
    """Judge and score a batch of queries; one assessed record per query."""
    flat = [s for q in queries for s in samples_by_query[q["id"]]]
    correct, scores = judge_and_score(
        {q["id"]: q for q in queries}, flat, judge, scorer,
        answer_of=lambda s: str(s["final_answer"] or ""), chain_of=lambda s: s["steps"],
    )  # fmt: skip
    assessed = {(s["id"], s["sample"]): (ok, score) for s, ok, score in zip(flat, correct, scores)}
    out = []
    for q in queries:
        samples = []
        for s in sorted(samples_by_query[q["id"]], key=lambda s: s["sample"]):
            ok, score = assessed[(q["id"], s["sample"])]
            score = score if ok else cfg.floor_score
            samples.append(
                {
                    "sample": s["sample"],
                    "steps": s["steps"],
                    "final_answer": s["final_answer"],
                    "chain": chain_steps_text(s["steps"]),
                    "correct": ok,
                    "score": score,
                    "bucket": score_bucket(score, ok, cfg),
                }
            )
        out.append(
            {
                "key": q["id"],
                "id": q["id"],
                "image": q.get("image"),
                "question": q["question"],
                "answer": q["answer"],
                "samples": samples,
            }
        )
    return out


def run_assess(cfg: RunConfig, judge=None, scorer=None, progress_file=None) -> dict:
    """Assess this process's share of the generated queries; returns a summary."""
    p = cfg.pipeline
    queries = load_queries(p.data)
    shard, num_shards = resolve_shard(p)
    samples_by_query = defaultdict(list)
    for rec in read_shards(Path(p.out) / "generate"):
        samples_by_query[rec["id"]].append(rec)
    mine = my_share(queries, shard, num_shards)
    complete = [q for q in mine if len(samples_by_query[q["id"]]) >= p.num_samples]
    incomplete = len(mine) - len(complete)
    if incomplete:
        print(
            f"assess: {incomplete} queries have fewer than {p.num_samples} samples "
            "(rerun generate); skipped",
            file=progress_file or sys.stderr,
        )
    judge = judge or make_judge(p, cfg.seed)
    scorer = scorer or make_scorer(p, cfg.seed)
    buckets: Counter = Counter()
    out = Path(p.out) / "assess"
    with ShardWriter(shard_path(out, shard, num_shards)) as writer:
        todo = [q for q in complete if q["id"] not in writer.done]
        progress = Progress("assess", len(complete), len(complete) - len(todo), file=progress_file)
        for start in range(0, len(todo), p.batch_size):
            chunk = todo[start : start + p.batch_size]
            for rec in assess_queries(chunk, samples_by_query, judge, scorer, p):
                writer.write(rec)
                buckets.update(s["bucket"] for s in rec["samples"])
                progress.update()
        progress.close()
    summary = {
        "shard": f"{shard}/{num_shards}",
        "questions": len(complete),
        "questions_assessed": len(todo),
        "questions_incomplete": incomplete,
        "buckets_this_run": {b: buckets.get(b, 0) for b in SCORE_BUCKETS},
        "judge_stats": judge.stats.as_dict(),
        "scorer_stats": scorer.stats.as_dict(),
    }
    stats_file = out / f"stats-{shard:05d}-of-{num_shards:05d}.json"
    stats_file.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
