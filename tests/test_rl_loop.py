"""`insightv rl` end to end at a micro size: `rl.agent=both` on the tiny VLM agents and
the synthetic suite — a GRPO round of the reasoning agent, then a J-GRPO round of the
summary agent on the new agent's chains and given chains —, the first update's ratio
check, resume by rerun."""

import dataclasses
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
from insightv_jax.train.rl.update import rl_records, round_rewards

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


def test_refill_draws_fresh_questions_until_the_round_has_its_groups(tmp_path):
    """DAPO's refill in a round (`Iteration.refill`), with the sampling stage given:
    fresh questions draw after draw until as many groups carry a signal as the first
    draw has groups; each draw's questions on disk; the update keeps that many."""
    from insightv_jax.train.iterate import Iteration

    cfg = load_config(None, ["rl.group_size=2", "rl.dynamic_sampling=true"])
    items = [{"id": f"q{i}", "question": "how many?", "answer": "1"} for i in range(10)]
    said, drawn = [], []

    def draw(with_signal):
        def sample(dd, extra, k):  # a question's two chains: right and (with signal) wrong
            drawn.append((dd.name, [it["id"] for it in extra]))
            return [{"id": it["id"], "sample": j, "chain": "x", "correct": j == 0 or it["id"]
                     not in with_signal} for it in extra for j in range(2)]  # fmt: skip

        return sample

    def refill(run, with_signal, t=1, refills=3):
        c = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, refill_draws=refills))
        it = Iteration(c, run, tmp_path, items, [], None, None, "", said.append, "rl")
        first = draw(with_signal)(run, items[:3], 0)
        drawn.clear()
        return it.refill(run, t, items[:3], first, draw(with_signal))

    fresh = {f"q{i}" for i in range(3, 10)}
    got_items, samples = refill(tmp_path / "a", {"q0"} | fresh)  # 1 of 3 groups, then 3 more
    assert [d for d, _ in drawn] == ["refill_1"] and len(got_items) == 6
    extra = drawn[0][1]
    assert set(extra) <= fresh and len(set(extra)) == 3
    assert [s["draw"] for s in samples[6:]] == [1] * 6
    on_disk = json.loads((tmp_path / "a" / "refill_1" / "questions.json").read_text())["ids"]
    assert on_disk == extra
    records, stats = rl_records(got_items, samples, load_config(None).pipeline.prompts, cfg.rl)
    assert [r["id"] for r in records] == [f"{q}-s{j}" for q in ["q0", *extra[:2]] for j in (0, 1)]
    assert (stats["draws"], stats["groups"], stats["groups_dropped"]) == (2, 6, 2)
    assert stats["groups_surplus"] == 1  # the batch is the first draw's 3 groups
    # the control permutes rewards draw by draw: a draw's stay as they were when later
    # draws join, so refilling judges the signal on the rewards the update trains on
    control = dataclasses.replace(cfg.rl, shuffle_rewards=True)
    true, shuffled = round_rewards(samples, control, seed=5)
    np.testing.assert_array_equal(shuffled[:6], round_rewards(samples[:6], control, seed=5)[1])
    assert sorted(shuffled[6:]) == sorted(true[6:])

    drawn.clear()  # a resumed round draws the same questions; another round others
    refill(tmp_path / "a", {"q0"} | fresh)
    assert drawn == [("refill_1", extra)]
    refill(tmp_path / "b", {"q0"} | fresh, t=2)
    assert drawn[0][1] != extra

    refill(tmp_path / "c", set(), refills=2)  # no signal anywhere: the cap stops it
    assert [len(ids) for _, ids in drawn] == [3, 3]
    refill(tmp_path / "d", set(), refills=5)  # ... or the questions run out
    assert [len(ids) for _, ids in drawn] == [3, 3, 1]
    assert set().union(*(ids for _, ids in drawn)) == fresh
    assert said[-1] == "round 1: no fresh questions left to refill 3 of 3 groups"


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


def test_rl_two_rounds_then_rerun_skips_them(tmp_path, monkeypatch):
    """On one device (`mesh.fsdp=1`, `parallel.run_mesh`): the rounds on the 8 fake
    devices are the demo's (tests/test_demo.py), the RL step's 8 = 1 test_rl_program's."""
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
        "rl.agent=both", f"rl.given_chains={given}", "rl.dynamic_sampling=true",
        "rl.refill_draws=1", "mesh.fsdp=1",
    ])  # fmt: skip
    from insightv_jax.sample import infer

    loads, load_agent = [], infer.load_agent  # which agents came from disk, which from memory

    def logged(path, mesh=None, model=None):
        loads.append((str(path), "disk" if model is None else "memory"))
        return load_agent(path, mesh, model)

    monkeypatch.setattr(infer, "load_agent", logged)
    said = []
    rows = run_rl(cfg, rounds=2, judge=HashJudge(), scorer=NoScorer(), print_fn=said.append)
    assert [r["round"] for r in rows] == [1, 2]
    first = rows[0]
    # the summary agent's greedy answers from the random model's chains mostly coincide,
    # so most groups are flat: one refill draw of 4 fresh questions, then the cap
    run = tmp_path / "run"
    block = json.loads((run / "round_1" / "questions.json").read_text())["ids"]
    fresh = json.loads((run / "round_1" / "refill_1" / "questions.json").read_text())["ids"]
    assert len(fresh) == 4 and not set(block) & set(fresh)
    assert (first["draws"], first["groups"], first["samples"]) == (2, 8, 32)
    used = first["groups"] - first["groups_dropped"] - first["groups_surplus"]
    assert first["groups_dropped"] == first["groups_without_signal"] and 0 < used < 4
    assert any(f"grpo on {4 * used} chains: 2 updates of {2 * used}" in m for m in said)
    assert first["step"] == 2  # μ = 1 epoch x 2 minibatches
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
    assert second["draws"] == 1  # every group of its answers carries a signal
    assert any("grpo on 48 summary answers: 2 updates of 24" in m for m in said)
    assert list((run / "tb").glob("events.out.tfevents.*"))  # round scalars
    # round 2 sampled its chains from the model round 1's update handed over in memory
    assert (first["policy_out"], "memory") in loads
    assert (first["policy_out"], "disk") not in loads
    again = run_rl(cfg, rounds=2, judge=HashJudge(), scorer=NoScorer(), print_fn=said.append)
    assert again == rows  # finished rounds are read back, not rerun
    assert json.loads((run / "round_1" / "summary.json").read_text()) == first

    # after a restart, round 2's chains are sampled from round 1's policy read back from
    # disk: the same tokens as the live model gave; and an update interrupted before it
    # finished reruns from the round's start to the same parameters
    round_2 = run / "round_2"
    done, chains = _params(round_2 / "policy"), (round_2 / "chains.jsonl").read_text()
    shutil.move(round_2 / "policy", tmp_path / "policy_before")
    for name in ("chains.jsonl", "update.json", "summary.json"):
        (round_2 / name).unlink()
    loads.clear()
    resumed = run_rl(cfg, rounds=2, judge=HashJudge(), scorer=NoScorer(), print_fn=said.append)
    assert (first["policy_out"], "disk") in loads
    assert (round_2 / "chains.jsonl").read_text() == chains
    assert resumed == rows
    redone = _params(round_2 / "policy")
    assert jax.tree.all(jax.tree.map(np.array_equal, done, redone))


def _params(path):
    from flax import nnx

    from insightv_jax.checkpoint import load_model

    return jax.device_get(nnx.to_pure_dict(nnx.state(load_model(path)[0], nnx.Param)))
