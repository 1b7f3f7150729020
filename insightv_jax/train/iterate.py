"""Iterative preference optimisation of the reasoning agent (METHOD.md §3, §5).

Round t (1-based) with policy M_t (`train.init` for t = 1):
  1. sample   N chains per question from M_t with the reasoning-agent prompt;
              the summary agent answers from each chain (two-agent inference)
  2. assess   the judge checks every answer; the scorer grades all correct
              chains of a question together, wrong ones get `dpo.floor_score`
  3. pairs    best correct vs worst chain (`pipeline.build.build_preference_pairs`)
  4. update   DPO of M_t on the pairs with reference M_t (reference log-probs
              precomputed once) -> M_{t+1}
  5. eval     two-agent accuracy of M_{t+1} on the held-out questions (optional)

Layout: `RUN/round_<t>/` is itself a run directory (config.yaml, tokenizer/,
processor/, checkpoints/<step>/) holding
  generations.jsonl  raw two-agent outputs (chain, answer, chain log-prob)
  samples.jsonl      + judge verdict, score and reward per sample
  pairs.jsonl        the round's preference pairs; pairs_ref.jsonl + ref_logps
  metrics.jsonl      DPO metrics per step; eval.json; summary.json (round done)
Every stage is skipped when its file exists, so a restart continues the
unfinished round (the update resumes from its latest checkpoint).

The update is looked up in `UPDATES` by name, so an on-policy update (GRPO on
the samples' rewards and log-probs) can sit beside DPO.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from insightv_jax.config import ConfigError, RunConfig
from insightv_jax.train.dpo import read_jsonl, train_dpo, write_jsonl


def round_dir(run: Path, t: int) -> Path:
    return run / f"round_{t}"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def policy_of(cfg: RunConfig, run: Path, t: int) -> str:
    """M_t: `train.init` for round 1, else the model round t−1 ended with."""
    if t == 1:
        return str(cfg.train.init)
    prev = round_dir(run, t - 1) / "summary.json"
    return json.loads(prev.read_text())["policy_out"]


def load_items(path: str | None, limit: int = 0) -> tuple[list[dict], Path]:
    """Question records (pipeline.generate.load_queries) and their image root."""
    from insightv_jax.data.sources import open_source
    from insightv_jax.pipeline.generate import load_queries

    if not path:
        raise ConfigError("dpo.questions: no question file given")
    items = load_queries(path)
    return (items[:limit] if limit else items), Path(open_source(path).root)


# ------------------------------------------------------------ 1. sample


def sample_chains(cfg: RunConfig, reasoner, summarizer, items: list[dict], n: int, seed: int):
    """`n` two-agent samples per item: [{id, sample, chain, answer, logprob, tokens}]."""
    from insightv_jax.sample.reasoning import two_agent_answer
    from insightv_jax.sample.sampler import SamplingParams

    d = cfg.dpo
    rows = [(item, k) for item in items for k in range(n)]
    out = []
    for b, start in enumerate(range(0, len(rows), d.sample_batch)):
        chunk = rows[start : start + d.sample_batch]
        padded = chunk + [chunk[-1]] * (d.sample_batch - len(chunk))  # one compiled shape
        r = SamplingParams(d.reason_temperature, top_p=d.top_p,
                           max_new_tokens=d.reason_max_tokens, seed=seed + 2 * b)  # fmt: skip
        s = SamplingParams(d.summary_temperature, top_p=d.top_p,
                           max_new_tokens=d.summary_max_tokens, seed=seed + 2 * b + 1)  # fmt: skip
        res = two_agent_answer(
            reasoner, summarizer, [it["question"] for it, _ in padded], r, s,
            prompts=cfg.pipeline.prompts,
            images=[[it["image_path"]] if it.get("image_path") else [] for it, _ in padded],
        )  # fmt: skip
        for (it, k), x in zip(chunk, res):
            out.append({
                "id": it["id"], "sample": k, "chain": x["chain"], "answer": x["answer"],
                "logprob": x["chain_logprob"], "tokens": x["chain_tokens"],
            })  # fmt: skip
    return out


# ------------------------------------------------------------ 2. assess


def assess(items: list[dict], samples: list[dict], judge, scorer, floor: float) -> list[dict]:
    """Samples + `correct` (judge), `score` (scorer; wrong = floor; None = unscored)
    and `reward` (= score, the per-sample reward an on-policy update would use)."""
    from insightv_jax.pipeline.backends import thoughts

    by_id = {it["id"]: it for it in items}
    verdicts = judge.judge_many(
        [(by_id[s["id"]]["question"], by_id[s["id"]]["answer"], s["answer"]) for s in samples]
    )
    out = [{**s, "correct": bool(v)} for s, v in zip(samples, verdicts)]
    groups: dict[str, list[dict]] = {}
    for s in out:
        s["score"] = float(floor)
        if s["correct"]:
            groups.setdefault(s["id"], []).append(s)
    requests = [(by_id[q], [thoughts(s["chain"]) for s in g]) for q, g in groups.items()]
    for g, scores in zip(groups.values(), scorer.score_many(requests)):
        for s, score in zip(g, scores):
            s["score"] = None if score is None else float(score)
    for s in out:
        s["reward"] = s["score"]
    return out


# ------------------------------------------------------------ 4. update


def dpo_update(cfg: RunConfig, rd: Path, policy: str, pairs_path: Path, root: Path, print_fn):
    """DPO of `policy` on the round's pairs (reference = policy); a run dir at `rd`."""
    n = len(read_jsonl(pairs_path))
    if n == 0 or (n < cfg.train.global_batch and not cfg.train.steps):
        print_fn(
            f"{rd.name}: {n} pairs (train.global_batch {cfg.train.global_batch}); no update this round"
        )
        return policy, {}
    train = dataclasses.replace(cfg.train, workdir=str(rd), init=policy)
    dpo = dataclasses.replace(cfg.dpo, ref_logps="precomputed", reference=None)
    metrics = train_dpo(dataclasses.replace(cfg, train=train, dpo=dpo), pairs_path, root, print_fn)
    if metrics.get("preempted"):
        raise SystemExit(f"{rd}: preempted; rerun to continue")
    return str(rd), metrics


UPDATES: dict[str, Callable] = {"dpo": dpo_update}


# ------------------------------------------------------------ 5. eval


def two_agent_accuracy(cfg, reasoner, summarizer, items, judge, seed: int) -> float:
    samples = sample_chains(cfg, reasoner, summarizer, items, 1, seed)
    by_id = {it["id"]: it for it in items}
    verdicts = judge.judge_many(
        [(by_id[s["id"]]["question"], by_id[s["id"]]["answer"], s["answer"]) for s in samples]
    )
    return sum(verdicts) / max(len(verdicts), 1)


# ------------------------------------------------------------ the driver


def run_iterate(
    cfg: RunConfig, rounds: int | None = None, judge=None, scorer=None, print_fn=print
) -> list[dict]:
    """Run (or continue) rounds 1..T under `train.workdir`; returns the summary rows.

    `judge`/`scorer` default to the `pipeline:` section's backends
    (`pipeline.backends.make_judge/make_scorer`).
    """
    from insightv_jax.pipeline.backends import make_judge, make_scorer
    from insightv_jax.pipeline.build import build_preference_pairs
    from insightv_jax.sample.infer import load_agent

    d = cfg.dpo
    rounds = rounds or d.rounds
    if not cfg.train.init:
        raise ConfigError("iterate: train.init must name the first policy (M_1)")
    run = Path(cfg.train.workdir)
    run.mkdir(parents=True, exist_ok=True)
    items, root = load_items(d.questions, d.questions_per_round)
    held_out = load_items(d.eval_data, d.eval_limit)[0] if d.eval_data else []
    judge = judge or make_judge(cfg.pipeline, cfg.seed)
    scorer = scorer or make_scorer(cfg.pipeline, cfg.seed)
    agents: dict[str, object] = {}

    def agent(path: str):
        if path not in agents:
            agents[path] = load_agent(path)
        return agents[path]

    summary_path = d.summary or cfg.train.init
    if held_out and not (run / "eval_init.json").exists():
        acc = two_agent_accuracy(cfg, agent(cfg.train.init), agent(summary_path), held_out,
                                 judge, cfg.seed + 999_983)  # fmt: skip
        _write_json(run / "eval_init.json", {"eval_accuracy": acc})
    rows = []
    for t in range(1, rounds + 1):
        rd = round_dir(run, t)
        done = rd / "summary.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        rd.mkdir(parents=True, exist_ok=True)
        policy = policy_of(cfg, run, t)
        seed = cfg.seed + 1000 * t
        gens_path, samples_path, pairs_path = (
            rd / "generations.jsonl",
            rd / "samples.jsonl",
            rd / "pairs.jsonl",
        )
        if not gens_path.exists():
            print_fn(
                f"round {t}: sampling {d.samples_per_question} chains x {len(items)} questions"
            )
            gens = sample_chains(cfg, agent(policy), agent(summary_path), items,
                                 d.samples_per_question, seed)  # fmt: skip
            write_jsonl(gens_path, gens)
        if not samples_path.exists():
            samples = assess(items, read_jsonl(gens_path), judge, scorer, d.floor_score)
            write_jsonl(samples_path, samples)
        samples = read_jsonl(samples_path)
        counts_path = rd / "pair_counts.json"
        if not pairs_path.exists():
            by_query: dict[str, list[dict]] = {}
            for s in samples:
                by_query.setdefault(s["id"], []).append(s)
            pairs, counts = build_preference_pairs(
                items, by_query, d.min_gap, round=t, prompts=cfg.pipeline.prompts
            )
            _write_json(counts_path, counts)
            write_jsonl(pairs_path, pairs)
        if policy != summary_path:
            agents.pop(policy, None)  # free M_t while training
        policy_out, metrics = UPDATES["dpo"](cfg, rd, policy, pairs_path, root, print_fn)
        row = {
            "round": t,
            "policy_in": policy,
            "policy_out": policy_out,
            "questions": len(items),
            "samples": len(samples),
            "sample_accuracy": sum(s["correct"] for s in samples) / max(len(samples), 1),
            "pairs": len(read_jsonl(pairs_path)),
            "pair_counts": json.loads(counts_path.read_text()) if counts_path.exists() else {},
            "reward_accuracy": metrics.get("reward_accuracy"),
            "reward_margin": metrics.get("reward_margin"),
            "steps": metrics.get("step", 0),
        }
        if held_out:
            eval_path = rd / "eval.json"
            if not eval_path.exists():
                acc = two_agent_accuracy(cfg, agent(policy_out), agent(summary_path), held_out,
                                         judge, cfg.seed + 999_983)  # fmt: skip
                _write_json(eval_path, {"eval_accuracy": acc})
            row["eval_accuracy"] = json.loads(eval_path.read_text())["eval_accuracy"]
        _write_json(done, row)
        rows.append(row)
        print_fn(format_table(rows, run))
    return rows


def format_table(rows: list[dict], run: Path | None = None) -> str:
    """The per-round summary: pairs built, reward accuracy, eval accuracy."""

    def fmt(x):
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    lines = ["round  samples  sample_acc  pairs  steps  reward_acc  margin  eval_acc"]
    base = run / "eval_init.json" if run is not None else None
    if base is not None and base.exists():
        acc = json.loads(base.read_text())["eval_accuracy"]
        lines.append(f"{'0':>5}  {'-':>7}  {'-':>10}  {'-':>5}  {'-':>5}  {'-':>10}  {'-':>6}  "
                     f"{fmt(acc):>8}")  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['round']:>5}  {r['samples']:>7}  {fmt(r['sample_accuracy']):>10}  "
            f"{r['pairs']:>5}  {fmt(r['steps']):>5}  {fmt(r.get('reward_accuracy')):>10}  "
            f"{fmt(r.get('reward_margin')):>6}  {fmt(r.get('eval_accuracy')):>8}"
        )
    return "\n".join(lines)
