"""Two-agent inference from checkpoints through `insightv infer`."""

import json

import pytest
from tokenizers_for_tests import byte_bpe

from insightv_jax import cli
from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.models.factory import construct
from insightv_jax.sample.reasoning import extract_chain


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    root = tmp_path_factory.mktemp("agents")
    tok = byte_bpe(root / "tok")
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
        )
    )
    paths = []
    for name, seed in (("reason", 0), ("summary", 1)):
        paths.append(
            save_model_dir(construct(cfg, seed), cfg, root / name, tokenizer_dir=root / "tok")
        )
    return paths


def test_extract_chain():
    assert extract_chain("x <thoughts>\na: 1\nb: 2\n</thoughts> y") == "a: 1\nb: 2"
    assert extract_chain("<thoughts>cut off") == "cut off"
    assert extract_chain("no tags") == "no tags"


def test_infer_prints_chain_and_answer(agents, capsys):
    reason, summary = agents
    code = cli.main(
        [
            "infer",
            "--reason",
            str(reason),
            "--summary",
            str(summary),
            "--question",
            "how many circles?",
            "--show-chain",
            "--max-reason-tokens",
            "16",
            "--max-summary-tokens",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "chain:" in out and "answer:" in out


def test_batch_reports_bad_rows_and_runs_the_rest(agents, tmp_path, capsys):
    reason, summary = agents
    batch = tmp_path / "q.jsonl"
    batch.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "question": "how many circles?"}),
                json.dumps({"id": "b", "question": "   "}),
                "{broken",
                json.dumps({"id": "c", "question": "red?", "image": str(tmp_path / "missing.png")}),
                json.dumps({"id": "d", "question": "is it blue?"}),
            ]
        )
    )
    out = tmp_path / "answers.jsonl"
    code = cli.main(
        [
            "infer",
            "--reason",
            str(reason),
            "--summary",
            str(summary),
            "--batch",
            str(batch),
            "--out",
            str(out),
            "--max-reason-tokens",
            "8",
            "--max-summary-tokens",
            "4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "q.jsonl:2: empty question" in err and "q.jsonl:3: malformed JSON" in err
    assert "missing.png not found" in err
    answered = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert answered == ["a", "d"]


def test_unreadable_image_and_missing_checkpoint(agents, tmp_path, capsys):
    reason, summary = agents
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert (
        cli.main(
            [
                "infer",
                "--reason",
                str(reason),
                "--summary",
                str(summary),
                "--question",
                "q",
                "--image",
                str(bad),
            ]
        )
        == 1
    )
    assert "bad.png is unreadable" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "infer",
                "--reason",
                str(tmp_path / "nope"),
                "--summary",
                str(summary),
                "--question",
                "q",
            ]
        )
        == 1
    )
    assert "checkpoint not found" in capsys.readouterr().err
