"""Stage 3 (docs/method.md): the training sets from the assessed chains.

Writes to `<out>/build/`:
  reasoning.json  best correct path per question -> `<thoughts>` (no answer)
  cot.json        the same chains + `<output>{answer}</output>` (CoT baseline)
  summary.json    (question, path of bucket high/mid/low/wrong) -> correct
                  answer, mixed with general QA, the reasoning agent's own chains
                  (`<out>/agent_chains/`, written by `insightv agent-chains`, if
                  present) and right chains given an arithmetic slip (`slip`:
                  an error the text itself shows) at `summary_mix` ratios
  pairs.jsonl     preference pairs, best vs worst (`build_preference_pairs`)
  manifest.json   counts, drop reasons and the image root of the sets
  prompts.json    the wording of the sets (SFT runs on them carry it on)
Image paths stay relative to the query file's folder (`data.image_root`).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from insightv_jax.config import SUMMARY_MIX_KEYS, PipelineConfig, RunConfig
from insightv_jax.data.pairs import make_pair
from insightv_jax.data.prompts import Prompts, reasoning_question, summary_question, write_prompts
from insightv_jax.data.sources import BadRecord, open_source
from insightv_jax.pipeline.backend_common import thoughts
from insightv_jax.pipeline.generate import load_queries
from insightv_jax.pipeline.records import read_shards

MIX_KEYS = SUMMARY_MIX_KEYS


def _user(query: dict, text: str) -> str:
    return f"<image>\n{text}" if query.get("image") else text


def _conversation(query: dict, rid: str, user: str, reply: str) -> dict:
    rec = {
        "id": rid,
        "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}],
    }
    if query.get("image"):
        rec["image"] = query["image"]
    return rec


def _best(samples: list[dict]) -> dict | None:
    """The highest-scored correct sample (lowest sample index on ties)."""
    scored = [s for s in samples if s["correct"] and s["score"] is not None]
    return max(scored, key=lambda s: (s["score"], -s["sample"])) if scored else None


def build_preference_pairs(
    items: list[dict],
    samples_by_query: dict[str, list[dict]],
    min_gap: float,
    round: int = 0,
    prompts: Prompts | None = None,
) -> tuple[list[dict], dict]:
    """Best-vs-worst preference pairs (docs/method.md) in data/pairs.py's format.

    `items`: queries (id, question, answer, optional image); each sample has
    `chain` (<thoughts> text or steps), `score` (wrong answers already at the
    floor; None = unscored, left out) and `correct`. chosen = the best correct
    chain, rejected = the worst chain; dropped when the gap is below `min_gap`
    (or not positive). The prompt is the reasoning agent's user turn, worded by
    `prompts` (the same wording the agent is trained and sampled with). Returns
    (pairs, counts of pairs and drop reasons).
    """
    counts = Counter()
    pairs = []
    for item in items:
        samples = samples_by_query.get(item["id"], [])
        scored = [s for s in samples if s.get("score") is not None]
        counts["unscored_samples"] += len(samples) - len(scored)
        if len(scored) < 2:
            counts["drop_too_few_samples"] += 1
            continue
        order = sorted(range(len(scored)), key=lambda i: (-scored[i]["score"], i))
        best, worst = scored[order[0]], scored[order[-1]]
        if not best["correct"]:
            counts["drop_no_correct"] += 1
            continue
        chosen, rejected = thoughts(best["chain"]), thoughts(worst["chain"])
        gap = float(best["score"]) - float(worst["score"])
        if chosen == rejected:
            counts["drop_identical"] += 1
            continue
        if gap <= 0 or gap < min_gap:
            counts["drop_gap"] += 1
            continue
        question = reasoning_question(item["question"], prompts or Prompts())
        prompt = [{"from": "human", "value": _user(item, question)}]
        pairs.append(
            make_pair(
                f"{item['id']}-r{round}",
                item.get("image"),
                prompt,
                chosen,
                rejected,
                str(item["answer"]),
                float(best["score"]),
                float(worst["score"]),
                round,
            )  # fmt: skip
        )
        counts["pairs"] += 1
    return pairs, dict(counts)


def _general_pool(cfg: PipelineConfig, queries: list[dict]) -> list[dict]:
    """General QA records: `general_data`, or every query answered directly."""
    if cfg.general_data is None:
        return [
            _conversation(q, f"{q['id']}-general", _user(q, q["question"]), q["answer"])
            for q in queries
        ]
    source = open_source(cfg.general_data)
    return [r for r in (source[i] for i in range(len(source))) if not isinstance(r, BadRecord)]


def _mix(pools: dict[str, list], weights: dict[str, float], rng: random.Random) -> dict:
    """Take `weight × unit` records from each pool, the unit being the largest the
    non-empty weighted pools allow (so ratios hold; empty pools are left out)."""
    live = {k: w for k, w in weights.items() if w > 0 and pools.get(k)}
    if not live:
        return {k: [] for k in pools}
    unit = min(len(pools[k]) / w for k, w in live.items())
    out = {}
    for k, recs in pools.items():
        n = min(len(recs), round(live.get(k, 0) * unit))
        out[k] = rng.sample(recs, n)
    return out


_ARITHMETIC = re.compile(r"(?<!\d)(?<!\d\.)(\d+) ([+-]) (\d+) = (\d+)(?!\d|\.\d)")


def arithmetic_slip(chain: str, rng: random.Random) -> str | None:
    """`chain` with its last arithmetic result off by one and the wrong value carried
    into the rest of the chain (as a real slip propagates to the answer), or None if
    the chain has no correct `a + b = c` / `a - b = c` step. The error is visible in
    the chain's own text: a summary agent can catch it without the image."""
    steps = list(_ARITHMETIC.finditer(chain))
    if not steps:
        return None
    m = steps[-1]
    a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
    if result != (a + b if op == "+" else a - b):
        return None
    wrong = result + rng.choice((-1, 1)) if result > 0 else result + 1
    later = re.sub(rf"(?<!\d)(?<!\d\.){result}(?!\d|\.\d)", str(wrong), chain[m.end(4) :])
    return chain[: m.start(4)] + str(wrong) + later


def _slip_pool(assessed: list[dict], by_id: dict, prompts: Prompts, seed: int) -> list[dict]:
    """(question, a right chain with an arithmetic slip) -> the correct answer: one per
    question whose best right chain has arithmetic (the summary agent learns to check
    what the text shows instead of copying the chain's answer)."""
    rng = random.Random(f"slip/{seed}")
    out = []
    for rec in assessed:
        best = _best(rec["samples"])
        slipped = arithmetic_slip(best["chain"], rng) if best else None
        if slipped is None:
            continue
        q = {**by_id.get(rec["id"], {}), "image": rec.get("image")}
        user = _user(q, summary_question(rec["question"], slipped, prompts))
        out.append(_conversation(q, f"{rec['id']}-slip", user, str(rec["answer"])))
    return out


def _agent_pool(agent_chains: list[dict], by_id: dict, prompts: Prompts) -> list[dict]:
    """(question, the reasoning agent's own chain, verbatim) -> the correct answer
    (docs/method.md: aligns the summary agent with the chains it will read)."""
    out = []
    for rec in sorted(agent_chains, key=lambda r: r["key"]):
        q = {**by_id.get(rec["id"], {}), "image": rec.get("image")}
        user = _user(q, summary_question(rec["question"], rec["chain"], prompts))
        out.append(_conversation(q, f"{rec['id']}-a{rec['sample']}", user, str(rec["answer"])))
    return out


def build_sets(
    assessed: list[dict],
    queries: list[dict],
    cfg: PipelineConfig,
    seed: int,
    agent_chains: list[dict] | None = None,
):
    """(reasoning, cot, summary, pairs, counts) from the assessed records and, when
    given, the reasoning agent's sampled chains (`insightv agent-chains`)."""
    prompts: Prompts = cfg.prompts
    by_id = {q["id"]: q for q in queries}
    assessed = sorted(assessed, key=lambda r: r["id"])
    reasoning, cot = [], []
    pools: dict[str, list] = {k: [] for k in MIX_KEYS}
    buckets: Counter = Counter()
    drops: Counter = Counter()
    for rec in assessed:
        q = {**by_id.get(rec["id"], {}), **{k: rec[k] for k in ("id", "question", "answer")}}
        q["image"] = rec.get("image")
        for s in rec["samples"]:
            buckets[s["bucket"]] += 1
            if s["bucket"] in pools:
                user = _user(q, summary_question(q["question"], s["chain"], prompts))
                rid = f"{q['id']}-s{s['sample']}"
                pools[s["bucket"]].append(_conversation(q, rid, user, q["answer"]))
        best = _best(rec["samples"])
        if best is None:
            drops["reasoning_no_correct_scored"] += 1
            continue
        user = _user(q, reasoning_question(q["question"], prompts))
        reasoning.append(_conversation(q, f"{q['id']}-reason", user, thoughts(best["steps"])))
        answer = f"{thoughts(best['steps'])}\n<output>{q['answer']}</output>"
        cot.append(_conversation(q, f"{q['id']}-cot", user, answer))
    pools["general"] = _general_pool(cfg, [by_id[r["id"]] for r in assessed if r["id"] in by_id])
    pools["agent"] = _agent_pool(agent_chains or [], by_id, prompts)
    if cfg.summary_mix.get("slip", 0) > 0:
        pools["slip"] = _slip_pool(assessed, by_id, prompts, seed)
    rng = random.Random(f"build/{seed}")
    mixed = _mix(pools, dict(cfg.summary_mix), rng)
    summary = [r for k in MIX_KEYS for r in mixed[k]]
    rng.shuffle(summary)
    samples_by_query = {
        r["id"]: [
            {"chain": s["chain"], "score": s["score"], "correct": s["correct"]}
            for s in r["samples"]
        ]
        for r in assessed
    }
    items = [{**by_id.get(r["id"], {}), **r} for r in assessed]
    pairs, pair_counts = build_preference_pairs(
        items, samples_by_query, cfg.min_gap, prompts=prompts
    )
    counts = {
        "questions": len(assessed),
        "buckets": {b: buckets.get(b, 0) for b in ("high", "mid", "low", "wrong", "unscored")},
        "reasoning": len(reasoning),
        "cot": len(cot),
        "summary": {k: len(mixed[k]) for k in MIX_KEYS},
        "summary_available": {k: len(pools[k]) for k in MIX_KEYS},
        "pairs": pair_counts,
        "drops": dict(drops),
        "agent_chains": {
            "chains": len(agent_chains or []),
            "right": sum(bool(r.get("correct")) for r in agent_chains or []),
        },
    }
    return reasoning, cot, summary, pairs, counts


def run_build(cfg: RunConfig) -> dict:
    """Merge the assessed shards and write the training sets; returns the counts."""
    p = cfg.pipeline
    queries = load_queries(p.data)
    assessed = read_shards(Path(p.out) / "assess")
    agent_dir = Path(p.out) / "agent_chains"
    agent_chains = read_shards(agent_dir) if any(agent_dir.glob("shard-*.jsonl")) else []
    reasoning, cot, summary, pairs, counts = build_sets(
        assessed, queries, p, cfg.seed, agent_chains
    )
    out = Path(p.out) / "build"
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("reasoning", reasoning), ("cot", cot), ("summary", summary)):
        (out / f"{name}.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False) + "\n")
    with open(out / "pairs.jsonl", "w") as f:
        for rec in pairs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    counts["image_root"] = str(Path(p.data).parent.resolve())
    (out / "manifest.json").write_text(json.dumps(counts, indent=1) + "\n")
    write_prompts(out, p.prompts)
    return counts


def format_table(counts: dict) -> str:
    """The build summary: counts per bucket, per set, and drop reasons."""
    rows = [("questions", counts["questions"])]
    rows += [(f"paths {b}", n) for b, n in counts["buckets"].items()]
    rows += [("reasoning set", counts["reasoning"]), ("cot set", counts["cot"])]
    rows += [
        (f"summary {k}", f"{n} of {counts['summary_available'][k]}")
        for k, n in counts["summary"].items()
    ]
    rows += [(f"pairs {k}", n) for k, n in sorted(counts["pairs"].items())]
    rows += [(f"drop {k}", n) for k, n in sorted(counts["drops"].items())]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
