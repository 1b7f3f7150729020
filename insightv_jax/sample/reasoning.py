"""Progressive long-chain generation and two-agent inference.

Progressive generation (docs/method.md): a dialogue in which every assistant turn
is one JSON step. The N samples of a question share one prefill of the image
and prompt (the cache row is copied N times); each later turn only appends its
new tokens to the cache — the generated step is already there, so the next
user turn is the only thing encoded — instead of re-encoding the dialogue.

Two-agent inference (docs/method.md): the reasoning agent writes a chain inside
<thoughts>…</thoughts>; the summary agent reads question + chain and answers.

Prompts are rendered with the tokenizer's own chat template, so the same code
serves Llama-3, ChatML and the tiny presets' minimal template.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax
import numpy as np

from insightv_jax.data.prompts import DEFAULT_PROMPTS, Prompts, reasoning_question, summary_question
from insightv_jax.sample.constrain import StepConstraint
from insightv_jax.sample.prompting import EncodedPrompt, PromptEncoder
from insightv_jax.sample.sampler import Sampler, SamplingParams, next_pow2, row_keys

IMAGE_MARKER = "<image>"


def encoder_of(sampler: Sampler) -> PromptEncoder:
    """The sampler's prompt encoder (text-only from its tokenizer if none was set)."""
    enc = getattr(sampler, "encoder", None)
    if enc is None:
        enc = sampler.encoder = PromptEncoder(sampler.tokenizer)
    return enc


@dataclasses.dataclass
class ChainSample:
    """One sampled reasoning dialogue."""

    steps: list[dict]
    final_answer: str | None
    num_tokens: int
    logprob: float  # summed log-prob of all generated tokens
    raw_turns: list[str]


def generator_messages(question: str, prompts: Prompts, with_image: bool) -> list[dict]:
    """The first turns of the step dialogue (system, question, pre-filled reply)."""
    user = (IMAGE_MARKER + "\n" + question) if with_image else question
    return [
        {"role": "system", "content": prompts.generator_system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": prompts.generator_prefill},
    ]


def progressive_generate(
    sampler: Sampler,
    questions: Sequence[str],
    num_samples: int,
    params: SamplingParams,
    constraint: StepConstraint,
    prompts: Prompts = DEFAULT_PROMPTS,
    images: Sequence[Sequence] | None = None,
    step_tokens: int = 64,
    final_tokens: int = 48,
    reuse_cache: bool = True,
) -> list[list[ChainSample]]:
    """`num_samples` step dialogues for each question (greedy or sampled).

    `images[q]` lists question q's images (paths or PIL images; VLM agents).
    With `reuse_cache=False` every turn re-encodes the whole dialogue (the
    baseline the cache reuse is measured against). Returns samples per question.
    """
    tok, enc = sampler.tokenizer, encoder_of(sampler)
    Q, N = len(questions), num_samples
    B = Q * N
    images = images or [()] * Q
    encoded = [
        enc.prompt(generator_messages(q, prompts, bool(images[i])), images[i], name=f"question {i}")
        for i, q in enumerate(questions)
    ]
    glue_next, glue_final = enc.glue(prompts.next_step), enc.glue(prompts.final_answer)
    max_turns = prompts.max_steps + 1
    budget = max(len(e.ids) for e in encoded) + max_turns * (
        max(step_tokens, final_tokens) + max(len(glue_next), len(glue_final))
    )
    history: list[list[int]] = [list(encoded[b // N].ids) for b in range(B)]  # for re-encoding
    if reuse_cache:
        state = sampler.start(Q, budget, params.seed)
        state = sampler.extend(state, [e.ids for e in encoded], **enc.images(encoded))
        state = state.repeat_rows(N)
    phase = np.zeros(B, np.int32)  # 0: steps, 1: final answer due, 2: done
    samples = [ChainSample([], None, 0, 0.0, []) for _ in range(B)]
    for turn in range(max_turns):
        active = phase < 2
        if not active.any():
            break
        if not reuse_cache:  # the baseline: encode the whole dialogue again
            state = sampler.start(B, budget, params.seed + turn)
            state = sampler.extend(
                state, history, **enc.images([encoded[b // N] for b in range(B)])
            )
        starts = np.where(phase == 1, constraint.start_final, constraint.start_step)
        steps = final_tokens if (phase[active] == 1).all() else step_tokens
        state, out = sampler.decode(
            state,
            dataclasses.replace(params, seed=params.seed + turn),
            steps=steps,
            active=active,
            constraint=constraint,
            start_states=starts,
        )
        tokens, logprobs, nums = (
            np.asarray(x) for x in jax.device_get((out.tokens, out.logprobs, out.num_tokens))
        )
        chunks: list[list[int]] = []
        for b in range(B):
            if not active[b]:
                chunks.append([])
                continue
            gen = tokens[b, : nums[b]].tolist()
            text = tok.decode(gen, skip_special_tokens=False)
            s = samples[b]
            s.raw_turns.append(text)
            s.num_tokens += int(nums[b])
            s.logprob += float(logprobs[b, : nums[b]].sum())
            history[b] += gen
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:  # only if the budget cut a step short
                obj = {"title": "Error", "content": text, "next_action": "final_answer"}
            if phase[b] == 1:
                s.final_answer = str(obj.get("content", ""))
                phase[b] = 2
                chunks.append([])
                continue
            s.steps.append(obj)
            if obj.get("next_action") == "final_answer" or len(s.steps) >= prompts.max_steps:
                phase[b] = 1
                chunks.append(glue_final)
            else:
                chunks.append(glue_next)
            history[b] += chunks[-1]
        if reuse_cache and any(chunks):
            state = sampler.extend(state, chunks)
    return [samples[q * N : (q + 1) * N] for q in range(Q)]


# ------------------------------------------------------------- two agents


def extract_chain(text: str) -> str:
    """The reasoning between <thoughts> and </thoughts> (the whole text if the
    tags are missing; up to the end if the closing tag is)."""
    start = text.find("<thoughts>")
    body = text[start + len("<thoughts>") :] if start >= 0 else text
    end = body.find("</thoughts>")
    return (body[:end] if end >= 0 else body).strip()


def two_agent_answer(
    reasoner: Sampler,
    summarizer: Sampler,
    questions: Sequence[str],
    reason_params: SamplingParams,
    summary_params: SamplingParams,
    prompts: Prompts = DEFAULT_PROMPTS,
    images: Sequence[Sequence] | None = None,
) -> list[dict]:
    """Reasoning agent -> chain -> summary agent -> answer, for a batch.

    `images[i]` lists question i's images (empty for text-only questions).
    """
    images = images or [()] * len(questions)
    r_in = _reasoning_prompts(reasoner, questions, prompts, images)
    r_params = dataclasses.replace(
        reason_params, stop_strings=tuple(reason_params.stop_strings) + ("</thoughts>",)
    )
    r_out = generate_encoded(reasoner, r_in, r_params)
    # A chain is text: an `<image>` the reasoning agent wrote must not become a
    # second image placeholder in the summary prompt.
    chains = [extract_chain(r["text"]).replace(IMAGE_MARKER, "").strip() for r in r_out]
    s_out = summary_answer(summarizer, questions, chains, summary_params, prompts, images)
    return [
        {
            "question": q,
            "chain": c,
            "reasoning_text": r["text"],
            "answer": s["answer"],
            "chain_logprob": float(sum(r["logprobs"])),
            "chain_tokens": len(r["tokens"]),
        }
        for q, c, r, s in zip(questions, chains, r_out, s_out)
    ]


def sample_groups(
    sampler: Sampler,
    encoded: list[EncodedPrompt],
    num_samples: int,
    params: SamplingParams,
    keys: Sequence[int] | None = None,
) -> list[dict]:
    """`num_samples` continuations of each encoded prompt from ONE shared prefill
    per prompt (rows q·n … q·n + n − 1 continue prompt q), stopping at the end of
    the turn (whose token is dropped from `text`). With `keys` (one int per prompt)
    row (q, k) draws with the key of (params.seed, keys[q]·num_samples + k): the
    same continuations whatever batch the prompt is in. Rows as `Sampler.unpack`'s."""
    ends = tuple(encoder_of(sampler).end_of_turn())
    params = dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids) + ends)
    ids = [e.ids for e in encoded]
    state = sampler.start(
        len(ids), next_pow2(max(len(i) for i in ids), 8) + params.max_new_tokens, params.seed
    )
    state = sampler.extend(state, ids, **encoder_of(sampler).images(encoded))
    state = state.repeat_rows(num_samples)
    if keys is not None:
        rows = np.asarray(keys, np.int64)[:, None] * num_samples + np.arange(num_samples)
        state = state.replace(rng=row_keys(params.seed, rows.reshape(-1) % (1 << 32)))
    _, out = sampler.decode(state, params)
    rows = sampler.unpack(out, params)
    for r in rows:  # drop an end-of-turn token from the text, as generate_encoded does
        if r["tokens"] and r["tokens"][-1] in ends:
            r["text"] = sampler.tokenizer.decode(r["tokens"][:-1], skip_special_tokens=False)
    return rows


def sample_chains(
    reasoner: Sampler,
    questions: Sequence[str],
    num_samples: int,
    params: SamplingParams,
    prompts: Prompts = DEFAULT_PROMPTS,
    images: Sequence[Sequence] | None = None,
    keys: Sequence[int] | None = None,
) -> list[list[dict]]:
    """`num_samples` reasoning chains per question from one shared prefill per
    question (`sample_groups`, `keys` as there): `[question][sample] -> {"chain",
    "text", "tokens", "logprob"}` (the chain is the text inside <thoughts>, as the
    summary agent will read it; `logprob` is the sampler's, of the raw logits)."""
    images = images or [()] * len(questions)
    encoded = _reasoning_prompts(reasoner, questions, prompts, images)
    params = dataclasses.replace(params, stop_strings=tuple(params.stop_strings) + ("</thoughts>",))
    rows = sample_groups(reasoner, encoded, num_samples, params, keys)
    chains = [
        {
            "chain": extract_chain(r["text"]).replace(IMAGE_MARKER, "").strip(),
            "text": r["text"],
            "tokens": len(r["tokens"]),
            "logprob": float(sum(r["logprobs"])),
        }
        for r in rows
    ]
    n = num_samples
    return [chains[q * n : (q + 1) * n] for q in range(len(questions))]


def sample_answers(
    summarizer: Sampler,
    questions: Sequence[str],
    chains: Sequence[str],
    num_samples: int,
    params: SamplingParams,
    prompts: Prompts = DEFAULT_PROMPTS,
    images: Sequence[Sequence] | None = None,
    keys: Sequence[int] | None = None,
) -> list[list[dict]]:
    """`num_samples` summary-agent answers per (question, chain) from one shared
    prefill each (`sample_groups`, `keys` as there): `[prompt][sample] -> {"answer",
    "tokens", "logprob"}`."""
    rows = sample_groups(summarizer, _summary_prompts(summarizer, questions, chains, prompts,
                                                      images), num_samples, params, keys)  # fmt: skip
    # an answer is text: an `<image>` in it must not become an image placeholder when
    # it is trained on (train/rl/summary.py), as in a chain
    answers = [{"answer": r["text"].replace(IMAGE_MARKER, "").strip(), "tokens": len(r["tokens"]),
                "logprob": float(sum(r["logprobs"]))} for r in rows]  # fmt: skip
    n = num_samples
    return [answers[q * n : (q + 1) * n] for q in range(len(questions))]


def summary_answer(
    summarizer: Sampler,
    questions: Sequence[str],
    chains: Sequence[str],
    params: SamplingParams,
    prompts: Prompts = DEFAULT_PROMPTS,
    images: Sequence[Sequence] | None = None,
) -> list[dict]:
    """The summary agent's answers to `questions` given reasoning `chains`
    (text inside <thoughts>, from the reasoning agent or any other source)."""
    s_in = _summary_prompts(summarizer, questions, chains, prompts, images)
    return [
        {"answer": s["text"].strip(), "chain": c}
        for s, c in zip(generate_encoded(summarizer, s_in, params), chains)
    ]


def _summary_prompts(summarizer: Sampler, questions, chains, prompts: Prompts, images) -> list:
    """The summary agent's encoded user turns (question + chain, its trained wording)."""
    images = images or [()] * len(questions)
    enc = encoder_of(summarizer)
    return [
        enc.prompt(
            [{"role": "user", "content": _with_image(summary_question(q, c, prompts), images[i])}],
            images[i],
            f"question {i}",
        )
        for i, (q, c) in enumerate(zip(questions, chains))
    ]


def _reasoning_prompts(reasoner: Sampler, questions, prompts: Prompts, images) -> list:
    """The reasoning agent's encoded user turns (the question in its trained wording)."""
    enc = encoder_of(reasoner)
    return [
        enc.prompt(
            [{"role": "user", "content": _with_image(reasoning_question(q, prompts), images[i])}],
            images[i],
            f"question {i}",
        )
        for i, q in enumerate(questions)
    ]


def _with_image(text: str, images) -> str:
    return (IMAGE_MARKER + "\n" + text) if images else text


def generate_encoded(
    sampler: Sampler, encoded: list[EncodedPrompt], params: SamplingParams
) -> list[dict]:
    """Free-text generation for encoded prompts, stopping at the end of the turn."""
    enc = encoder_of(sampler)
    ends = tuple(enc.end_of_turn())
    params = dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids) + ends)
    ids = [e.ids for e in encoded]
    state = sampler.start(
        len(ids), next_pow2(max(len(i) for i in ids), 8) + params.max_new_tokens, params.seed
    )
    state = sampler.extend(state, ids, **enc.images(encoded))
    _, out = sampler.decode(state, params)
    results = sampler.unpack(out, params)
    for r in results:  # drop the end-of-turn token from the text
        if r["tokens"] and r["tokens"][-1] in ends:
            r["text"] = sampler.tokenizer.decode(r["tokens"][:-1], skip_special_tokens=False)
    return results
