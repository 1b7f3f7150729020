"""`iterate` with T = 2 on the tiny VLM preset: end to end, then SIGKILL in the
middle of round 2 and a rerun that skips the finished stages. Each round draws
fresh questions, and its row carries the probe and the held-out accuracies."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import load_config
from insightv_jax.data import conversation as conv
from insightv_jax.data.images import ImageProcessor
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.models.factory import construct

REPO = Path(__file__).resolve().parent.parent


class HashJudge:
    """A deterministic stand-in judge: about half of all answers are 'correct'."""

    def judge_many(self, requests):
        return [int(hashlib.sha256(a.encode()).digest()[0] % 2 == 0) for _, _, a in requests]


class LengthScorer:
    """A stand-in scorer: longer chains score higher (distinct scores per chain)."""

    def score_many(self, requests):
        return [[10.0 + min(len(c), 80) for c in chains] for _, chains in requests]


DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
from absl import flags
flags.FLAGS.mark_as_parsed()
from insightv_jax.config import load_config
from insightv_jax.train.iterate import run_iterate
from test_dpo_iterate import HashJudge, LengthScorer
cfg = load_config({config!r}, {overrides!r})
rows = run_iterate(cfg, rounds=2, judge=HashJudge(), scorer=LengthScorer())
print("ROWS " + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("iter")
    write_llava(root / "suite", 24, seed=0)
    src = open_source(root / "suite" / "train.json")
    corpus = [t["value"] for r in src.records for t in r["conversations"]]
    conv.build_tokenizer(corpus * 4, root / "tok", template="minimal", vocab_size=508)
    cfg = load_config(str(REPO / "configs/models/tiny.yaml")).model
    ImageProcessor.for_model(cfg).save_pretrained(root / "proc")
    m1 = save_model_dir(construct(cfg, seed=0), cfg, root / "m1",
                        tokenizer_dir=root / "tok", processor_dir=root / "proc")  # fmt: skip
    return root, m1


def run_driver(root, m1, run, wait_for=None):
    overrides = [
        f"train.init={m1}", f"train.workdir={run}", "train.global_batch=2", "train.steps=3",
        "train.lr=1e-4", "train.checkpoint_every=1", "train.log_every=1", "train.loss_chunk=64",
        f"dpo.questions={root / 'suite' / 'train.json'}", "dpo.questions_per_round=6",
        "dpo.samples_per_question=4", "dpo.sample_batch=24", "dpo.reason_max_tokens=16",
        "dpo.summary_max_tokens=6", "dpo.min_gap=1", "dpo.logprob_batch=4",
        f"dpo.eval_data={root / 'suite' / 'val.json'}", "dpo.eval_limit=4",
        "data.buckets=[128,256]", "data.max_length=256", "mesh.fsdp=1",
    ]  # fmt: skip
    script = DRIVER.format(tests=str(REPO / "tests"), config=None, overrides=overrides)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    if wait_for is None:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        return json.loads(out.split("ROWS ", 1)[1].splitlines()[0]), out
    deadline = time.time() + 300
    while not wait_for.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None, ""


def test_iterate_two_rounds_resumes_after_kill(setup):
    root, m1 = setup
    run = root / "run"
    r2 = run / "round_2"
    run_driver(root, m1, run, wait_for=r2 / "samples.jsonl")
    assert (run / "round_1" / "summary.json").exists() and not (r2 / "summary.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in [*(run / "round_1").glob("*.jsonl"),
                                                r2 / "generations.jsonl", r2 / "samples.jsonl"]}  # fmt: skip
    rows, out = run_driver(root, m1, run)
    assert "round 1: sampling" not in out and "round 2: sampling" not in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished stages not redone
    assert [r["round"] for r in rows] == [1, 2]
    r1 = rows[0]
    assert r1["samples"] == 24 and r1["pairs"] >= 2 and r1["steps"] == 3
    assert 0.0 <= r1["train_sample_accuracy"] <= 1.0
    # the probe on the round's own pairs and chains (in the table)
    assert 0.0 <= r1["reward_accuracy"] <= 1.0 and r1["reward_margin"] is not None
    assert abs(r1["pref_loss_start"] - 0.6931) < 1e-3 and r1["pref_loss_end"] is not None
    assert r1["logp_chosen_change"] is not None and r1["kl_k3_per_token"] >= 0
    for r in rows:  # held out, after the round
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and 0.0 <= r["eval_chain_accuracy"] <= 1.0
        assert {"eval_keep", "eval_rescue"} <= set(r)  # the summary agent's confusion
    assert "val_chain_acc" in out and "train_sample_acc" in out and "MFU" not in out
    assert rows[1]["policy_in"] == str(run / "round_1") == r1["policy_out"]
    # fresh questions each round (6 of the 24, a seeded order), recorded per round
    ids = [json.loads((run / f"round_{t}" / "questions.json").read_text())["ids"] for t in (1, 2)]
    assert len(ids[0]) == len(ids[1]) == 6 and not set(ids[0]) & set(ids[1])
    for rd in (run / "round_1", r2):
        samples = [json.loads(x) for x in (rd / "samples.jsonl").read_text().splitlines()]
        assert {"logprob", "answer", "correct", "score", "reward"} <= set(samples[0])
        assert all(s["score"] == 1.0 for s in samples if not s["correct"])  # floor
        pairs = [json.loads(x) for x in (rd / "pairs_ref.jsonl").read_text().splitlines()]
        assert all("ref_logps" in p for p in pairs)
        assert (rd / "config.yaml").exists() and (rd / "tokenizer").is_dir()
        assert (rd / "checkpoints" / "3" / "model").is_dir()
