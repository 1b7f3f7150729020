"""`insightv demo`: run (or resume) the demo, once or once per seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from insightv_jax.config import deep_merge
from insightv_jax.demo.preset import load_preset
from insightv_jax.demo.stages import Demo


def orderings(demo: Demo) -> list[tuple[str, str]]:
    """The paper's orderings this demo checks, as (a, b) for "a > b"."""
    pairs = [("two_agent", "cot"), ("cot", "base"), ("summary_corrupted", "base")]
    rounds = demo.round_policies()
    if rounds:
        pairs.append((f"two_agent_dpo{len(rounds)}", "two_agent"))
    return pairs


def run_seeds(preset: str, workdir: str, seeds: list[int], overrides=None) -> list[dict]:
    """The demo once per seed (`<workdir>/seed_<s>/`, same questions, another training
    seed), then each ordering as a mean over seeds with a CI over questions and seeds
    (eval/multiseed.py) in `<workdir>/seeds.{txt,json}`."""
    from insightv_jax.eval.multiseed import format_orderings, ordering, read_correct

    demos = []
    for seed in seeds:
        print(f"\n=== seed {seed} ===", flush=True)
        demo = Demo(load_preset(preset, deep_merge(overrides or {}, {"seed": seed})),
                    Path(workdir) / f"seed_{seed}")  # fmt: skip
        demo.run()
        demos.append(demo)
    per_seed = [read_correct(d.main_eval_dir() / "predictions.jsonl") for d in demos]
    rows = [ordering(per_seed, a, b) for a, b in orderings(demos[0])]
    text = format_orderings(rows)
    out = Path(workdir)
    (out / "seeds.json").write_text(json.dumps({"seeds": seeds, "orderings": rows}, indent=1))
    (out / "seeds.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    return rows


def run_demo(preset: str = "tiny", workdir: str = "workdir/demo", overrides=None,
             seeds: list[int] | None = None):  # fmt: skip
    """`insightv demo`: run (or resume) the demo; returns the eval report (or, with
    several `seeds`, the orderings over them)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped
    if seeds:
        return run_seeds(preset, workdir, seeds, overrides)
    return Demo(load_preset(preset, overrides), workdir).run()
