"""DPO of the reasoning agent (docs/method.md §3, §5): the sharded step, the log-prob
pass, reference log-probs, and `insightv dpo`.

- program.py: the pair-layout batch, `DPOProgram` (the step and the log-prob
  passes) and the batch iterators;
- data.py: `PairData` (pair records -> batches), JSONL files, usable records;
- probe.py: log-probs under a policy, reference log-probs, `round_probe`, held-out rewards;
- run.py: `train_dpo` (one run, step by step) and `run_dpo` (`insightv dpo`).

Reference log-probs are precomputed once by `precompute_ref_logps` (the
log-prob pass of the reference model, written into the pair records), so no
second model sits in memory while training; `dpo.ref_logps=on_the_fly` keeps
the reference parameters and runs the same pass before every step instead.

`train_dpo` also probes the run: the preference loss on its own pairs before
the first and after the last update (same batches), the end reward accuracy and
margin, how far the chosen and rejected log-probs moved, and, given chains
sampled from the start policy, the per-token KL of the trained policy from it
(`round_probe`).
"""

from insightv_jax.train.dpo.data import (
    PairData,
    full_params_of,
    usable_records,
)
from insightv_jax.train.dpo.probe import (
    chain_token_logps,
    evaluate_heldout,
    final_epoch_means,
    format_probe,
    heldout_rewards,
    kl_stats,
    policy_logps,
    precompute_ref_logps,
    preference_stats,
    ref_array,
    round_probe,
)
from insightv_jax.train.dpo.program import DPOProgram, PairBatches, WithRefLogps, pair_batch
from insightv_jax.train.dpo.run import run_dpo, step_budget, train_dpo

__all__ = [
    "DPOProgram",
    "PairBatches",
    "PairData",
    "WithRefLogps",
    "chain_token_logps",
    "evaluate_heldout",
    "final_epoch_means",
    "format_probe",
    "full_params_of",
    "heldout_rewards",
    "kl_stats",
    "pair_batch",
    "policy_logps",
    "precompute_ref_logps",
    "preference_stats",
    "ref_array",
    "round_probe",
    "run_dpo",
    "step_budget",
    "train_dpo",
    "usable_records",
]
