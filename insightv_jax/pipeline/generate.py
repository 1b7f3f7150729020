"""Stage 1 (docs/method.md): N reasoning chains per query, appended to JSONL shards.

A record per (query id, sample index) — key "<id>#<sample>" — in
`<out>/generate/shard-k-of-n.jsonl`; a rerun skips the keys already written, so
the stage resumes after a kill. Process k of n takes every n-th query.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from insightv_jax.config import ConfigError, PipelineConfig, RunConfig
from insightv_jax.data.sources import BadRecord, open_source
from insightv_jax.data.synthetic.teacher import question_of
from insightv_jax.errors import DataError
from insightv_jax.pipeline.backends import make_generator
from insightv_jax.pipeline.progress import Progress
from insightv_jax.pipeline.records import ShardWriter, my_share, shard_path


def load_queries(path: str | Path | None) -> list[dict]:
    """Query records (id, question, answer, image, image_path, + the record's own keys)."""
    if path is None:
        raise ConfigError("pipeline.data is not set (the queries: a LLaVA .json or .jsonl file)")
    source = open_source(path)
    root = Path(source.root)
    out, seen = [], set()
    for i in range(len(source)):
        rec = source[i]
        if isinstance(rec, BadRecord):
            raise DataError(f"{path}: record {rec.id}: {rec.reason}")
        rid = rec.get("id")
        if not isinstance(rid, str) or not rid:
            raise DataError(f"{path}: record #{i} has no string 'id'")
        if rid in seen:
            raise DataError(f"{path}: duplicate record id {rid!r}")
        seen.add(rid)
        answer = rec.get("answer")
        if answer is None:
            gpt = [t["value"] for t in rec.get("conversations", []) if t.get("from") == "gpt"]
            answer = gpt[-1] if gpt else None
        if answer is None:
            raise DataError(f"{path}: record {rid} has no 'answer'")
        try:
            question = question_of(rec)
        except StopIteration:
            raise DataError(f"{path}: record {rid} has no question") from None
        image = rec.get("image")
        image_path = str(root / image) if isinstance(image, str) else None
        out.append({**rec, "question": question, "answer": str(answer), "image_path": image_path})
    return out


def resolve_shard(cfg: PipelineConfig) -> tuple[int, int]:
    """This process's (shard, num_shards): from the config, else from JAX."""
    if cfg.num_shards is not None:
        return cfg.shard, cfg.num_shards
    import jax

    return jax.process_index(), jax.process_count()


def sample_key(query_id: str, sample: int) -> str:
    return f"{query_id}#{sample}"


def generation_record(query: dict, sample: int, chain: dict) -> dict:
    rec = {
        "key": sample_key(query["id"], sample),
        "id": query["id"],
        "sample": sample,
        "image": query.get("image"),
        "question": query["question"],
        "answer": query["answer"],
        "steps": chain["steps"],
        "final_answer": chain["final_answer"],
    }
    rec.update({k: v for k, v in chain.items() if k not in ("steps", "final_answer")})
    return rec


def run_generate(cfg: RunConfig, generator=None, progress_file=None) -> dict:
    """Generate the missing samples of this process's queries; returns a summary."""
    p = cfg.pipeline
    queries = load_queries(p.data)
    shard, num_shards = resolve_shard(p)
    mine = my_share(queries, shard, num_shards)
    out = Path(p.out) / "generate"
    generator = generator or make_generator(p, cfg.seed)
    written = failed = 0
    with ShardWriter(shard_path(out, shard, num_shards)) as writer:
        todo = [
            q for q in mine
            if any(sample_key(q["id"], s) not in writer.done for s in range(p.num_samples))
        ]  # fmt: skip
        progress = Progress("generate", len(mine), len(mine) - len(todo), file=progress_file)
        t0 = time.perf_counter()
        for start in range(0, len(todo), p.batch_size):
            chunk = todo[start : start + p.batch_size]
            jobs = [
                (q, s) for q in chunk for s in range(p.num_samples)
                if sample_key(q["id"], s) not in writer.done
            ]  # fmt: skip
            left = _jobs_per_query(jobs)
            for i, chain in generator.generate(jobs):
                query, sample = jobs[i]
                if chain is None:
                    failed += 1
                    continue
                written += writer.write(generation_record(query, sample, chain))
                left[query["id"]] -= 1
                if left[query["id"]] == 0:
                    progress.update()
        seconds = time.perf_counter() - t0
        progress.close()
        resumed = writer.resumed
    summary = {
        "shard": f"{shard}/{num_shards}",
        "questions": len(mine),
        "questions_generated": len(todo),
        "samples_written": written,
        "samples_resumed": resumed,
        "samples_failed": failed,
        "seconds": round(seconds, 3),
        "questions_per_s": round(len(todo) / seconds, 2) if seconds > 0 else None,
        "backend": p.generator,
        "stats": generator.stats.as_dict(),
    }
    stats_file = out / f"stats-{shard:05d}-of-{num_shards:05d}.json"
    stats_file.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _jobs_per_query(jobs: list[tuple[dict, int]]) -> dict[str, int]:
    left: dict[str, int] = {}
    for q, _ in jobs:
        left[q["id"]] = left.get(q["id"], 0) + 1
    return left
