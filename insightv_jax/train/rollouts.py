"""What a round of `insightv iterate` does with its policy's samples (train/iterate.py):
sample two-agent chains, judge and score them, word them as conversations for the
probe, and measure the held-out accuracies."""

from __future__ import annotations

import zlib

from insightv_jax.config import RunConfig
from insightv_jax.pipeline.assess import judge_and_score
from insightv_jax.pipeline.backend_common import thoughts

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


def question_key(item_id) -> int:
    """A question's random-key id: the CRC-32 of its id (stable across runs)."""
    return zlib.crc32(str(item_id).encode())


def sample_chain_groups(cfg: RunConfig, reasoner, summarizer, items: list[dict], n: int, seed: int):
    """`n` two-agent samples per item, the rows of `sample_chains`, for on-policy RL:
    the item's `n` chains come from ONE shared prefill (the image and prompt are
    encoded once), chain k of an item draws with the key of (seed, its id, k), so a
    rerun samples the same chains whatever the batching, and the summary agent
    answers from each chain with the `dpo.summary_*` settings."""
    from insightv_jax.sample.reasoning import sample_chains as reasoning_chains
    from insightv_jax.sample.reasoning import summary_answer
    from insightv_jax.sample.sampler import SamplingParams

    d = cfg.dpo
    per_call = max(1, d.sample_batch // n)  # questions per sampler call
    r = SamplingParams(d.reason_temperature, top_p=d.top_p, max_new_tokens=d.reason_max_tokens,
                       seed=seed)  # fmt: skip
    s = SamplingParams(d.summary_temperature, top_p=d.top_p,
                       max_new_tokens=d.summary_max_tokens, seed=seed + 1)  # fmt: skip
    out = []
    for start in range(0, len(items), per_call):
        chunk = items[start : start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))  # one compiled shape
        images = [[it["image_path"]] if it.get("image_path") else [] for it in padded]
        chains = reasoning_chains(
            reasoner, [it["question"] for it in padded], n, r, cfg.pipeline.prompts, images,
            keys=[question_key(it["id"]) for it in padded],
        )  # fmt: skip
        rows = [(it, k, c, im) for it, cs, im in zip(padded, chains, images)
                for k, c in enumerate(cs)]  # fmt: skip
        answers = summary_answer(
            summarizer, [it["question"] for it, *_ in rows], [c["chain"] for _, _, c, _ in rows],
            s, cfg.pipeline.prompts, [im for *_, im in rows],
        )  # fmt: skip
        for (it, k, c, _), a in list(zip(rows, answers))[: len(chunk) * n]:
            out.append({
                "id": it["id"], "sample": k, "chain": c["chain"], "answer": a["answer"],
                "logprob": c["logprob"], "tokens": c["tokens"],
            })  # fmt: skip
    return out


# ------------------------------------------------------------ 2. assess


def assess(items: list[dict], samples: list[dict], judge, scorer, floor: float,
           judge_by: str = "summary") -> list[dict]:  # fmt: skip
    """Samples + `correct` (judge), `score` (scorer; wrong = floor; None = unscored)
    and `reward` (= score, the per-sample reward an on-policy update would use).
    The judge checks the summary agent's answer (`judge_by="summary"`) or the
    chain's own final claim where it states one (`"claim"`, `dpo.judge_by`)."""
    from insightv_jax.eval.extract import chain_final_claim

    def answer_of(s: dict) -> str:
        claim = chain_final_claim(s["chain"]) if judge_by == "claim" else None
        return s["answer"] if claim is None else claim

    by_id = {it["id"]: it for it in items}
    correct, scores = judge_and_score(
        by_id, samples, judge, scorer, answer_of=answer_of, chain_of=lambda s: thoughts(s["chain"])
    )
    out = []
    for s, ok, score in zip(samples, correct, scores):
        score = (None if score is None else float(score)) if ok else float(floor)
        out.append({**s, "correct": ok, "score": score, "reward": score})
    return out


# ------------------------------------------------------------ 4. update: the probe's chains


def chain_conversations(items: list[dict], samples: list[dict], prompts) -> list[dict]:
    """The round's sampled chains as conversation records, worded as the pairs are
    (`build_preference_pairs`: the reasoning prompt, `<thoughts>` text): what the
    probe measures the KL between M_t and M_{t+1} on."""
    from insightv_jax.data.prompts import reasoning_question

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
    (`eval_chain_claimed`: the share that state one). The summary agent's
    confusion: `eval_keep`, its accuracy after a right chain, `eval_rescue`, after
    a wrong one (None when there is no such chain)."""
    from insightv_jax.eval.extract import chain_final_claim
    from insightv_jax.eval.harness import judge_chain

    samples = sample_chains(cfg, reasoner, summarizer, items, 1, seed)
    by_id = {it["id"]: it for it in items}
    verdicts = judge.judge_many(
        [(by_id[s["id"]]["question"], by_id[s["id"]]["answer"], s["answer"]) for s in samples]
    )
    right = [bool(judge_chain(eval_item(by_id[s["id"]]), s["chain"], None)) for s in samples]
    n = max(len(samples), 1)
    answered = [bool(v) for v in verdicts]
    kept = [a for a, c in zip(answered, right) if c]
    rescued = [a for a, c in zip(answered, right) if not c]
    return {
        "eval_accuracy": sum(answered) / n,
        "eval_chain_accuracy": sum(right) / n,
        "eval_chain_claimed": sum(chain_final_claim(s["chain"]) is not None for s in samples) / n,
        # the summary agent's confusion: right answers after a right / a wrong chain
        "eval_keep": sum(kept) / len(kept) if kept else None,
        "eval_rescue": sum(rescued) / len(rescued) if rescued else None,
    }
