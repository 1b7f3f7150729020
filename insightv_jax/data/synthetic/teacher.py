"""The oracle teacher: writes Insight-V step chains (docs/method.md §1) for an item.

A chain is `{"steps": [{"title", "content", "next_action"}...], "final_answer"}`.
Its claims come from solving the item through an `Observer`; with probability
`error_rate` one operation is corrupted (miscount, wrong cell/hop, misread bar,
arithmetic slip) and the mistake propagates to the answer. Wording, step
grouping and the order of independent reads vary with the sample's seed;
every step's content contains its claims in the canonical grammar.
"""

from __future__ import annotations

import random

from insightv_jax.data.synthetic.claims import format_claim
from insightv_jax.data.synthetic.generate import solve
from insightv_jax.data.synthetic.observer import Observer
from insightv_jax.data.synthetic.scenes import scene_from_dict

TITLES = {
    "count": ["Count", "Counting", "Count the shapes", "Scan the grid"],
    "cell": ["Look at the cell", "Inspect the cell", "Read the cell", "Locate"],
    "hop": ["Move", "Follow the direction", "Step to the neighbour"],
    "bar": ["Read the bar", "Bar height", "Read the chart"],
    "extreme": ["Find the extreme", "Compare the bars", "Rank the bars"],
    "arith": ["Compute", "Calculate", "Do the arithmetic"],
    "cmp": ["Compare", "Compare the counts", "Check which is larger"],
}
WORDING = {
    "count": [
        "Scanning the grid row by row, {c}.",
        "I count them: {c}.",
        "{c}, checking each cell.",
    ],
    "cell": ["In the grid, {c}.", "Looking there, {c}.", "{c}."],
    "hop": ["Moving one cell: {c}.", "{c}.", "One step over, {c}."],
    "bar": ["From the chart, {c}.", "The bar reaches {c}.", "{c} on the axis."],
    "extreme": ["Among the readings, {c}.", "{c}.", "Ranking the bars, {c}."],
    "arith": ["So {c}.", "Computing: {c}.", "{c}."],
    "cmp": ["Comparing the two numbers, {c}.", "{c}.", "So {c}."],
}
INTRO_TITLES = ["Understand the question", "Plan", "Restate the task"]
CHECK_TITLES = ["Double-check", "Re-examine", "Verify"]
END_TITLES = ["Conclusion", "Answer", "Final step"]
# Where a corrupted operation's error shows: in the chain's own text (a sum that does
# not add up, a hop to a cell that is not a neighbour, an extreme that contradicts
# the listed readings) or only against the image (a miscount, a misread cell or bar).
ERROR_VISIBLE_IN = {"arith": "text", "hop": "text", "extreme": "text",
                    "count": "image", "cell": "image", "bar": "image"}  # fmt: skip
TERSE_TITLES = {"count": "Count", "cell": "Look", "hop": "Move", "bar": "Read",
                "extreme": "Rank", "arith": "Compute", "cmp": "Compare"}  # fmt: skip


class OracleTeacher:
    """Scene-grounded chain writer; the synthetic stand-in for the generator MLLM.

    style "full": varied sentences, an intro and an occasional re-check step;
    style "terse": one claim per step with one-word titles (short sequences for
    the tiny demo model).
    """

    def __init__(self, error_rate: float = 0.0, style: str = "full", seed: int = 0):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate {error_rate} is not in [0, 1]")
        if style not in ("full", "terse"):
            raise ValueError(f"style {style!r} is not full or terse")
        self.error_rate, self.style, self.seed = error_rate, style, seed

    def chain(self, item: dict, sample: int = 0) -> dict:
        """One chain for a record (`id`, `family`, `scene`, `query`, `conversations`)."""
        rng = random.Random(f"teacher/{self.seed}/{item['id']}/{sample}")
        scene = scene_from_dict(item["scene"])
        truth = Observer(scene)
        solve(item["family"], item["scene"], item["query"], truth)
        corrupt_at = rng.randrange(truth.ops) if rng.random() < self.error_rate else None
        obs = Observer(scene, corrupt_at, random.Random(rng.random()))
        answer = str(solve(item["family"], item["scene"], item["query"], obs))
        # terse chains (the tiny demo model) keep the question's order: a 2-layer
        # model cannot learn to match shuffled reads back to the question's terms
        claims = obs.claims if self.style == "terse" else _reorder(obs.claims, rng)
        steps = self._steps(claims, rng, answer, question_of(item))
        return {"steps": steps, "final_answer": answer, "corrupted": obs.corrupted,
                "corrupted_kind": obs.corrupted_kind}  # fmt: skip

    def chains(self, item: dict, n: int) -> list[dict]:
        return [self.chain(item, i) for i in range(n)]

    def _steps(self, claims, rng, answer, question) -> list[dict]:
        terse = self.style == "terse"
        steps = []
        if not terse and rng.random() < 0.7:
            first = question.splitlines()[0]
            steps.append(_step(rng.choice(INTRO_TITLES), f"The question asks: {first} "
                               "I will read the image step by step."))  # fmt: skip
        i = 0
        while i < len(claims):
            group = [claims[i]]
            if not terse and rng.random() < 0.3 and i + 1 < len(claims):
                group.append(claims[i + 1])  # two claims in one step
            i += len(group)
            kind = group[0][0][0]
            if terse:
                steps.append(
                    _step(TERSE_TITLES[kind], "; ".join(format_claim(c) for c, _ in group))
                )
                continue
            text = " ".join(rng.choice(WORDING[c[0]]).format(c=format_claim(c)) for c, _ in group)
            steps.append(_step(rng.choice(TITLES[kind]), text[0].upper() + text[1:]))
        if not terse and claims and rng.random() < 0.3:
            again = format_claim(rng.choice(claims)[0])
            steps.append(_step(rng.choice(CHECK_TITLES), f"Looking again to be sure: {again}."))
        end = "answer " + answer if terse else f"So the answer is {answer}."
        steps.append(_step("Answer" if terse else rng.choice(END_TITLES), end))
        steps[-1]["next_action"] = "final_answer"
        return steps


def _step(title: str, content: str) -> dict:
    return {"title": title, "content": content, "next_action": "continue"}


def _reorder(claims: list, rng: random.Random) -> list:
    """Shuffle each run of consecutive free (order-independent) claims."""
    out, run = [], []
    for claim in claims + [(None, False)]:
        if claim[1]:
            run.append(claim)
            continue
        rng.shuffle(run)
        out.extend(run)
        run = []
        if claim[0] is not None:
            out.append(claim)
    return out


def question_of(item: dict) -> str:
    """The question text of a record (its first human turn without `<image>`)."""
    if "question" in item:
        return item["question"]
    first = next(t["value"] for t in item["conversations"] if t["from"] == "human")
    return first.replace("<image>", "").strip()
