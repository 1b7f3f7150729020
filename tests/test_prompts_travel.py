"""The wording an agent was trained with travels with it: build sets → run directory →
model directory → Hugging Face export (`prompts.json`), and `infer` and `eval` read it
from there, so `insightv infer` answers as the evaluation does."""

import json

import pytest

from insightv_jax import cli
from insightv_jax.checkpoint import agent_prompts
from insightv_jax.data.prompts import DEFAULT_PROMPTS, Prompts, read_prompts, write_prompts
from insightv_jax.errors import CheckpointError

TRAINED = Prompts(reasoning_suffix="", summary_instruction="check the reasoning")


def test_prompts_file_round_trip_and_bad_files(tmp_path):
    write_prompts(tmp_path, TRAINED)
    assert read_prompts(tmp_path) == TRAINED
    assert read_prompts(tmp_path / "none") is None  # a checkpoint from elsewhere
    (tmp_path / "prompts.json").write_text('{"reasoning_suffx": ""}')
    with pytest.raises(CheckpointError, match="reasoning_suffx"):
        read_prompts(tmp_path)
    (tmp_path / "prompts.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a prompts file"):
        read_prompts(tmp_path)


def test_agent_prompts_precedence(tmp_path):
    reason, summary = tmp_path / "r", tmp_path / "s"
    reason.mkdir(), summary.mkdir()
    write_prompts(reason, Prompts(reasoning_suffix=" think"))
    write_prompts(summary, Prompts(summary_instruction="judge it"))
    got = agent_prompts(None, reason, summary)  # each agent's own wording
    assert got.reasoning_suffix == " think" and got.summary_instruction == "judge it"
    override = Prompts(summary_instruction="mine")  # a config that sets prompts wins
    assert agent_prompts(override, reason, summary) == override
    assert agent_prompts(None, tmp_path / "x", None) == DEFAULT_PROMPTS


@pytest.fixture(scope="module")
def trained_agent(tmp_path_factory):
    """A micro text agent SFT'd a few steps on data built with TRAINED's wording."""
    from insightv_jax.data.conversation import build_tokenizer

    root = tmp_path_factory.mktemp("agent")
    data = root / "build"
    data.mkdir()
    rows = [
        {"id": str(i), "conversations": [
            {"from": "human", "value": f"how many? {i}"},
            {"from": "gpt", "value": f"<thoughts>\ncount: {i}\nanswer {i}\n</thoughts>"}]}
        for i in range(8)
    ]  # fmt: skip
    (data / "set.json").write_text(json.dumps(rows))
    lines = [t["value"] for r in rows for t in r["conversations"]] + ["check the reasoning"]
    vocab = len(build_tokenizer(lines, root / "tok", template="minimal", vocab_size=300))
    write_prompts(data, TRAINED)  # as `insightv build` does
    config = root / "sft.yaml"
    config.write_text(json.dumps({
        "model": {"kind": "causal_lm", "decoder": {
            "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
            "num_heads": 4, "num_kv_heads": 2, "scan_layers": False}},
        "train": {"steps": 4, "global_batch": 4, "lr": 1e-3, "checkpoint_every": 0,
                  "log_every": 2, "data": str(data / "set.json"),
                  "tokenizer": str(root / "tok"), "workdir": str(root / "run")},
        "data": {"max_length": 64, "buckets": [64]},
    }))  # fmt: skip
    assert cli.main(["sft", "--config", str(config)]) == 0
    return root


def test_prompts_travel_and_infer_answers_as_eval(trained_agent, tmp_path, capsys):
    run = trained_agent / "run"
    assert read_prompts(run) == TRAINED  # the run directory carries the data's wording
    model_dir, hf = tmp_path / "model", tmp_path / "hf"
    assert cli.main(["convert", "jax2hf", "--src", str(run), "--out", str(hf)]) == 0
    assert read_prompts(hf) == TRAINED  # ... and so does its Hugging Face export
    assert cli.main(["convert", "hf2jax", "--src", str(hf), "--out", str(model_dir)]) == 0
    assert read_prompts(model_dir) == TRAINED  # ... and the model directory made from it

    questions = [{"id": f"q{i}", "question": f"how many? {i}", "answer": str(i)} for i in range(5)]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(q) for q in questions))
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps({"id": q["id"], "question": q["question"]})
                               for q in questions))  # fmt: skip
    out = tmp_path / "infer.jsonl"
    args = ["infer", "--reason", str(run), "--summary", str(model_dir), "--batch", str(batch),
            "--decoding", "greedy", "--max-reason-tokens", "16", "--max-summary-tokens", "6",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    inferred = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({"eval": {
        "benchmarks": [{"path": str(bench), "name": "b", "kind": "open", "instruction": ""}],
        "systems": [{"name": "agents", "mode": "two_agent", "reason": str(run),
                     "summary": str(model_dir)}],
        "decoding": "greedy", "batch_size": 8, "bootstrap": 200, "out": str(tmp_path / "ev"),
        "sampling": {"reason_max_tokens": 16, "summary_max_tokens": 6},
    }}))  # fmt: skip
    assert cli.main(["eval", "--config", str(config)]) == 0
    capsys.readouterr()
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    preds = [json.loads(x) for x in lines if x]
    assert len(preds) == 5
    for p in preds:
        assert p["chain"] == inferred[p["id"]]["chain"]
        assert p["raw"] == inferred[p["id"]]["answer"]
