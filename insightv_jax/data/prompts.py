"""The method's prompts in one place (docs/method.md §1, §5), overridable by config.

`Prompts` is a frozen dataclass so a run config can replace any of them
(`prompts.summary_instruction=...`); the defaults follow the paper's design.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from insightv_jax.errors import CheckpointError


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

    # --- two-agent inference (docs/method.md §5) ----------------------------------
    reasoning_suffix: str = (
        "\n\nPerform step-by-step reasoning of the problem. Only provide the reasoning process."
    )
    summary_instruction: str = (
        "Below are a question about the image and a reasoning process written for it. "
        "Judge whether the reasoning is correct. If it is, summarise the answer from it; "
        "if it is not, answer the question yourself and ignore the reasoning. "
        "Answer directly, without stating your judgement."
    )

    # --- assessment (docs/method.md §1) -------------------------------------------
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


# ------------------------------------------------------------------ prompts.json

PROMPTS_FILE = "prompts.json"  # the wording an agent was trained with, beside its weights


def write_prompts(folder: str | Path, prompts: Prompts) -> None:
    """Write `prompts` as `folder/prompts.json` (build sets, run and model
    directories and Hugging Face exports carry one)."""
    path = Path(folder) / PROMPTS_FILE
    path.write_text(json.dumps(dataclasses.asdict(prompts), indent=1, ensure_ascii=False) + "\n")


def read_prompts(folder: str | Path | None) -> Prompts | None:
    """The prompts in `folder/prompts.json`, or None when there is none (older
    checkpoints, models from elsewhere). Unknown keys or a malformed file are a
    one-line CheckpointError naming the file."""
    if folder is None:
        return None
    path = Path(folder) / PROMPTS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a prompts file ({e})") from None
    known = {f.name: f.type for f in dataclasses.fields(Prompts)}
    if not isinstance(data, dict) or set(data) - set(known):
        bad = sorted(set(data) - set(known)) if isinstance(data, dict) else data
        raise CheckpointError(f"{path}: unknown prompt keys {bad}")
    for key, value in data.items():
        want = int if key == "max_steps" else str
        if not isinstance(value, want) or isinstance(value, bool):
            raise CheckpointError(f"{path}: prompt {key!r} must be a {want.__name__}")
    return Prompts(**data)
