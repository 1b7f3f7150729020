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

BUCKETS = ("high", "mid", "low", "wrong", "unscored")


def bucket_of(score: float | None, correct: bool, cfg: PipelineConfig) -> str:
    if not correct:
        return "wrong"
    if score is None:
        return "unscored"
    if score >= cfg.high_threshold:
        return "high"
    return "mid" if score >= cfg.mid_threshold else "low"


def assess_queries(queries, samples_by_query, judge, scorer, cfg: PipelineConfig) -> list[dict]:
    """Judge and score a batch of queries; one assessed record per query."""
    flat = [(q, s) for q in queries for s in samples_by_query[q["id"]]]
    verdicts = judge.judge_many(
        [(q["question"], q["answer"], str(s["final_answer"] or "")) for q, s in flat]
    )
    correct = {(q["id"], s["sample"]): bool(v) for (q, s), v in zip(flat, verdicts)}
    requests, owners = [], []
    for q in queries:
        right = [s for s in samples_by_query[q["id"]] if correct[(q["id"], s["sample"])]]
        if right:
            requests.append((q, [s["steps"] for s in right]))
            owners.append(right)
    scores = {}
    for right, got in zip(owners, scorer.score_many(requests)):
        for s, score in zip(right, got):
            scores[(s["id"], s["sample"])] = score
    out = []
    for q in queries:
        samples = []
        for s in sorted(samples_by_query[q["id"]], key=lambda s: s["sample"]):
            k = (q["id"], s["sample"])
            ok = correct[k]
            score = scores.get(k) if ok else cfg.floor_score
            samples.append(
                {
                    "sample": s["sample"],
                    "steps": s["steps"],
                    "final_answer": s["final_answer"],
                    "chain": chain_steps_text(s["steps"]),
                    "correct": ok,
                    "score": score,
                    "bucket": bucket_of(score, ok, cfg),
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
        "buckets_this_run": {b: buckets.get(b, 0) for b in BUCKETS},
        "judge_stats": judge.stats.as_dict(),
        "scorer_stats": scorer.stats.as_dict(),
    }
    stats_file = out / f"stats-{shard:05d}-of-{num_shards:05d}.json"
    stats_file.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
