"""Iterative preference optimisation of the reasoning agent (METHOD.md §3, §5).

Round t (1-based) with policy M_t (`train.init` for t = 1):
  0. questions  the t-th block of `dpo.questions_per_round` questions in a seeded
              permutation (`dpo.question_seed`) of the question file: fresh
              questions every round, wrapping around when the file runs out
  1. sample   N chains per question from M_t with the reasoning-agent prompt;
              the summary agent answers from each chain (two-agent inference)
  2. assess   the judge checks every answer; the scorer grades all correct
              chains of a question together, wrong ones get `dpo.floor_score`
  3. pairs    best correct vs worst chain (`pipeline.build.build_preference_pairs`)
  4. update   DPO of M_t on the pairs with reference M_t (reference log-probs
              precomputed once) -> M_{t+1}; the probe compares M_t and M_{t+1}
              on the pairs and on the round's sampled chains (`dpo.round_probe`)
  5. eval     on the held-out questions (optional): the chain accuracy of M_{t+1}
              (each chain's own final claim) and the two-agent accuracy

Layout: `RUN/round_<t>/` is itself a run directory (config.yaml, tokenizer/,
processor/, checkpoints/<step>/) holding
  questions.json     the round's question ids (a resumed round reuses them)
  generations.jsonl  raw two-agent outputs (chain, answer, chain log-prob)
  samples.jsonl      + judge verdict, score and reward per sample
  pairs.jsonl        the round's preference pairs; pairs_ref.jsonl + ref_logps
  metrics.jsonl      DPO metrics per step; probe.json; eval.json;
  summary.json       the round's row of the table (written when the round is done)
Every stage is skipped when its file exists, so a restart continues the
unfinished round (the update resumes from its latest checkpoint).

The update is looked up in `UPDATES` by name, so an on-policy update (GRPO on
the samples' rewards and log-probs) can sit beside DPO.
"""

from __future__ import annotations

import dataclasses
import json
import random
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


# ------------------------------------------------------------ 0. questions


def question_block(n: int, t: int, per_round: int, seed: int) -> tuple[list[int], bool]:
    """Round t's (1-based) question indices: positions (t−1)·k … t·k − 1 of a
    seeded permutation of `n` questions, taken modulo n (k = `per_round`, all n
    when 0 or larger), and whether the block wrapped past the permutation's end
    (so it repeats questions an earlier round had)."""
    k = min(per_round or n, n)
    order = list(range(n))
    random.Random(f"questions/{seed}").shuffle(order)
    start = (t - 1) * k
    return [order[(start + i) % n] for i in range(k)], k < n and start + k > n


def round_questions(cfg: RunConfig, rd: Path, t: int, items: list[dict], print_fn) -> list[dict]:
    """The round's questions: read back from `rd/questions.json` when the round
    was started before, else `question_block` (recorded there)."""
    d = cfg.dpo
    path = rd / "questions.json"
    gens = rd / "generations.jsonl"
    if path.exists():
        ids = json.loads(path.read_text())["ids"]
    elif gens.exists():  # sampled before the block was recorded: what was sampled
        ids = list(dict.fromkeys(g["id"] for g in read_jsonl(gens)))
    else:
        idx, wrapped = question_block(len(items), t, d.questions_per_round, d.question_seed)
        if wrapped:
            print_fn(
                f"round {t}: the {len(items)} questions of {d.questions} ran out at "
                f"{len(idx)} a round; the block wraps around to questions used before"
            )
        ids = [items[i]["id"] for i in idx]
    if not path.exists():
        _write_json(path, {"question_seed": d.question_seed, "ids": ids})
    by_id = {it["id"]: it for it in items}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ConfigError(f"{path}: question {missing[0]} is not in {d.questions}")
    return [by_id[i] for i in ids]


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


def chain_conversations(items: list[dict], samples: list[dict], prompts) -> list[dict]:
    """The round's sampled chains as conversation records, worded as the pairs are
    (`build_preference_pairs`: the reasoning prompt, `<thoughts>` text): what the
    probe measures the KL between M_t and M_{t+1} on."""
    from insightv_jax.data.prompts import reasoning_question
    from insightv_jax.pipeline.backends import thoughts

    by_id = {it["id"]: it for it in items}
    out = []
    for s in samples:
        item = by_id[s["id"]]
        user = reasoning_question(item["question"], prompts)
        rec = {
            "id": f"{s['id']}-s{s['sample']}",
            "conversations": [
                {"from": "human", "value": f"<image>\n{user}" if item.get("image") else user},
                {"from": "gpt", "value": thoughts(s["chain"])},
            ],
        }
        if item.get("image"):
            rec["image"] = item["image"]
        out.append(rec)
    return out


def dpo_update(
    cfg: RunConfig, rd: Path, policy: str, pairs_path: Path, root: Path, print_fn, chains=None
):
    """DPO of `policy` on the round's pairs (reference = policy); a run dir at `rd`.
    `chains`: the round's sampled chains (`chain_conversations`) for the probe's KL.
    Returns (the policy after the round, the run's metrics and probe)."""
    n = len(read_jsonl(pairs_path))
    if n == 0 or (n < cfg.train.global_batch and not cfg.train.steps):
        gb = cfg.train.global_batch
        print_fn(f"{rd.name}: {n} pairs (train.global_batch {gb}); no update this round")
        return policy, {}
    train = dataclasses.replace(cfg.train, workdir=str(rd), init=policy)
    dpo = dataclasses.replace(cfg.dpo, ref_logps="precomputed", reference=None)
    metrics = train_dpo(
        dataclasses.replace(cfg, train=train, dpo=dpo), pairs_path, root, print_fn, chains
    )
    if metrics.get("preempted"):
        raise SystemExit(f"{rd}: preempted; rerun to continue")
    return str(rd), metrics


UPDATES: dict[str, Callable] = {"dpo": dpo_update}


# ------------------------------------------------------------ 5. eval


def eval_item(item: dict):
    """A question record as the eval harness's EvalItem: options parsed from the
    question when its answer is one of their letters; the kind inferred as
    `eval.readers` does (yes/no, numeric, open), so answers are scored alike."""
    from insightv_jax.eval.extract import parse_options
    from insightv_jax.eval.readers import EvalItem, infer_kind

    answer = str(item["answer"]).strip()
    options = parse_options(item["question"]) or None
    if options and answer.upper() not in options:
        options = None
    answer = answer.upper() if options else answer
    return EvalItem(str(item["id"]), item["question"], answer, options,
                    kind=infer_kind(answer, options))  # fmt: skip


def heldout_accuracy(cfg, reasoner, summarizer, items, judge, seed: int) -> dict:
    """One two-agent sample per held-out question: `eval_accuracy`, the judge's
    verdict on the summary agent's answers (two-agent accuracy), and
    `eval_chain_accuracy`, the reasoning agent's own: each chain's final claim
    (`chain_final_claim`) scored like the eval harness scores answers
    (`judge_chain`); a chain that states no answer counts as wrong
    (`eval_chain_claimed`: the share that state one)."""
    from insightv_jax.eval.extract import chain_final_claim
    from insightv_jax.eval.harness import judge_chain

    samples = sample_chains(cfg, reasoner, summarizer, items, 1, seed)
    by_id = {it["id"]: it for it in items}
    verdicts = judge.judge_many(
        [(by_id[s["id"]]["question"], by_id[s["id"]]["answer"], s["answer"]) for s in samples]
    )
    right = [bool(judge_chain(eval_item(by_id[s["id"]]), s["chain"], None)) for s in samples]
    n = max(len(samples), 1)
    return {
        "eval_accuracy": sum(map(bool, verdicts)) / n,
        "eval_chain_accuracy": sum(right) / n,
        "eval_chain_claimed": sum(chain_final_claim(s["chain"]) is not None for s in samples) / n,
    }


def _heldout(path: Path, evaluate: Callable[[], dict]) -> dict:
    """The held-out result in `path`, computed (and written) when missing or
    written before the chain accuracy was measured."""
    if path.exists():
        got = json.loads(path.read_text())
        if "eval_chain_accuracy" in got:
            return got
    got = evaluate()
    _write_json(path, got)
    return got


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
    all_items, root = load_items(d.questions)
    held_out = load_items(d.eval_data, d.eval_limit)[0] if d.eval_data else []
    judge = judge or make_judge(cfg.pipeline, cfg.seed)
    scorer = scorer or make_scorer(cfg.pipeline, cfg.seed)
    agents: dict[str, object] = {}

    def agent(path: str):
        if path not in agents:
            agents[path] = load_agent(path)
        return agents[path]

    summary_path = d.summary or cfg.train.init
    # the agents' own wording (their prompts.json) unless the config sets other prompts
    from insightv_jax.checkpoint import agent_prompts

    prompts = agent_prompts(cfg.pipeline.prompts, cfg.train.init, summary_path)
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, prompts=prompts))

    def evaluate(policy: str) -> Callable[[], dict]:
        return lambda: heldout_accuracy(cfg, agent(policy), agent(summary_path), held_out,
                                        judge, cfg.seed + 999_983)  # fmt: skip

    if held_out:
        _heldout(run / "eval_init.json", evaluate(cfg.train.init))
    rows = []
    for t in range(1, rounds + 1):
        rd = round_dir(run, t)
        done = rd / "summary.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        rd.mkdir(parents=True, exist_ok=True)
        items = round_questions(cfg, rd, t, all_items, print_fn)
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
        chains = chain_conversations(items, samples, cfg.pipeline.prompts)
        policy_out, metrics = UPDATES["dpo"](cfg, rd, policy, pairs_path, root, print_fn, chains)
        row = {
            "round": t,
            "policy_in": policy,
            "policy_out": policy_out,
            "questions": len(items),
            "samples": len(samples),
            # the summary agent's accuracy on M_t's chains for this round's TRAINING
            # questions: how the pairs came about, not a held-out score
            "train_sample_accuracy": sum(s["correct"] for s in samples) / max(len(samples), 1),
            "pairs": len(read_jsonl(pairs_path)),
            "pair_counts": json.loads(counts_path.read_text()) if counts_path.exists() else {},
            "steps": metrics.get("step", 0),
            "total_steps": metrics.get("total", 0),
            # the probe (train/dpo.py round_probe), on the round's own pairs and chains
            "pref_loss_start": metrics.get("pref_loss_start"),
            "pref_loss_end": metrics.get("pref_loss_end"),
            "dpo_loss_end": metrics.get("dpo_loss_end"),
            "reward_accuracy": metrics.get("reward_accuracy_end"),
            "reward_margin": metrics.get("reward_margin_end"),
            "logp_chosen_change": metrics.get("logp_chosen_change"),
            "logp_rejected_change": metrics.get("logp_rejected_change"),
            "kl_per_token": metrics.get("kl_per_token"),
            "kl_k3_per_token": metrics.get("kl_k3_per_token"),
        }
        if held_out:
            row.update(_heldout(rd / "eval.json", evaluate(policy_out)))
        _write_json(done, row)
        rows.append(row)
        print_fn(format_table(rows, run))
    return rows


# (header, row key, width, format) of the round table
COLUMNS = (
    ("round", "round", 5, "d"),
    ("samples", "samples", 7, "d"),
    ("train_sample_acc", "train_sample_accuracy", 16, ".3f"),
    ("pairs", "pairs", 5, "d"),
    ("steps", "steps", 5, "d"),
    ("loss_start", "pref_loss_start", 10, ".4f"),
    ("loss_end", "pref_loss_end", 8, ".4f"),
    ("dpo_end", "dpo_loss_end", 7, ".4f"),
    ("reward_acc", "reward_accuracy", 10, ".3f"),
    ("margin", "reward_margin", 7, "+.3f"),
    ("dlogp_chosen", "logp_chosen_change", 12, "+.2f"),
    ("kl/token", "kl_per_token", 9, ".5f"),
    ("k3/token", "kl_k3_per_token", 9, ".5f"),
    ("val_chain_acc", "eval_chain_accuracy", 13, ".3f"),
    ("val_two_agent_acc", "eval_accuracy", 17, ".3f"),
)


def format_table(rows: list[dict], run: Path | None = None) -> str:
    """The per-round summary. train_sample_acc: the summary agent's accuracy on the
    round's training questions (M_t's samples); loss_start/end: the preference loss
    (DPOP penalty included) on the round's pairs before the first / after the last
    update; dpo_end: the plain DPO term -log σ(β·Δ) after it; reward_acc,
    margin: at the end; dlogp_chosen: mean change of the chosen chains' log-prob;
    kl, k3: per-token KL(M_t‖M_t+1) on the round's sampled chains; val_*: held-out
    chain and two-agent accuracy after the round (round 0: M_1)."""

    def cell(row: dict, key: str, width: int, fmt: str) -> str:
        x = row.get(key)
        if key == "train_sample_accuracy" and x is None:
            x = row.get("sample_accuracy")  # the name rounds written before the rename used
        if x is None:
            return f"{'-':>{width}}"
        return f"{format(int(x) if fmt == 'd' else x, fmt):>{width}}"

    lines = ["  ".join(f"{h:>{w}}" for h, _, w, _ in COLUMNS)]
    base = run / "eval_init.json" if run is not None else None
    if base is not None and base.exists():
        lines.append("  ".join(cell({"round": 0, **json.loads(base.read_text())}, *c[1:])
                               for c in COLUMNS))  # fmt: skip
    lines += ["  ".join(cell(r, *c[1:]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)
