"""The oracle judge and scorer: the synthetic stand-ins for the paper's judge LLM
and reasoning-path scorer MLLM, with the interfaces model backends implement too.

    judge(question, ground_truth, answer) -> (verdict 0/1, raw "[1]"/"[0]")
    score(item, chains) -> [1..100 per chain]   (all chains of a question at once)
"""

from __future__ import annotations

import random
import re

from insightv_jax.data.synthetic.claims import chain_text, check_claim, format_claim, parse_claims
from insightv_jax.data.synthetic.generate import solve
from insightv_jax.data.synthetic.observer import Observer
from insightv_jax.data.synthetic.scenes import scene_from_dict
from insightv_jax.eval.extract import match, parse_options

FLOOR_SCORE = 1


def parse_verdict(raw: str) -> int:
    """`[1]` -> 1; anything else (`[0]`, unparseable) -> 0 (docs/method.md §1)."""
    m = re.search(r"\[\s*([01])\s*\]", raw)
    return int(m.group(1)) if m else 0


class OracleJudge:
    """Normalised answer match (eval/extract.py) reported as `[1]`/`[0]`."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def judge(self, question: str, ground_truth: str, answer: str) -> tuple[int, str]:
        options = parse_options(question)
        rng = random.Random(f"judge/{self.seed}/{question}/{answer}")
        got = match(answer, ground_truth, options=options or None, rng=rng)
        # a random fallback letter never counts as a correct judgement
        verdict = int(got.correct and not got.fallback)
        return verdict, f"[{verdict}]"


class OracleScorer:
    """Scores chains 1–100 by checking every claim they make against the scene.

    score = 1 + 99 · accuracy · (0.6 + 0.4 · coverage), where accuracy is the
    fraction of the chain's claims that are true and coverage the fraction of the
    gold claims (those the correct solution makes) the chain states. A chain with
    no checkable claim gets the floor score.
    """

    def gold_claims(self, item: dict) -> set[str]:
        obs = Observer(scene_from_dict(item["scene"]))
        solve(item["family"], item["scene"], item["query"], obs)
        return {format_claim(c) for c, _ in obs.claims}

    def score_one(self, item: dict, chain, gold: set[str] | None = None) -> int:
        scene = scene_from_dict(item["scene"])
        gold = self.gold_claims(item) if gold is None else gold
        claims = parse_claims(chain_text(chain))
        if not claims:
            return FLOOR_SCORE
        accuracy = sum(check_claim(c, scene) for c in claims) / len(claims)
        stated = {format_claim(c) for c in claims}
        coverage = len(gold & stated) / len(gold) if gold else 1.0
        return max(FLOOR_SCORE, min(100, round(1 + 99 * accuracy * (0.6 + 0.4 * coverage))))

    def score(self, item: dict, chains: list) -> list[int]:
        gold = self.gold_claims(item)
        return [self.score_one(item, c, gold) for c in chains]
