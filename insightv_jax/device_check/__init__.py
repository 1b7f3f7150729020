"""The device check (`launch/device_check.sh`, `python -m insightv_jax.device_check`):
what this project does on one accelerator, measured in about five minutes and
written as it goes.

Sections, in the order they run, each written to `OUT/<section>.json` the
moment it finishes (a run cut short still leaves what it measured):
  env     versions (jax, jaxlib, its plugin, torch, transformers), devices, the card
  peak    measured matmul peaks (bf16; fp32 at JAX's default and highest
          precision) and the card's data-sheet dense bf16 peak
  train   `insightv bench train --size 1b`: a ~1B Llama-shaped decoder and a
          LLaVA-shaped VLM in bf16 against transformers (SDPA) on the same GPU
  sample  `insightv bench sample --size 1b`: decode at batch 1 and 8 against
          transformers' generate on the same GPU
  parity  fp32 logits against transformers, under
          `jax.default_matmul_precision("highest")` and JAX's default (TF32)
  tests   the test files that exercise attention, sharding, training steps and
          sampling, run on the accelerator (pass/fail counts, failures named)
plus `summary.json` (each section's status, rewritten as each ends).

`sections.py` measures; `guard.py` runs the sections and writes the files.
The sections run one after another in a worker process. Each has its own time
guard, kept by the parent process: a section past its guard, or one that kills the
worker, is recorded with an `error` line and the worker is restarted for the
sections left; an exception is recorded by the worker itself. A failed `env`
(no accelerator, say) skips the rest. `--cpu` runs every section at toy sizes
on the CPU, torch on the CPU as the peer: the rehearsal that the tests run.

The worker needs jax, flax, optax, orbax-checkpoint, transformers and torch,
and neither grain, tensorflow-datasets nor tensorboardX.
"""
