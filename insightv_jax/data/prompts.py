"""The method's prompts in one place (METHOD.md §1, §2, §6), overridable by config.

`Prompts` is a frozen dataclass so a run config can replace any of them
(`prompts.summary_instruction=...`); the defaults follow the paper's design.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Prompts:
    # --- progressive long-chain generation (the generator) -------------------
    generator_system: str = (
        "You are an expert visual reasoner. Solve the problem about the image step by step. "
        "Reply with exactly ONE reasoning step per message, as a JSON object with the keys "
        '"title", "content" and "next_action" ("continue" or "final_answer"). '
        "Use at least two steps. Explore alternative readings, check your observations "
        "against the image and re-examine earlier steps before concluding."
    )
    generator_prefill: str = (
        "Understood. I will now think step by step, one JSON step per message, "
        "starting with the problem itself."
    )
    next_step: str = (
        "Continue with the next step. It must differ from the previous ones. "
        'Do not give the answer directly while next_action is "continue".'
    )
    final_answer: str = (
        'Now give the final answer as {"title": "FINAL ANSWER", "content": ...}, '
        "in the format the question asks for."
    )
    invalid_json: str = "Your reply was not valid JSON. Reply again with one valid JSON step."
    max_steps: int = 16

    # --- two-agent inference (METHOD.md §6) ----------------------------------
    reasoning_suffix: str = (
        "\n\nPerform step-by-step reasoning of the problem. Only provide the reasoning process."
    )
    summary_instruction: str = (
        "Below are a question about the image and a reasoning process written for it. "
        "Judge whether the reasoning is correct. If it is, summarise the answer from it; "
        "if it is not, answer the question yourself and ignore the reasoning. "
        "Answer directly, without stating your judgement."
    )

    # --- assessment (METHOD.md §2) -------------------------------------------
    judge: str = (
        "Decide whether the predicted answer means the same as the ground truth; the format "
        "may differ. Reply with [1] if it does and [0] if it does not.\n"
        "Question: {question}\nGround truth: {ground_truth}\nPredicted answer: {answer}\nVerdict:"
    )
    scorer: str = (
        "Here are a question about the image, its correct answer and {n} reasoning paths that "
        "reach it. Score each path from 1 to 100 for the accuracy of every step and its level "
        "of detail. Reply with one line per path: 'Path <k>: <score>'.\n"
        "Question: {question}\nCorrect answer: {ground_truth}\n{paths}"
    )


DEFAULT_PROMPTS = Prompts()


def reasoning_question(question: str, prompts: Prompts = DEFAULT_PROMPTS) -> str:
    """The reasoning agent's user turn (the `<image>` marker is added by the caller)."""
    return question + prompts.reasoning_suffix


def summary_question(question: str, chain: str, prompts: Prompts = DEFAULT_PROMPTS) -> str:
    """The summary agent's user turn for a reasoning chain (text inside <thoughts>)."""
    return (
        f"{prompts.summary_instruction}\n\nQUESTION: {question}\n"
        f"REASON PROCESS: <thoughts>\n{chain.strip()}\n</thoughts>"
    )


def judge_prompt(
    question: str, ground_truth: str, answer: str, prompts: Prompts = DEFAULT_PROMPTS
) -> str:
    return prompts.judge.format(question=question, ground_truth=ground_truth, answer=answer)


def scorer_prompt(
    question: str, ground_truth: str, paths: list[str], prompts: Prompts = DEFAULT_PROMPTS
) -> str:
    listed = "\n".join(f"Path {i + 1}:\n{p}" for i, p in enumerate(paths))
    return prompts.scorer.format(
        n=len(paths), question=question, ground_truth=ground_truth, paths=listed
    )
