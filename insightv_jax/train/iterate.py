"""Iterative preference optimisation of the reasoning agent (docs/method.md §3, §5).

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
  refill_<k>/        RL with `rl.dynamic_sampling`: extra draw k of fresh questions
                     (questions.json and the sampling stages' files of its own)
Every stage is skipped when its file exists, so a restart continues the
unfinished round (the update resumes from its latest checkpoint). An RL update
hands the model it trained to the next round's sampler in memory (`hand_over`);
a restarted run reads it back from the round's `policy/`.

The update is looked up in `UPDATES` by name, so an on-policy update (GRPO on
the samples' rewards and log-probs) can sit beside DPO. Stages 1, 2 and 5 (what
a round does with its policy's samples) are in train/rollouts.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

from insightv_jax.config import ConfigError, RunConfig
from insightv_jax.jsonl import read_jsonl, write_jsonl
from insightv_jax.train.dpo import train_dpo
from insightv_jax.train.rollouts import (
    assess,
    chain_conversations,
    eval_item,
    heldout_accuracy,
    sample_chain_groups,
    sample_chains,
)

__all__ = [
    "UPDATES",
    "Iteration",
    "assess",
    "chain_conversations",
    "dpo_update",
    "eval_item",
    "format_table",
    "heldout_accuracy",
    "load_items",
    "policy_of",
    "question_block",
    "round_dir",
    "round_questions",
    "round_row",
    "run_iterate",
    "sample_chains",
]


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


def round_agent(cfg: RunConfig, t: int) -> str:
    """Which agent an RL round t trains: `rl.agent`, and for "both" the reasoning
    agent in odd rounds, the summary agent in even ones (the self-improving loop:
    each agent learns against the other's latest version)."""
    if cfg.rl.agent == "both":
        return "reason" if t % 2 else "summary"
    return cfg.rl.agent


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


def refill_questions(cfg: RunConfig, dd: Path, t: int, k: int, items: list[dict],
                     all_items: list[dict]) -> list[dict]:  # fmt: skip
    """Extra draw k (1-based) of round t's DAPO refill (`rl.dynamic_sampling`):
    positions (k−1)·n … k·n − 1 (n = len(`items`), the round's first draw) of a
    seeded order, one per round, of the questions not in that first draw — fresh
    questions for this round, the same ones when a resumed round draws again (they
    are also recorded in `dd/questions.json` and read back from there). Fewer, or
    none, when that order runs out."""
    path = dd / "questions.json"
    by_id = {it["id"]: it for it in all_items}
    if path.exists():
        ids = json.loads(path.read_text())["ids"]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ConfigError(f"{path}: question {missing[0]} is not in {cfg.dpo.questions}")
        return [by_id[i] for i in ids]
    first = {it["id"] for it in items}
    order = [it["id"] for it in all_items if it["id"] not in first]
    random.Random(f"refill/{cfg.dpo.question_seed}/{t}").shuffle(order)
    n = len(items)
    ids = order[(k - 1) * n : k * n]
    if ids:
        dd.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"question_seed": cfg.dpo.question_seed, "draw": k, "ids": ids})
    return [by_id[i] for i in ids]


# ------------------------------------------------------------ 4. update


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
    cfg: RunConfig, rounds: int | None = None, judge=None, scorer=None, print_fn=print,
    update: str = "dpo", eval_sampling: dict | None = None,
) -> list[dict]:  # fmt: skip
    """Run (or continue) rounds 1..T under `train.workdir`; returns the summary rows.

    `judge`/`scorer` default to the `pipeline:` section's backends
    (`pipeline.backends.make_judge/make_scorer`); `update` is "dpo" (pairs, then
    DPO) or "rl" (the samples' rewards, then the `rl.algorithm` update:
    train/rl/update.py). `eval_sampling` (`dpo:` sampling fields) sets how the
    held-out questions are decoded when it differs from the rounds' sampling.
    """
    from insightv_jax.pipeline.backends import make_judge, make_scorer

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
    summary_path = d.summary or cfg.train.init
    it = Iteration(_with_agent_prompts(cfg, summary_path), run, root, all_items, held_out,
                   judge, scorer, summary_path, print_fn, update, eval_sampling)  # fmt: skip
    if held_out:
        _heldout(run / "eval_init.json", it.evaluate(cfg.train.init))
    rows = []
    for t in range(1, rounds + 1):
        done = round_dir(run, t) / "summary.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        rows.append(it.round(t))
        write_scalars(run / "tb", rows[-1])
        print_fn(format_table(rows, run, RL_COLUMNS if update == "rl" else COLUMNS))
    return rows


def write_scalars(tb_dir: Path, row: dict) -> None:
    """A finished round's numbers as TensorBoard scalars `round/<name>` at step t."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tb_dir)) as writer:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                writer.add_scalar(f"round/{key}", value, row["round"])


def _with_agent_prompts(cfg: RunConfig, summary_path: str) -> RunConfig:
    """`cfg` with the agents' own wording (their prompts.json) unless the config sets
    other prompts."""
    from insightv_jax.checkpoint import agent_prompts

    prompts = agent_prompts(cfg.pipeline.prompts, cfg.train.init, summary_path)
    return dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, prompts=prompts))


@dataclasses.dataclass
class Iteration:
    """What the rounds of a run share: the config (with the agents' prompts), the run
    directory, the questions and their image root, the held-out questions, the judge
    and scorer, the summary agent, and the agents loaded so far (by path)."""

    cfg: RunConfig
    run: Path
    root: Path
    all_items: list[dict]
    held_out: list[dict]
    judge: object
    scorer: object
    summary_path: str
    print_fn: Callable[[str], None]
    update: str = "dpo"
    eval_sampling: dict | None = None
    agents: dict = dataclasses.field(default_factory=dict)

    def agent(self, path: str):
        """The sampler of the agent at `path`, loaded once. RL rounds load it onto the
        run's mesh (`cfg.mesh`), where their updates train: an agent an update hands
        over in memory (`hand_over`) and the same agent reloaded from its checkpoint
        after a restart are then the same weights on the same devices, and sample
        the same tokens."""
        from insightv_jax.sample.infer import load_agent

        if path not in self.agents:
            mesh = None
            if self.update == "rl":
                from insightv_jax.parallel import run_mesh

                mesh = run_mesh(self.cfg.mesh)
            self.agents[path] = load_agent(path, mesh)
        return self.agents[path]

    def hand_over(self, path: str, model) -> None:
        """Make `model` (None: nothing to do), which an update just trained and saved
        at `path`, the agent at `path`: the next round samples from its weights in
        memory rather than reading them back from disk."""
        from insightv_jax.sample.infer import load_agent

        if model is not None:
            self.agents[path] = load_agent(path, model=model)

    def evaluate(self, policy: str, summary: str | None = None) -> Callable[[], dict]:
        """Stage 5 for `policy` (with the summary agent `summary`, default the run's),
        to run when its held-out result is missing."""
        seed = self.cfg.seed + 999_983
        cfg = self.cfg
        if self.eval_sampling:
            cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, **self.eval_sampling))
        return lambda: heldout_accuracy(
            cfg, self.agent(policy), self.agent(summary or self.summary_path), self.held_out,
            self.judge, seed,
        )  # fmt: skip

    def summary_of(self, t: int) -> str:
        """The summary agent round t starts with: the one round t−1 ended with (RL of
        the summary agent changes it), else the run's."""
        if t > 1:
            prev = json.loads((round_dir(self.run, t - 1) / "summary.json").read_text())
            return prev.get("summary_out") or self.summary_path
        return self.summary_path

    def round(self, t: int) -> dict:
        """Round t, from its first unfinished stage; writes and returns its summary row."""
        cfg = self.cfg
        rd = round_dir(self.run, t)
        rd.mkdir(parents=True, exist_ok=True)
        items = round_questions(cfg, rd, t, self.all_items, self.print_fn)
        policy = policy_of(cfg, self.run, t)
        if self.update == "rl" and round_agent(cfg, t) == "summary":
            return self.summary_round(rd, t, items, policy, self.summary_of(t))
        samples = self.samples(rd, t, items, policy, self.summary_of(t))
        if self.update == "rl":
            return self.rl_round(rd, t, items, policy, samples)
        pairs_path, counts_path = self.pairs(rd, t, items, samples)
        if policy != self.summary_path:
            self.agents.pop(policy, None)  # free M_t while training
        chains = chain_conversations(items, samples, cfg.pipeline.prompts)
        policy_out, metrics = UPDATES["dpo"](
            cfg, rd, policy, pairs_path, self.root, self.print_fn, chains
        )
        row = round_row(t, policy, policy_out, items, samples, pairs_path, counts_path, metrics)
        if self.held_out:
            row.update(_heldout(rd / "eval.json", self.evaluate(policy_out)))
        _write_json(rd / "summary.json", row)
        return row

    def rl_round(self, rd: Path, t: int, items, policy: str, samples) -> dict:
        """Stage 4 as an on-policy update on the samples' rewards (train/rl/update.py),
        after DAPO's refill draws (`refill`) when `rl.dynamic_sampling` is on."""
        from insightv_jax.train.rl.update import rl_update

        summary = self.summary_of(t)
        items, samples = self.refill(
            rd, t, items, samples, lambda dd, extra, k: self.samples(dd, t, extra, policy,
                                                                     summary, draw=k),
        )  # fmt: skip
        if policy != summary:
            self.agents.pop(policy, None)  # free M_t while training
        policy_out, metrics, model = rl_update(
            self.cfg, rd, policy, items, samples, self.root, self.print_fn
        )
        self.hand_over(policy_out, model)
        row = {"round": t, "agent": "reason", "policy_in": policy, "policy_out": policy_out,
               "summary_out": summary, "questions": len(items), "samples": len(samples),
               "train_sample_accuracy": sum(s["correct"] for s in samples) / max(len(samples), 1),
               **metrics}  # fmt: skip
        if self.held_out:
            row.update(_heldout(rd / "eval.json", self.evaluate(policy_out, summary)))
        _write_json(rd / "summary.json", row)
        return row

    def summary_round(self, rd: Path, t: int, items, policy: str, summary: str) -> dict:
        """A J-GRPO round of the summary agent (train/rl/summary.py): chains from the
        reasoning agent `policy` (and `rl.given_chains`), `rl.group_size` answers per
        chain from `summary`, the judge's verdicts, the update."""
        from insightv_jax.train.rl.update import rl_update

        cfg = self.cfg
        samples = self.answer_samples(rd, t, items, policy, summary)
        items, samples = self.refill(
            rd, t, items, samples,
            lambda dd, extra, k: self.answer_samples(dd, t, extra, policy, summary, draw=k),
            agent="summary",
        )  # fmt: skip
        if summary != policy:
            self.agents.pop(summary, None)  # free the summary agent while training
        summary_out, metrics, model = rl_update(cfg, rd, summary, items, samples, self.root,
                                                self.print_fn, agent="summary")  # fmt: skip
        self.hand_over(summary_out, model)
        by_source: dict[str, list[bool]] = {}
        for s in samples:
            by_source.setdefault(s["source"], []).append(s["correct"])
        row = {"round": t, "agent": "summary", "policy_in": policy, "policy_out": policy,
               "summary_in": summary, "summary_out": summary_out, "questions": len(items),
               "samples": len(samples),
               "train_sample_accuracy": sum(s["correct"] for s in samples) / max(len(samples), 1),
               **{f"answer_accuracy_{k}": sum(v) / len(v) for k, v in by_source.items()},
               **metrics}  # fmt: skip
        if self.held_out:
            row.update(_heldout(rd / "eval.json", self.evaluate(policy, summary_out)))
        _write_json(rd / "summary.json", row)
        return row

    def answer_samples(self, rd: Path, t: int, items, policy: str, summary: str,
                       draw: int = 0) -> list[dict]:  # fmt: skip
        """A J-GRPO round's stages 1 and 2 in `rd` (draw `draw` of round t): chains from
        the reasoning agent `policy` and `rl.given_chains` (chains.jsonl), answers from
        the summary agent `summary` (generations.jsonl), judged (samples.jsonl)."""
        from insightv_jax.train.rl.summary import judge_answers, round_chains, sample_answer_groups

        cfg, seed = self.cfg, self.cfg.seed + 1000 * t
        chains_path, gens_path = rd / "chains.jsonl", rd / "generations.jsonl"
        samples_path = rd / "samples.jsonl"
        where = f"round {t}" + (f", refill draw {draw}" if draw else "")
        if not chains_path.exists():
            self.print_fn(f"{where}: {cfg.rl.summary_chains} reasoning chains x {len(items)} "
                          "questions for the summary agent")  # fmt: skip
            write_jsonl(chains_path, round_chains(cfg, self.agent(policy), items, seed))
        if not gens_path.exists():
            chains = read_jsonl(chains_path)
            self.print_fn(f"{where}: {cfg.rl.group_size} answers x {len(chains)} chains")
            write_jsonl(gens_path, sample_answer_groups(cfg, self.agent(summary), items, chains,
                                                        seed + 1))  # fmt: skip
        if not samples_path.exists():
            write_jsonl(samples_path, judge_answers(items, read_jsonl(gens_path), self.judge))
        return read_jsonl(samples_path)

    def refill(self, rd: Path, t: int, items: list[dict], samples: list[dict], draw: Callable,
               agent: str = "reason") -> tuple[list[dict], list[dict]]:  # fmt: skip
        """DAPO's dynamic sampling (`rl.dynamic_sampling`; off: `items`, `samples` as
        they are). The update drops groups whose rewards are all equal; while fewer
        groups carry a signal than the first draw has groups, and at most
        `rl.refill_draws` times, draw k takes fresh questions (`refill_questions`)
        and `draw(dir, questions, k)` samples and judges them in `rd/refill_<k>/`
        (stage files of their own, so a round killed mid-refill resumes at the draw
        it was in). Returns the round's questions and samples, draw after draw, each
        sample tagged with its `draw`."""
        from insightv_jax.train.rl.update import has_signal, round_rewards, update_seed

        rl = self.cfg.rl
        if not rl.dynamic_sampling:
            return items, samples
        G, first = rl.group_size, items
        target = len(samples) // G
        for k in range(1, rl.refill_draws + 1):
            rewards = round_rewards(samples, rl, update_seed(self.cfg, t), agent)[1]
            have = int(has_signal(rewards, G).sum())
            if have >= target:
                break
            extra = refill_questions(self.cfg, rd / f"refill_{k}", t, k, first, self.all_items)
            if not extra:
                self.print_fn(f"round {t}: no fresh questions left to refill {target - have} "
                              f"of {target} groups")  # fmt: skip
                break
            self.print_fn(f"round {t}: {have} of {target} groups carry a reward signal; "
                          f"refill draw {k}: {len(extra)} fresh questions")  # fmt: skip
            got = draw(rd / f"refill_{k}", extra, k)
            items, samples = items + extra, samples + [{**s, "draw": k} for s in got]
        return items, samples

    def samples(self, rd: Path, t: int, items: list[dict], policy: str,
                summary: str | None = None, draw: int = 0) -> list[dict]:  # fmt: skip
        """Stages 1 and 2: M_t's chains (generations.jsonl), judged and scored
        (samples.jsonl), in `rd` (draw `draw` of round t); the summary agent
        `summary` (default the run's) answers."""
        d = self.cfg.dpo
        seed = self.cfg.seed + 1000 * t
        gens_path, samples_path = rd / "generations.jsonl", rd / "samples.jsonl"
        if not gens_path.exists():
            where = f"round {t}" + (f", refill draw {draw}" if draw else "")
            self.print_fn(
                f"{where}: sampling {d.samples_per_question} chains x {len(items)} questions"
            )
            # RL's groups: one shared prefill per question, a key per chain
            sample = sample_chain_groups if self.update == "rl" else sample_chains
            gens = sample(self.cfg, self.agent(policy), self.agent(summary or self.summary_path),
                          items, d.samples_per_question, seed)  # fmt: skip
            write_jsonl(gens_path, gens)
        if not samples_path.exists():
            samples = assess(
                items, read_jsonl(gens_path), self.judge, self.scorer, d.floor_score, d.judge_by
            )
            write_jsonl(samples_path, samples)
        return read_jsonl(samples_path)

    def pairs(self, rd: Path, t: int, items: list[dict], samples: list[dict]) -> tuple[Path, Path]:
        """Stage 3: the round's preference pairs (pairs.jsonl) and their counts
        (pair_counts.json)."""
        from insightv_jax.pipeline.build import build_preference_pairs

        pairs_path, counts_path = rd / "pairs.jsonl", rd / "pair_counts.json"
        if not pairs_path.exists():
            by_query: dict[str, list[dict]] = {}
            for s in samples:
                by_query.setdefault(s["id"], []).append(s)
            pairs, counts = build_preference_pairs(
                items, by_query, self.cfg.dpo.min_gap, round=t, prompts=self.cfg.pipeline.prompts
            )
            _write_json(counts_path, counts)
            write_jsonl(pairs_path, pairs)
        return pairs_path, counts_path


def round_row(
    t: int, policy: str, policy_out: str, items, samples, pairs_path: Path, counts_path: Path,
    metrics: dict,
) -> dict:  # fmt: skip
    """Round t's row of the table (without the held-out accuracies)."""
    return {
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
        # the probe (train/dpo/probe.py round_probe), on the round's own pairs and chains
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


# the on-policy rounds' table (`insightv rl`)
RL_COLUMNS = (
    ("round", "round", 5, "d"),
    ("agent", "agent", 7, "s"),
    ("samples", "samples", 7, "d"),
    ("reward", "reward_mean", 6, ".3f"),
    ("std", "reward_std", 5, ".3f"),
    ("draws", "draws", 5, "d"),
    ("no_signal", "groups_without_signal", 9, "d"),
    ("dropped", "groups_dropped", 7, "d"),
    ("steps", "step", 5, "d"),
    ("loss", "loss", 7, "+.4f"),
    ("kl", "kl", 8, ".5f"),
    ("entropy", "entropy", 7, ".3f"),
    ("clip", "clip_fraction", 6, ".3f"),
    ("ratio1", "first_ratio_mean", 8, ".6f"),
    ("gap", "sampler_logp_gap", 7, ".4f"),
    ("len", "response_length_tokens", 6, ".1f"),
    ("2+steps", "multi_step_share", 7, ".3f"),
    ("val_chain_acc", "eval_chain_accuracy", 13, ".3f"),
    ("val_two_agent_acc", "eval_accuracy", 17, ".3f"),
    ("val_keep", "eval_keep", 8, ".3f"),
    ("val_rescue", "eval_rescue", 10, ".3f"),
)


def format_table(rows: list[dict], run: Path | None = None, columns=COLUMNS) -> str:
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

    lines = ["  ".join(f"{h:>{w}}" for h, _, w, _ in columns)]
    base = run / "eval_init.json" if run is not None else None
    if base is not None and base.exists():
        lines.append("  ".join(cell({"round": 0, **json.loads(base.read_text())}, *c[1:])
                               for c in columns))  # fmt: skip
    lines += ["  ".join(cell(r, *c[1:]) for c in columns) for r in rows]
    return "\n".join(lines)
