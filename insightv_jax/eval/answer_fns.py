"""Answer functions from checkpoints (eval/harness.py runs them): one model
(direct, CoT), two agents, or the summary agent on given chains. An answer_fn maps
a batch of EvalItems to replies: text, or a dict with `answer` and the `chain`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from insightv_jax.eval.extract import chain_final_claim
from insightv_jax.eval.readers import EvalItem

AnswerFn = Callable[[list[EvalItem]], list]


def _images(items: Sequence[EvalItem]) -> list[list]:
    return [[it.image] if it.image is not None else [] for it in items]


def _generate(sampler, items: Sequence[EvalItem], params) -> list[str]:
    """One chat turn per item (`<image>\\n` + prompt) through Sampler.generate."""
    from insightv_jax.sample.reasoning import IMAGE_MARKER, encoder_of

    enc = encoder_of(sampler)
    encoded = [
        enc.prompt(
            [{"role": "user", "content": (IMAGE_MARKER + "\n" if im else "") + it.prompt}],
            im, f"{it.benchmark} id {it.id}",
        )
        for it, im in zip(items, _images(items))
    ]  # fmt: skip
    ends = tuple(enc.end_of_turn())
    params = dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids) + ends)
    outs = sampler.generate([e.ids for e in encoded], params, **enc.images(encoded))
    texts = []
    for o in outs:
        toks = o["tokens"][:-1] if o["tokens"] and o["tokens"][-1] in ends else o["tokens"]
        texts.append(sampler.tokenizer.decode(toks, skip_special_tokens=False).strip())
    return texts


def checkpoint_answer_fn(system, sampling, prompts=None, seed: int = 0) -> AnswerFn:
    """An answer_fn for a `SystemConfig` from its checkpoint(s); each call (batch)
    samples with its own seed."""
    from insightv_jax.sample.infer import load_agent
    from insightv_jax.sample.sampler import SamplingParams

    calls = iter(range(1 << 30))
    s = sampling
    if system.mode == "two_agent":
        from insightv_jax.checkpoint import agent_prompts
        from insightv_jax.sample.reasoning import two_agent_answer

        # each agent in the wording it was trained with, unless the config overrides it
        prompts = agent_prompts(prompts, system.reason, system.summary)
        reasoner, summarizer = load_agent(system.reason), load_agent(system.summary)
        rp = SamplingParams(temperature=s.reason_temperature, top_p=s.top_p,
                            max_new_tokens=s.reason_max_tokens)  # fmt: skip
        sp = SamplingParams(temperature=s.summary_temperature, top_p=s.top_p,
                            max_new_tokens=s.summary_max_tokens)  # fmt: skip

        def two_agent(items):
            k = seed + next(calls)
            outs = two_agent_answer(
                reasoner, summarizer, [it.prompt for it in items],
                dataclasses.replace(rp, seed=k),
                dataclasses.replace(sp, seed=k),
                prompts, images=_images(items),
            )  # fmt: skip
            replies = [{"answer": o["answer"], "chain": o["chain"]} for o in outs]
            return _with_chain_answers(summarizer, items, replies, sp, prompts)

        return two_agent
    if system.mode == "given_chain":
        return given_chain_answer_fn(system, sampling, prompts, seed)
    sampler = load_agent(system.model)
    temp = s.cot_temperature if system.mode == "cot" else s.direct_temperature
    tokens = s.cot_max_tokens if system.mode == "cot" else s.direct_max_tokens

    def one_model(items):
        params = SamplingParams(temperature=temp, top_p=s.top_p if temp > 0 else 1.0,
                                max_new_tokens=tokens, seed=seed + next(calls))  # fmt: skip
        return _generate(sampler, items, params)

    return one_model


def given_chain_answer_fn(system, sampling, prompts=None, seed: int = 0) -> AnswerFn:
    """The summary agent answering from chains read from `system.chains` (JSONL
    of {"id", "chain"}: e.g. deliberately corrupted chains, the robustness check).
    A row's optional "kind" ("text", "image" or null: where the chain's error is
    visible) comes back as each reply's `chain_kind`."""
    import json

    from insightv_jax.checkpoint import agent_prompts
    from insightv_jax.errors import DataError
    from insightv_jax.sample.infer import load_agent
    from insightv_jax.sample.reasoning import summary_answer
    from insightv_jax.sample.sampler import SamplingParams

    prompts = agent_prompts(prompts, None, system.summary)
    path = Path(system.chains or "")
    if not path.is_file():
        raise DataError(f"{system.name}: chains file {system.chains!r} not found")
    chains, kinds = {}, {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                chains[str(row["id"])] = str(row["chain"])
                kind = row.get("kind")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{path}:{n}: not a {{id, chain}} record ({e})") from None
            if kind is not None and not isinstance(kind, str):
                raise DataError(f"{path}:{n}: kind {kind!r} is not a string or null")
            kinds[str(row["id"])] = kind
    summarizer = load_agent(system.summary)
    s = sampling
    calls = iter(range(1 << 30))

    def answer(items):
        missing = [it.id for it in items if it.id not in chains]
        if missing:
            raise DataError(f"{path}: no chain for item {missing[0]}")
        params = SamplingParams(temperature=s.summary_temperature, top_p=s.top_p,
                                max_new_tokens=s.summary_max_tokens, seed=seed + next(calls))  # fmt: skip
        outs = summary_answer(
            summarizer, [it.prompt for it in items], [chains[it.id] for it in items], params,
            prompts, images=_images(items),
        )  # fmt: skip
        replies = [
            {"answer": o["answer"], "chain": o["chain"], "chain_kind": kinds[it.id]}
            for it, o in zip(items, outs)
        ]
        return _with_chain_answers(summarizer, items, replies, params, prompts)

    return answer


def _with_chain_answers(summarizer, items, replies: list[dict], params, prompts) -> list[dict]:
    """Add `chain_answer` to the replies whose chain states no answer of its own:
    the summary agent's greedy answer from that chain (same max tokens), by which
    `judge_chain` judges such a chain. A greedy summary's answer is that already."""
    from insightv_jax.data.prompts import DEFAULT_PROMPTS
    from insightv_jax.sample.reasoning import summary_answer

    todo = [i for i, r in enumerate(replies) if chain_final_claim(r["chain"]) is None]
    if not todo:
        return replies
    if params.temperature <= 0:
        greedy = [replies[i]["answer"] for i in todo]
    else:
        outs = summary_answer(
            summarizer, [items[i].prompt for i in todo], [replies[i]["chain"] for i in todo],
            dataclasses.replace(params, temperature=0.0, top_p=1.0),
            prompts or DEFAULT_PROMPTS, images=_images([items[i] for i in todo]),
        )  # fmt: skip
        greedy = [o["answer"] for o in outs]
    for i, text in zip(todo, greedy):
        replies[i] = {**replies[i], "chain_answer": text}
    return replies
