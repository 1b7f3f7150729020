"""`insightv demo`: the whole Insight-V pipeline on the embedded synthetic suite.

Stages (each leaves its outputs under the workdir and `stages/<name>.done`; a
rerun skips finished stages, and an interrupted SFT resumes from its checkpoint):
  1 synth      train/val/test of the synthetic suite (LLaVA JSON + PNGs)
  2 tokenizer  a byte-level BPE on every text the demo tokenises
  3 base       the base VLM from scratch on direct question -> answer data
  4 data       oracle generation (N chains per question) -> assess -> build
  5 agents     SFT of the reasoning agent and the CoT baseline, one budget for both
  6 chains     the reasoning agent's own chains on training questions, judged, added
               to the summary set (pipeline/agent_chains.py, docs/method.md)
  7 summary    SFT of the summary agent on that set
  8 dpo        iterative DPO of the reasoning agent (train/iterate.py)
  9 eval       base direct, CoT, two-agent, two-agent after each DPO round, the summary
               agent on corrupted chains; each under the reference and greedy decoding
 10 export     the final agents as Hugging Face folders
A preset (configs/demo/<preset>.yaml) holds every knob; its `base`, `reason`,
`summary`, `cot` and `dpo` sections are merged over the SFT config it names.

Modules: preset.py (the stage list, presets), stages.py (`Demo`: stages 1-8),
jobs.py (SFT jobs in and beside the process, the compile cache), evaluation.py
(stages 9-10, the eval config, the headline), seeds.py (`run_demo`, several seeds).
"""

from insightv_jax.demo.evaluation import headline, headline_text
from insightv_jax.demo.jobs import compile_cache
from insightv_jax.demo.preset import (
    AGENTS,
    REPO,
    SINGLE_THREAD,
    STAGES,
    load_preset,
    one_thread_env,
    preset_path,
)
from insightv_jax.demo.seeds import orderings, run_demo, run_seeds
from insightv_jax.demo.stages import Demo

__all__ = [
    "AGENTS",
    "REPO",
    "SINGLE_THREAD",
    "STAGES",
    "Demo",
    "compile_cache",
    "headline",
    "headline_text",
    "load_preset",
    "one_thread_env",
    "orderings",
    "preset_path",
    "run_demo",
    "run_seeds",
]
