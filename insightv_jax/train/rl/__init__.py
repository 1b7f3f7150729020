"""On-policy RL of the agents (docs/method.md §7): GRPO, Dr. GRPO, DAPO and GSPO.

- losses.py: group advantages, DAPO's overlong penalty, the step normalisers,
  `policy_loss` (every variant) and the differentiable chunked per-token log-probs;
- program.py: `RLProgram`, the sharded policy step and the per-token log-prob
  pass (old policy, reference).
"""

from insightv_jax.train.rl.losses import (
    ALGORITHMS,
    chunked_token_logps,
    group_advantages,
    overlong_penalty,
    policy_loss,
    step_totals,
)
from insightv_jax.train.rl.program import RLProgram

__all__ = [
    "ALGORITHMS",
    "RLProgram",
    "chunked_token_logps",
    "group_advantages",
    "overlong_penalty",
    "policy_loss",
    "step_totals",
]
