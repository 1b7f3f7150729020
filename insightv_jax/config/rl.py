"""The `rl:` section: on-policy RL of the agents (GRPO and its variants)."""

import dataclasses
from typing import Literal

from insightv_jax.config.base import ConfigError, check_positive


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """On-policy RL of the agents, the Insight-V++ direction (docs/method.md §7).

    Each prompt gets `group_size` sampled responses (contiguous rows of a
    batch); their rewards become group-relative advantages; the policy is
    updated `epochs × minibatches` times (μ) per rollout batch against the
    log-probs of the policy that sampled them. The optimiser and its schedule
    come from `train:`.

    `algorithm` picks the loss:
      grpo     PPO-clipped token ratios, mean over a response's tokens, then over responses;
      dr_grpo  the same ratios, token sum / (responses × max_response_tokens),
               advantages not divided by the group's std;
      dapo     clip-higher (`epsilon_high` > `epsilon_low`, e.g. 0.2 / 0.28), one mean
               over every scored token of the step;
      gspo     one ratio per response (geometric mean of its token ratios), clipped per
               response, mean over responses. The GSPO paper clips far tighter than the
               token-level defaults: epsilon_low=3e-4, epsilon_high=4e-4.

    `dynamic_sampling` is DAPO's: a group whose rewards are all equal carries no
    signal and leaves the update, and fresh questions refill the batch, at most
    `refill_draws` extra draws of them (sampled and judged like the first) until the
    round has as many groups with signal as its first draw had groups
    (docs/method.md §7).
    """

    algorithm: Literal["grpo", "dr_grpo", "dapo", "gspo"] = "grpo"
    group_size: int = 8  # G responses per prompt, contiguous rows
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.2  # ... and above at 1 + epsilon_high (DAPO: 0.28; GSPO: 4e-4)
    beta: float = 0.0  # weight of the k3 KL to the reference; 0 = no reference pass
    adv_eps: float = 1e-6  # added to the group's std before dividing
    max_response_tokens: int = 256  # rollout max new tokens, and Dr. GRPO's constant
    temperature: float = 1.0  # rollout temperature; the loss divides logits by it
    top_p: float = 1.0  # rollout nucleus
    minibatches: int = 1  # updates per pass over a rollout batch
    epochs: int = 1  # passes over a rollout batch (μ = epochs × minibatches)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    # the cap on DAPO's refill: with dynamic_sampling, at most this many extra draws of
    # fresh questions (each as many as the round's, or the toy's batch) replace the dropped
    # groups; the batch stays short when they run out (0 = drop, never refill)
    refill_draws: int = 3
    overlong: Literal["none", "filter", "soft"] = "none"  # truncated responses: kept,
    # masked out of the loss, or given DAPO's soft length penalty
    overlong_buffer: int = 0  # DAPO's L_cache: the soft penalty's ramp, in tokens
    reference: Literal["round_start", "init"] = "round_start"  # the KL's reference policy
    agent: Literal["reason", "summary", "both"] = "reason"  # which agent(s) RL trains
    rounds: int = 3
    questions: str | None = None  # LLaVA JSON / JSONL questions
    questions_per_round: int = 64  # prompts per round (0 = all)
    summary: str | None = None  # the summary agent's checkpoint (its start, when RL trains it)
    summary_chains: int = 2  # J-GRPO: chains per question from the current reasoning agent
    summary_temperature: float | None = None  # J-GRPO: the answers' temperature (None: temperature)
    given_chains: str | None = None  # J-GRPO: JSONL of {id, chain} added to them (e.g. corrupted)
    eval_data: str | None = None  # held-out questions: accuracies after each round
    # a control run: each round's rewards permuted across its samples before the
    # advantages (RL that helps must beat this run of the same length)
    shuffle_rewards: bool = False
    eval_limit: int = 0  # the first K held-out questions after each round; 0 = all
    sample_batch: int = 64  # responses decoded per sampler call
    logprob_batch: int = 32  # responses per call of the log-prob pass
    format_weight: float = 0.0  # reward weight of a well-formed response
    score_weight: float = 0.0  # reward weight of the scorer's score

    @property
    def answer_temperature(self) -> float:
        """The temperature J-GRPO samples the summary agent's answers at (and its
        loss divides the logits by)."""
        return self.temperature if self.summary_temperature is None else self.summary_temperature

    @property
    def updates_per_batch(self) -> int:
        """μ: optimizer updates per rollout batch."""
        return self.epochs * self.minibatches

    def validate(self) -> None:
        check_positive(
            self, "rl", "max_response_tokens", "minibatches", "epochs", "rounds",
            "sample_batch", "logprob_batch", "summary_chains",
        )  # fmt: skip
        if self.group_size < 2:
            raise ConfigError(
                f"rl.group_size={self.group_size} must be >= 2 (advantages compare a group)"
            )
        if not 0.0 <= self.epsilon_low < 1.0 or self.epsilon_high < 0.0:
            raise ConfigError(
                f"rl: epsilon_low={self.epsilon_low} must be in [0, 1) and "
                f"epsilon_high={self.epsilon_high} >= 0"
            )
        if self.beta < 0 or self.adv_eps <= 0:
            raise ConfigError(f"rl: beta={self.beta} must be >= 0 and adv_eps={self.adv_eps} > 0")
        if self.summary_temperature is not None and self.summary_temperature <= 0:
            raise ConfigError(f"rl.summary_temperature={self.summary_temperature} must be > 0")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"rl: temperature={self.temperature} must be > 0 and top_p={self.top_p} in (0, 1]"
            )
        if not 0 <= self.overlong_buffer < self.max_response_tokens:
            raise ConfigError(
                f"rl.overlong_buffer={self.overlong_buffer} must be in "
                f"[0, max_response_tokens={self.max_response_tokens})"
            )
        if self.overlong == "soft" and self.overlong_buffer < 1:
            raise ConfigError("rl.overlong=soft needs rl.overlong_buffer >= 1")
        if min(self.questions_per_round, self.eval_limit) < 0:
            raise ConfigError("rl.questions_per_round and rl.eval_limit must be >= 0")
        if self.refill_draws < 0:
            raise ConfigError(f"rl.refill_draws={self.refill_draws} must be >= 0")
        if min(self.format_weight, self.score_weight) < 0:
            raise ConfigError("rl.format_weight and rl.score_weight must be >= 0")
