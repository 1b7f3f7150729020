"""A refactor's no-behaviour-change check (not a test: run it at two commits and compare).

    git worktree add /tmp/before <base commit>
    (cd /tmp/before && PYTHONPATH=$PWD python /path/to/tests/behaviour_check.py run /tmp/a)
    PYTHONPATH=$PWD python tests/behaviour_check.py run /tmp/b
    python tests/behaviour_check.py compare /tmp/a /tmp/b

`run` is the demo at a small size from seed 0: every stage, four SFT runs of 40 steps
(base, reasoning agent, CoT, summary agent) and one DPO round, sampling for the agent's
chains, the DPO round and both evaluation decodings. `compare` exits 0 when every training
step's loss and gradient norm, every evaluation prediction and every data file the stages
wrote (agent chains, DPO samples, pairs) are bit-identical.
"""

import hashlib
import io
import json
import sys
from pathlib import Path

STEPS = 40
TRAIN = {"steps": STEPS, "global_batch": 8, "checkpoint_every": 0, "log_every": 1}
DATA = {"max_length": 128, "buckets": [128]}
SIZE = {
    "parallel": 2,
    "suite": {"n": 200, "n_eval": 64},
    "tokenizer": {"chains": 100},
    "base": {"train": TRAIN, "data": DATA},
    **{name: {"train": TRAIN, "data": DATA} for name in ("reason", "summary", "cot")},
    "pipeline": {"num_samples": 2, "questions": 100, "agent_questions": 32, "agent_samples": 2,
                 "agent_max_tokens": 48},
    "dpo": {"train": {"epochs": 1, "global_batch": 2},
            "dpo": {"rounds": 1, "questions_per_round": 32, "samples_per_question": 4,
                    "reason_max_tokens": 48, "min_gap": 0.0, "eval_limit": 32}},
    "eval": {"limit": 64, "batch_size": 32, "bootstrap": 200,
             "sampling": {"cot_max_tokens": 48, "reason_max_tokens": 48}},
}  # fmt: skip
DATA_FILES = ("data/**/*.json", "data/**/*.jsonl", "chains/**/*.jsonl",
              "eval/corrupted_chains.jsonl", "runs/dpo/**/*.jsonl", "runs/dpo/**/*.json")  # fmt: skip


def run(workdir: Path) -> None:
    from insightv_jax.demo import Demo, load_preset

    out = io.StringIO()
    Demo(load_preset("tiny", SIZE), workdir, out=out).run()
    (workdir / "demo_log.txt").write_text(out.getvalue())


def losses(root: Path) -> dict:
    out = {}
    for f in sorted(root.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[str(f.relative_to(root))] = [
            (r.get("step"), r.get("loss"), r.get("grad_norm")) for r in rows if "loss" in r
        ]
    return out


def predictions(root: Path) -> dict:
    return {
        str(f.relative_to(root)): f.read_text() for f in sorted(root.rglob("predictions.jsonl"))
    }


def data_files(root: Path) -> dict:
    out = {}
    for pattern in DATA_FILES:
        for f in sorted(root.glob(pattern)):
            if f.name == "metrics.jsonl":  # losses are compared above, the rest are timings
                continue
            text = f.read_text().replace(str(root.resolve()), "ROOT")  # the workdir in paths
            out[str(f.relative_to(root))] = hashlib.sha256(text.encode()).hexdigest()
    return out


def compare(a: Path, b: Path) -> bool:
    same = True
    for name, read in (
        ("losses", losses),
        ("predictions", predictions),
        ("data files", data_files),
    ):
        x, y = read(a), read(b)
        count = sum(len(v) for v in x.values()) if name == "losses" else len(x)
        unit = "steps" if name == "losses" else "files"
        print(f"{name}: {'identical' if x == y else 'DIFFER'} ({len(x)} files, {count} {unit})")
        for key in sorted(set(x) | set(y)):
            if x.get(key) != y.get(key):
                same = False
                print(f"  differs: {key}")
    return same


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(0 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 1)
    else:
        sys.exit(__doc__)
