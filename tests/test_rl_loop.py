"""`insightv rl` end to end at a micro size: `rl.agent=both` on the tiny VLM agents and
the synthetic suite — a GRPO round of the reasoning agent, then a J-GRPO round of the
summary agent on the new agent's chains and given chains —, the first update's ratio
check, resume by rerun."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_dpo_iterate import HashJudge

from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import ConfigError, load_config
from insightv_jax.data import conversation as conv
from insightv_jax.data.images import ImageProcessor
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.models.factory import construct
from insightv_jax.train.rl.loop import run_rl
from insightv_jax.train.rl.update import rl_records

REPO = Path(__file__).resolve().parent.parent


class NoScorer:
    def score_many(self, requests):
        return [[None] * len(chains) for _, chains in requests]


def test_rewards_advantages_and_dynamic_sampling():
    rl = load_config(None, ["rl.group_size=2", "rl.dynamic_sampling=true"]).rl
    items = [{"id": q, "question": "how many?", "answer": "1"} for q in ("a", "b")]
    samples = [
        {"id": "a", "sample": 0, "chain": "count: 1\nanswer 1", "correct": True, "logprob": -1.0},
        {"id": "a", "sample": 1, "chain": "answer 2", "correct": False, "logprob": -2.0},
        {"id": "b", "sample": 0, "chain": "answer 1", "correct": True, "logprob": -1.0},
        {"id": "b", "sample": 1, "chain": "x\nanswer 1", "correct": True, "logprob": -1.0},
    ]  # fmt: skip
    records, stats = rl_records(items, samples, load_config(None).pipeline.prompts, rl)
    assert [r["id"] for r in records] == ["a-s0", "a-s1"]  # group b carries no signal
    np.testing.assert_allclose([r["advantages"] for r in records], [1.0, -1.0], atol=1e-5)
    assert stats["groups_dropped"] == 1 and stats["multi_step_share"] == 0.5
    assert stats["reward_mean"] == 0.75


def test_overlong_soft_penalty_and_filter():
    items = [{"id": "a", "question": "how many?", "answer": "1"}]
    samples = [
        {"id": "a", "sample": k, "chain": "x\nanswer 1", "correct": ok, "tokens": n}
        for k, (ok, n) in enumerate(((True, 4), (True, 7), (False, 8), (False, 3)))
    ]  # fmt: skip
    prompts = load_config(None).pipeline.prompts
    common = ["rl.group_size=4", "rl.max_response_tokens=8", "rl.overlong_buffer=2"]
    soft = load_config(None, [*common, "rl.overlong=soft"]).rl
    _, stats = rl_records(items, samples, prompts, soft)
    # lengths 4, 7, 8, 3 with the ramp over (6, 8]: penalties 0, -0.5, -1, 0
    assert stats["reward_mean"] == pytest.approx((1 + 0.5 - 1 + 0) / 4)
    cut = load_config(None, [*common, "rl.overlong=filter"]).rl
    records, _ = rl_records(items, samples, prompts, cut)
    assert [r["id"] for r in records] == ["a-s0", "a-s1", "a-s3"]  # a-s2 ran into the limit


def test_summary_records_are_the_answers_given_each_chain():
    rl = load_config(None, ["rl.group_size=2"]).rl
    prompts = load_config(None).pipeline.prompts
    items = [{"id": "a", "question": "how many?", "answer": "1", "image": "a.png"}]
    samples = [
        {"id": "a", "chain_id": "g", "chain": "count: 2", "sample": k, "answer": ans,
         "correct": ok, "logprob": -1.0, "source": "given"}
        for k, (ans, ok) in enumerate((("1", True), ("2", False)))
    ]  # fmt: skip
    records, stats = rl_records(items, samples, prompts, rl, agent="summary")
    assert [r["id"] for r in records] == ["a-g-s0", "a-g-s1"]
    human, gpt = records[1]["conversations"]
    assert human["value"].startswith("<image>\n") and "count: 2" in human["value"]
    assert gpt["value"] == "2" and records[1]["image"] == "a.png"
    np.testing.assert_allclose([r["advantages"] for r in records], [1.0, -1.0], atol=1e-5)
    assert stats["reward_mean"] == 0.5 and "multi_step_share" not in stats


def test_bad_given_chains_and_toy_fields_are_one_line_errors(tmp_path):
    from insightv_jax.errors import InsightVError
    from insightv_jax.train.rl.summary import given_chains
    from insightv_jax.train.rl.toy import toy_config

    bad = tmp_path / "given.jsonl"
    bad.write_text('{"id": "a", "chain": "x"}\n{"id": "b"}\n')
    with pytest.raises(ConfigError, match=r"given.jsonl: record 2 has no 'chain'$"):
        given_chains(str(bad))
    with pytest.raises(ConfigError, match="is not a file$"):
        given_chains(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InsightVError, match=r"^rl-toy: steps=0 must be >= 1$"):
        toy_config(str(tmp_path), steps=0)
    with pytest.raises(InsightVError, match=r"start_accuracy=1.5 must be in \(0, 1\]$"):
        toy_config(str(tmp_path), start_accuracy=1.5)


def test_rl_without_questions_names_the_key():
    with pytest.raises(ConfigError, match="^rl.questions: no question file given$"):
        run_rl(load_config(None, ["train.init=x"]))


def test_rl_two_rounds_then_rerun_skips_them(tmp_path):
    write_llava(tmp_path / "suite", 24, seed=0)
    src = open_source(tmp_path / "suite" / "train.json")
    corpus = [t["value"] for r in src.records for t in r["conversations"]]
    conv.build_tokenizer(corpus * 4, tmp_path / "tok", template="minimal", vocab_size=508)
    model = load_config(str(REPO / "configs/models/tiny.yaml")).model
    ImageProcessor.for_model(model).save_pretrained(tmp_path / "proc")
    m1 = save_model_dir(construct(model, seed=0), model, tmp_path / "m1",
                        tokenizer_dir=tmp_path / "tok", processor_dir=tmp_path / "proc")  # fmt: skip
    given = tmp_path / "given.jsonl"  # a chain for every question, e.g. a corrupted one
    given.write_text("".join(json.dumps({"id": r["id"], "chain": "count: 2\nanswer 2"}) + "\n"
                             for r in src.records))  # fmt: skip
    cfg = load_config(None, [
        f"train.init={m1}", f"train.workdir={tmp_path / 'run'}", "train.lr=1e-4",
        "train.loss_chunk=64", f"rl.questions={tmp_path / 'suite' / 'train.json'}",
        "rl.questions_per_round=4", "rl.group_size=4", "rl.sample_batch=16",
        "rl.max_response_tokens=16", "rl.minibatches=2", "rl.logprob_batch=8", "rl.beta=0.04",
        "dpo.summary_max_tokens=6", "data.buckets=[128, 256, 384]", "data.max_length=384",
        "rl.agent=both", f"rl.given_chains={given}",
    ])  # fmt: skip
    said = []
    rows = run_rl(cfg, rounds=2, judge=HashJudge(), scorer=NoScorer(), print_fn=said.append)
    assert [r["round"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["samples"] == 16 and first["step"] == 2  # μ = 1 epoch x 2 minibatches
    assert abs(first["first_ratio_mean"] - 1.0) < 1e-6 and first["first_clip_fraction"] == 0.0
    assert Path(first["policy_out"], "params").is_dir()
    assert Path(first["policy_out"], "prompts.json").is_file()  # eval and infer read its wording
    assert first["agent"] == "reason" and first["summary_out"] == str(m1)
    second = rows[1]  # the summary agent's round, on round 1's reasoning agent
    assert second["agent"] == "summary" and second["policy_in"] == first["policy_out"]
    assert second["policy_out"] == first["policy_out"] and second["summary_in"] == str(m1)
    assert second["summary_out"] == str(tmp_path / "run" / "round_2" / "policy")
    # 4 questions x (2 policy chains + 1 given chain) x 4 answers
    assert second["samples"] == 48 and {"answer_accuracy_policy", "answer_accuracy_given"} <= set(
        second
    )
    assert abs(second["first_ratio_mean"] - 1.0) < 1e-6 and "multi_step_share" not in second
    assert "reward" in said[-1] and "val_rescue" in said[-1]  # (held-out: test_dpo_iterate)
    assert any("grpo on 16 chains: 2 updates of 8" in m for m in said)  # progress
    assert any("grpo on 48 summary answers: 2 updates of 24" in m for m in said)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))  # round scalars
    again = run_rl(cfg, rounds=2, judge=HashJudge(), scorer=NoScorer(), print_fn=said.append)
    assert again == rows  # finished rounds are read back, not rerun
    assert json.loads((tmp_path / "run" / "round_1" / "summary.json").read_text()) == first

    # an update interrupted before it wrote its policy reruns to the same parameters
    round_2 = tmp_path / "run" / "round_2"
    done = _params(round_2 / "policy")
    shutil.move(round_2 / "policy", tmp_path / "policy_before")
    for name in ("update.json", "summary.json"):
        (round_2 / name).unlink()
    resumed = run_rl(cfg, rounds=2, judge=HashJudge(), scorer=NoScorer(), print_fn=said.append)
    assert resumed == rows
    redone = _params(round_2 / "policy")
    assert jax.tree.all(jax.tree.map(np.array_equal, done, redone))


def _params(path):
    from flax import nnx

    from insightv_jax.checkpoint import load_model

    return jax.device_get(nnx.to_pure_dict(nnx.state(load_model(path)[0], nnx.Param)))
