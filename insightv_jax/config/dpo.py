"""The `dpo:` section: preference optimisation and the iterative rounds."""

import dataclasses
from typing import Literal

from insightv_jax.config.base import ConfigError


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference optimisation of the reasoning agent (`insightv dpo`) and the
    iterative rounds (`insightv iterate`), docs/method.md. The optimiser,
    batch (`train.global_batch` = pairs per step, with `data.packing` too) and
    run directory come from `train:`; `train.init` is the policy to start from (M_1)."""

    beta: float = 0.1
    gamma: float = 1.0  # weight of the token-mean CE on the chosen response
    label_smoothing: float = 0.0  # sigmoid / ref_free losses only
    loss: Literal["sigmoid", "ipo", "ref_free"] = "sigmoid"
    ref_logps: Literal["precomputed", "on_the_fly"] = "precomputed"
    pairs: str | None = None  # `insightv dpo`: the preference-pair JSONL
    eval_pairs: str | None = None  # held-out pairs: reward accuracy after training
    reference: str | None = None  # reference checkpoint; None: train.init (the start policy)
    logprob_batch: int = 8  # pairs per call of the reference log-prob pass
    # iterate: sampling from M_t, judging, scoring, pairs
    questions: str | None = None  # LLaVA JSON / JSONL questions (the synthetic suite's train.json)
    questions_per_round: int = 0  # round t: the t-th block of K of a seeded shuffle; 0 = all
    summary: str | None = None  # the summary agent's checkpoint (fixed over rounds)
    samples_per_question: int = 4
    reason_temperature: float = 0.7
    summary_temperature: float = 0.2
    top_p: float = 0.95
    reason_max_tokens: int = 256
    summary_max_tokens: int = 64
    sample_batch: int = 16  # chains decoded per sampler call
    min_gap: float = 10.0  # chosen_score - rejected_score >= min_gap
    floor_score: float = 1.0  # the score of wrong-answer chains
    rounds: int = 3
    eval_data: str | None = None  # held-out questions: two-agent accuracy after each round
    eval_limit: int = 0  # the first K held-out questions; 0 = all
    # against likelihood displacement (the chosen chain's log-prob falling):
    # DPOP (Pal et al. 2024): -log σ(β(Δ - λ·max(0, log π_ref(c) - log π(c))))
    dpop_lambda: float = 0.0
    # score only the tokens from the first step where chosen and rejected differ
    # (the shared prefix carries no preference)
    truncate_at_divergence: bool = False
    question_seed: int = 0  # the shuffled order rounds draw fresh questions from
    # what the judge checks for each sampled chain: "summary", the summary agent's
    # answer from it (the method: a chain has no answer of its own); "claim", the
    # chain's own final answer where its format states one (`chain_final_claim`),
    # else the summary agent's. With "summary" a chain with a slip the summary agent
    # repairs counts as right, and a right chain it overturns as wrong.
    judge_by: Literal["summary", "claim"] = "summary"

    def validate(self) -> None:
        if self.beta <= 0 or self.gamma < 0:
            raise ConfigError(f"dpo: beta={self.beta} must be > 0 and gamma={self.gamma} >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.samples_per_question < 2:
            raise ConfigError("dpo.samples_per_question must be >= 2 (pairs need two chains)")
        if min(self.logprob_batch, self.sample_batch, self.rounds) < 1:
            raise ConfigError("dpo.logprob_batch, dpo.sample_batch and dpo.rounds must be >= 1")
