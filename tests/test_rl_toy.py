"""The micro version of the RL toy (train/rl/toy.py): on two-digit addition, GRPO
from an SFT start at ~30-45 % greedy accuracy raises held-out greedy accuracy
beyond the paired interval, the shuffled-reward control of the same length does
not; a run killed with SIGKILL between checkpoints resumes to the same final
parameters, bit for bit."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from insightv_jax.checkpoint import load_model
from insightv_jax.jsonl import read_jsonl
from insightv_jax.train.rl.toy import (
    answer_tokens,
    is_correct,
    question_tokens,
    run_toy,
    toy_config,
)

ROOT = Path(__file__).resolve().parents[1]
# one device: the killed worker and the in-process runs must compute alike
OVERRIDES = ["mesh.fsdp=1", "rl.minibatches=2"]
# one checkpoint (the last step) per run; pass@G sampled as many questions at a time
# as a rollout batch has (its compiled sampler)
FIELDS = {"steps": 24, "val_limit": 300, "eval_every": 0, "save_every": 24, "pass_chunk": 32}
# the killed run checkpoints at step 12 and dies after step 13's update
KILL_FIELDS = {**FIELDS, "save_every": 12}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rl_toy")
    toy = toy_config(str(workdir), OVERRIDES, **FIELDS)
    return toy, run_toy(toy, print_fn=lambda *a: None)


def test_task_tokens():
    assert question_tokens(12, 34) == [1, 4, 5, 13, 6, 7, 14]
    assert answer_tokens(57, 68) == [4, 5, 8, 2]  # 125, EOS
    assert is_correct(57, 68, [4, 5, 8, 2])
    assert not is_correct(57, 68, [4, 5, 8]) and not is_correct(57, 68, [4, 5, 8, 2, 2])


def test_rl_helps_and_the_control_does_not(toy_run):
    toy, rep = toy_run
    start = rep["accuracy"]["start"]["val"]
    assert 0.2 <= start <= 0.6, rep  # the regime the toy is built for
    sampled = rep["start_sampled_val"]
    assert sampled["pass@8"] > sampled["pass@1"] + 0.3, sampled
    rl_gain, lo, _ = rep["differences"]["rl-start"]["test"]
    assert lo > 0, rep  # beyond the paired 95% interval
    control_gain, _, control_hi = rep["differences"]["control-start"]["test"]
    assert control_gain <= 0 and control_hi < lo, rep
    log = read_jsonl(Path(toy.workdir) / "rl" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 25))
    # the first minibatch of every step is on-policy: the trainer's old log-probs
    for r in log:
        assert abs(r["first_ratio_mean"] - 1.0) < 1e-6 and r["first_clip_fraction"] == 0.0


WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from pathlib import Path
from insightv_jax.train.rl.toy import rl_run, toy_config

def print_fn(line):  # after step 13's update: checkpoint 12 is written, 13 is lost
    if line.startswith("rl step 13/"):
        os.kill(os.getpid(), signal.SIGKILL)

toy = toy_config({workdir!r}, {overrides!r}, **{fields!r})
rl_run(toy, Path({start!r}), "rl", shuffle=False, print_fn=print_fn)
"""


def test_sigkill_mid_run_then_resume_is_bit_identical(toy_run, tmp_path):
    from insightv_jax.train.rl.toy import rl_run

    toy, _ = toy_run
    start = Path(toy.workdir) / "start"
    script = WORKER.format(root=str(ROOT), cache=os.environ["JAX_COMPILATION_CACHE_DIR"],
                           workdir=str(tmp_path), overrides=OVERRIDES, fields=KILL_FIELDS,
                           start=str(start))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpts = sorted(int(p.name) for p in (tmp_path / "rl" / "checkpoints").iterdir()
                   if p.name.isdigit())  # fmt: skip
    assert ckpts[-1] == 12, ckpts
    lines = []
    resumed = toy_config(str(tmp_path), OVERRIDES, **KILL_FIELDS)
    rl_run(resumed, start, "rl", shuffle=False, print_fn=lines.append)
    assert any("resumed from" in line for line in lines)
    assert [r["step"] for r in read_jsonl(tmp_path / "rl" / "log.jsonl")] == list(range(1, 25))
    want = load_model(Path(toy.workdir) / "rl" / "final")[0]
    got = load_model(tmp_path / "rl" / "final")[0]
    from flax import nnx

    a = jax.tree.leaves(nnx.state(want, nnx.Param))
    b = jax.tree.leaves(nnx.state(got, nnx.Param))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_dynamic_sampling_refills_the_batch_with_groups_that_carry_signal(toy_run):
    from insightv_jax.train.rl.toy import _rollout, splits

    toy, _ = toy_run
    dapo = toy_config(toy.workdir, [*OVERRIDES, "rl.dynamic_sampling=true"], **FIELDS)
    model = load_model(Path(toy.workdir) / "start")[0]
    pairs, resp, rewards, scored, stats = _rollout(dapo, model, splits()["train"], 0, False)
    G, Q = dapo.run.rl.group_size, dapo.questions
    assert len(resp) == Q * G and stats["groups_drawn"] > Q  # flat groups were replaced
    groups = rewards.reshape(Q, G)
    kept = scored.reshape(Q, G).all(axis=1)
    assert kept.sum() > Q // 2 and np.all(groups[kept].std(axis=1) > 0)
    assert not scored.reshape(Q, G)[~kept].any()  # missing rows stay unscored
