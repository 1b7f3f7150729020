"""A DPO round on a micro checkpoint: the probe sees the preference loss fall on
the round's own pairs; scoring from the divergence on a hand-made pair; the
question blocks `iterate` draws (fresh every round, the same on a rerun)."""

import json
import math

import numpy as np
import pytest

from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import load_config
from insightv_jax.data import conversation as conv
from insightv_jax.data.pairs import PairTransform, make_pair, shared_lines
from insightv_jax.data.transforms import ChatTransform
from insightv_jax.jsonl import write_jsonl
from insightv_jax.models.factory import construct
from insightv_jax.train.dpo import train_dpo
from insightv_jax.train.iterate import format_table, question_block, round_questions
from insightv_jax.train.toy_data import toy_run_config

MICRO = ["model.decoder.vocab_size=320", "model.decoder.num_layers=1"]


def chain(*steps: str) -> str:
    return "<thoughts>\n" + "\n".join(steps) + "\n</thoughts>"


def pair(i: int) -> dict:
    """Two chains that share their first step and differ from the second on."""
    n = i % 5
    return make_pair(
        f"q{i}", None, [{"from": "human", "value": f"how many red squares in grid {i}?"}],
        chain("count the red squares", f"there are {n} red squares", f"answer {n}"),
        chain("count the red squares", "there are 7 blue circles", "answer 7"),
        str(n), 90.0, 1.0, 1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A one-layer text decoder with a byte-level BPE tokenizer (minimal template)."""
    root = tmp_path_factory.mktemp("round")
    corpus = [t for i in range(20) for p in [pair(i)] for t in
              (p["prompt"][0]["value"], p["chosen"], p["rejected"])]  # fmt: skip
    conv.build_tokenizer(corpus, root / "tok", template="minimal", vocab_size=300)
    cfg = toy_run_config(str(root), *MICRO).model
    model = save_model_dir(construct(cfg, seed=0), cfg, root / "m0", tokenizer_dir=root / "tok")
    return root, model, cfg


def test_shared_lines():
    assert shared_lines("a\nb\nc", "a\nb\nd") == "a\nb\n"
    assert shared_lines("a\nb", "a\nb\nc") == "a\n"  # "b" may go on: not a whole line
    assert shared_lines("x\ny", "a\ny") == ""


def test_truncate_at_divergence_scores_from_the_first_different_line(micro):
    root, _, cfg = micro
    tf = ChatTransform(root / "tok", "minimal", cfg, root)
    rec = pair(2)
    full, cut = PairTransform(tf)(rec), PairTransform(tf, truncate=True)(rec)

    def scored(ex):
        return tf.tokenizer.decode(ex["labels"][ex["labels"] != -100].tolist())

    for side in ("chosen", "rejected"):
        # the shared lines still condition: the sequence is unchanged
        np.testing.assert_array_equal(full[side]["input_ids"], cut[side]["input_ids"])
        assert scored(full[side]) == rec[side] + "</s>"
    assert scored(cut["chosen"]) == "there are 2 red squares\nanswer 2\n</thoughts></s>"
    assert scored(cut["rejected"]) == "there are 7 blue circles\nanswer 7\n</thoughts></s>"


def test_round_lowers_the_preference_loss_on_its_own_pairs(micro, tmp_path):
    root, model, _ = micro
    pairs = [pair(i) for i in range(16)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    chains = [{"id": f"c{i}", "conversations": [*p["prompt"], {"from": "gpt", "value": p[s]}]}
              for i, p in enumerate(pairs[:5]) for s in ("chosen", "rejected")]  # fmt: skip
    cfg = toy_run_config(
        str(tmp_path / "run"), *MICRO, f"train.init={model}", "train.global_batch=8",
        "train.steps=0", "train.epochs=3", "train.lr=1e-2", "train.schedule=constant",
        "train.warmup_fraction=0", "train.checkpoint_every=0", "train.log_every=1",
        "train.loss_chunk=64", "data.buckets=[64]", "data.max_length=64", "dpo.gamma=0",
        "dpo.dpop_lambda=1.0", "dpo.truncate_at_divergence=true", "dpo.logprob_batch=8",
    )  # fmt: skip
    lines = []
    out = train_dpo(cfg, tmp_path / "pairs.jsonl", tmp_path, lines.append, chains)
    # the budget: 3 passes over 16 pairs in batches of 8
    assert (
        out["total"] == out["step"] == 6
        and "DPO on 16 pairs: 3 epochs = 6 steps of 8 pairs" in lines
    )
    assert not any("MFU" in x for x in lines)
    # the policy starts as the reference: ln 2; after the round the loss is below it
    assert out["pref_loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["pref_loss_end"] < out["pref_loss_start"] - 0.05
    # the plain DPO term is the preference loss less its DPOP penalty (>= 0); the two
    # are summed in a different order, so they agree to float32 rounding at best
    assert out["dpo_loss_end"] <= out["pref_loss_end"] * (1 + 1e-5) + 1e-7
    assert out["dpo_loss_end"] < math.log(2)
    assert out["reward_accuracy_end"] > 0.5 and out["reward_margin_end"] > 0
    assert out["kl_tokens"] > 0 and out["kl_k3_per_token"] >= 0 and out["kl_per_token"] > -1
    probe = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert probe["pref_loss_end"] == out["pref_loss_end"] and probe["probe_pairs"] == 16
    ref_rows = [
        json.loads(x) for x in (tmp_path / "run" / "pairs_ref.jsonl").read_text().splitlines()
    ]
    assert len(ref_rows) == 16 and all(r["ref_truncated"] for r in ref_rows)


def test_question_blocks_are_fresh_each_round_and_stable(tmp_path):
    blocks = [question_block(10, t, 4, seed=3) for t in (1, 2, 3)]
    (b1, w1), (b2, w2), (b3, w3) = blocks
    assert not set(b1) & set(b2) and not w1 and not w2  # rounds 1, 2: new questions
    assert w3 and set(b3) & (set(b1) | set(b2))  # 12 > 10: round 3 wraps around
    assert blocks == [question_block(10, t, 4, seed=3) for t in (1, 2, 3)]  # a rerun
    assert question_block(10, 1, 4, seed=4)[0] != b1
    assert sorted(question_block(10, 1, 0, seed=3)[0]) == list(range(10))  # 0 = all
    # a round records its block; resuming it reads the same block back
    items = [{"id": f"q{i}", "question": "?", "answer": "1"} for i in range(10)]
    cfg = load_config(None, ["dpo.questions_per_round=4", "dpo.question_seed=3"])
    said = []
    r2 = round_questions(cfg, tmp_path, 2, items, said.append)
    assert [it["id"] for it in r2] == [f"q{i}" for i in b2] and not said
    assert json.loads((tmp_path / "questions.json").read_text())["ids"] == [f"q{i}" for i in b2]
    other = load_config(None, ["dpo.questions_per_round=4", "dpo.question_seed=9"])
    assert round_questions(other, tmp_path, 2, items, said.append) == r2
    (tmp_path / "r3").mkdir()
    round_questions(cfg, tmp_path / "r3", 3, items, said.append)
    assert len(said) == 1 and "wraps around" in said[0]


def test_round_table_names_the_training_sample_accuracy():
    row = {"round": 1, "samples": 8, "train_sample_accuracy": 0.5, "pairs": 2, "steps": 3,
           "pref_loss_start": 0.693, "pref_loss_end": 0.61, "eval_accuracy": 0.4}  # fmt: skip
    header, line = format_table([row]).splitlines()
    assert header.split()[2] == "train_sample_acc" and "val_two_agent_acc" in header
    assert "0.6931" not in line and "0.6930" in line and line.split()[-1] == "0.400"


def test_judge_by_claim_judges_a_chain_by_its_own_answer():
    """`dpo.judge_by`: with "summary" a chain whose slip the summary agent repaired
    counts as right; with "claim" it is judged by the answer it states itself, and a
    chain that states none falls back to the summary agent's answer."""
    from insightv_jax.pipeline.backends import OracleJudgeBackend
    from insightv_jax.train.rollouts import assess

    class FlatScorer:  # every correct chain scores 50
        def score_many(self, requests):
            return [[50.0] * len(chains) for _, chains in requests]

    items = [{"id": "q", "question": "how many red squares plus blue circles?", "answer": "6"}]
    samples = [
        {"id": "q", "sample": 0, "chain": "Compute: 4 + 2 = 7\nAnswer: answer 7",
         "answer": "6"},  # a slip the summary agent repaired
        {"id": "q", "sample": 1, "chain": "Compute: 4 + 2 = 6\nAnswer: answer 6",
         "answer": "5"},  # a right chain it overturned
        {"id": "q", "sample": 2, "chain": "Compute: 4 + 2", "answer": "6"},  # no claim
    ]  # fmt: skip
    judge = OracleJudgeBackend()
    by_summary = assess(items, samples, judge, FlatScorer(), 1.0, judge_by="summary")
    by_claim = assess(items, samples, judge, FlatScorer(), 1.0, judge_by="claim")
    assert [s["correct"] for s in by_summary] == [True, False, True]
    assert [s["correct"] for s in by_claim] == [False, True, True]
    assert [s["score"] for s in by_claim] == [1.0, 50.0, 50.0]
