"""J-GRPO: an on-policy round of the SUMMARY agent (`rl.agent: summary | both`).

Insight-V++ trains the summary agent's judgement with RL but publishes no recipe;
this one is ours (docs/method.md §7 says so). A summary round of `insightv rl`:

  chains    per question, `rl.summary_chains` chains sampled from the CURRENT
            reasoning agent at `rl.temperature` (right and wrong ones), plus the
            question's chain from `rl.given_chains` when set (a JSONL of {id, chain},
            e.g. oracle chains with a deliberate error)      -> chains.jsonl
  answers   `rl.group_size` answers per (question, chain) from the summary agent
            at `rl.summary_temperature` (default `rl.temperature`), from one shared prefill per prompt, a key per
            answer                                             -> generations.jsonl
  rewards   the judge's verdict on each answer (1/0)          -> samples.jsonl
  update    the GRPO-family step of the summary agent (train/rl/update.py) on
            conversations worded as its SFT data: the summary prompt with the
            chain, the sampled answer
"""

from __future__ import annotations

from pathlib import Path

from insightv_jax.config import ConfigError, RunConfig
from insightv_jax.jsonl import read_jsonl
from insightv_jax.train.rollouts import question_key


def given_chains(path: str | None) -> dict[str, str]:
    """{question id: chain} from `rl.given_chains` (empty when unset)."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise ConfigError(f"rl.given_chains: {path} is not a file")
    out = {}
    for n, row in enumerate(read_jsonl(path), 1):
        if "id" not in row or "chain" not in row:
            missing = "id" if "id" not in row else "chain"
            raise ConfigError(f"rl.given_chains: {path}: record {n} has no {missing!r}")
        out[str(row["id"])] = str(row["chain"]).replace("<image>", "")  # text, not a placeholder
    return out


def round_chains(cfg: RunConfig, reasoner, items: list[dict], seed: int) -> list[dict]:
    """The round's (question, chain) prompts: [{id, chain_id, chain, source}] with
    source "policy" (the reasoning agent's samples) or "given"."""
    from insightv_jax.sample.reasoning import sample_chains
    from insightv_jax.sample.sampler import SamplingParams

    rl = cfg.rl
    n = rl.summary_chains
    params = SamplingParams(rl.temperature, top_p=rl.top_p, max_new_tokens=rl.max_response_tokens,
                            seed=seed)  # fmt: skip
    per_call = max(1, rl.sample_batch // n)
    out = []
    for start in range(0, len(items), per_call):
        chunk = items[start : start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))  # one compiled shape
        groups = sample_chains(
            reasoner, [it["question"] for it in padded], n, params, cfg.pipeline.prompts,
            [_images(it) for it in padded], keys=[question_key(it["id"]) for it in padded],
        )[: len(chunk)]  # fmt: skip
        for it, chains in zip(chunk, groups):
            for k, c in enumerate(chains):
                out.append({"id": it["id"], "chain_id": f"p{k}", "chain": c["chain"],
                            "source": "policy"})  # fmt: skip
    given = given_chains(rl.given_chains)
    for it in items:
        if str(it["id"]) in given:
            out.append({"id": it["id"], "chain_id": "g", "chain": given[str(it["id"])],
                        "source": "given"})  # fmt: skip
    return out


def _images(item: dict) -> list:
    return [item["image_path"]] if item.get("image_path") else []


def sample_answer_groups(cfg: RunConfig, summarizer, items: list[dict], chains: list[dict],
                         seed: int) -> list[dict]:  # fmt: skip
    """`rl.group_size` answers per chain prompt, rows {id, chain_id, source, chain,
    sample, answer, logprob, tokens} in contiguous groups of `rl.group_size`."""
    from insightv_jax.sample.reasoning import sample_answers
    from insightv_jax.sample.sampler import SamplingParams

    rl = cfg.rl
    G = rl.group_size
    by_id = {it["id"]: it for it in items}
    params = SamplingParams(rl.answer_temperature, top_p=rl.top_p,
                            max_new_tokens=cfg.dpo.summary_max_tokens, seed=seed)  # fmt: skip
    per_call = max(1, rl.sample_batch // G)
    out = []
    for start in range(0, len(chains), per_call):
        chunk = chains[start : start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))
        qs = [by_id[c["id"]] for c in padded]
        groups = sample_answers(
            summarizer, [q["question"] for q in qs], [c["chain"] for c in padded], G, params,
            cfg.pipeline.prompts, [_images(q) for q in qs],
            keys=[question_key(f"{c['id']}/{c['chain_id']}") for c in padded],
        )[: len(chunk)]  # fmt: skip
        for c, answers in zip(chunk, groups):
            for k, a in enumerate(answers):
                out.append({**c, "sample": k, **a})
    return out


def judge_answers(items: list[dict], samples: list[dict], judge) -> list[dict]:
    """Samples + `correct` (the judge's verdict) and `reward` (1.0 / 0.0)."""
    by_id = {it["id"]: it for it in items}
    verdicts = judge.judge_many(
        [(by_id[s["id"]]["question"], by_id[s["id"]]["answer"], s["answer"]) for s in samples]
    )
    return [{**s, "correct": bool(v), "reward": float(bool(v))} for s, v in zip(samples, verdicts)]


def answer_conversations(items: list[dict], samples: list[dict], prompts) -> list[dict]:
    """Each sampled answer as a conversation worded as the summary agent's SFT data
    (the summary prompt with the chain, then the answer): the tokens it is trained on."""
    from insightv_jax.data.prompts import summary_question

    by_id = {it["id"]: it for it in items}
    out = []
    for s in samples:
        item = by_id[s["id"]]
        user = summary_question(item["question"], s["chain"], prompts)
        rec = {
            "id": f"{s['id']}-{s['chain_id']}-s{s['sample']}",
            "conversations": [
                {"from": "human", "value": f"<image>\n{user}" if item.get("image") else user},
                {"from": "gpt", "value": s["answer"]},
            ],
        }
        if item.get("image"):
            rec["image"] = item["image"]
        out.append(rec)
    return out
