"""`insightv rl`: rounds of on-policy RL of the agents (docs/method.md §7).

A round is a round of `insightv iterate` (train/iterate.py: the same run directory
layout, fresh questions per round, resume from the first unfinished stage) whose
update is the `rl.algorithm` step on the samples' rewards instead of DPO on pairs.
The `rl:` section sets what a round samples: `rl.group_size` chains per question at
`rl.temperature`, top-p `rl.top_p`, up to `rl.max_response_tokens`, and the summary
agent answers each chain greedily for the judge. `rl.agent` picks what a round
trains: the reasoning agent, the summary agent (J-GRPO, train/rl/summary.py) or
both in turn (`iterate.round_agent`). The held-out questions are decoded with the
reference rule (`REFERENCE_DECODING`).
"""

from __future__ import annotations

import dataclasses

from insightv_jax.config import ConfigError, RunConfig
from insightv_jax.train.iterate import run_iterate
from insightv_jax.train.rl.summary import given_chains

# the held-out accuracies after each round: the reference decoding of `insightv eval`
# (both agents at 0.2 / top-p 0.95), not the rollouts' exploratory temperature
REFERENCE_DECODING = {"reason_temperature": 0.2, "summary_temperature": 0.2, "top_p": 0.95}


def round_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with the `rl:` section's sampling settings in the round fields that
    train/iterate.py reads (the `dpo:` section's, which DPO rounds use)."""
    rl, d = cfg.rl, cfg.dpo
    rounds = dataclasses.replace(
        d,
        questions=rl.questions or d.questions,
        questions_per_round=rl.questions_per_round,
        summary=rl.summary or d.summary,
        samples_per_question=rl.group_size,
        reason_temperature=rl.temperature,
        summary_temperature=0.0,  # the summary agent answers each chain greedily
        top_p=rl.top_p,
        reason_max_tokens=rl.max_response_tokens,
        sample_batch=rl.sample_batch,
        rounds=rl.rounds,
        eval_data=rl.eval_data or d.eval_data,
        eval_limit=rl.eval_limit,
    )
    return dataclasses.replace(cfg, dpo=rounds)


def run_rl(cfg: RunConfig, rounds: int | None = None, judge=None, scorer=None, print_fn=print):
    """Run (or continue) `rl.rounds` (or `rounds`) rounds under `train.workdir`."""
    if not (cfg.rl.questions or cfg.dpo.questions):
        raise ConfigError("rl.questions: no question file given")
    given_chains(cfg.rl.given_chains)  # a bad file fails here, before any round
    return run_iterate(round_config(cfg), rounds or cfg.rl.rounds, judge, scorer, print_fn,
                       update="rl", eval_sampling=REFERENCE_DECODING)  # fmt: skip
