"""`insightv eval --config C` end to end with a tiny random checkpoint: the sampler
glue answers directly and as two agents (the CoT path is the direct one with a
different parse) and the report is written (accuracy is noise here)."""

import json

from tokenizers_for_tests import byte_bpe

from insightv_jax import cli
from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.models.factory import construct


def test_eval_cli_with_checkpoints(tmp_path, capsys):
    tok = byte_bpe(tmp_path / "tok")
    dec = DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                        num_layers=1, num_heads=4, num_kv_heads=2)  # fmt: skip
    cfg = ModelConfig(decoder=dec)
    # one checkpoint in every role: the same graph reuses its compiled programs
    ck = str(save_model_dir(construct(cfg, 0), cfg, tmp_path / "m", tokenizer_dir=tmp_path / "tok"))
    bench = tmp_path / "b.jsonl"
    rows = [{"id": "m", "question": "which?", "options": ["red", "blue"], "answer": "A"},
            {"id": "y", "question": "is it red?", "answer": "yes"},
            {"id": "n", "question": "how many?", "answer": "3"}]  # fmt: skip
    bench.write_text("\n".join(json.dumps(r) for r in rows))
    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({"eval": {
        "benchmarks": [{"path": str(bench), "name": "tiny"}],
        "systems": [
            {"name": "base", "mode": "direct", "model": ck},
            {"name": "agents", "mode": "two_agent", "reason": ck, "summary": ck}],
        "compare": [["agents", "base"]],
        "sampling": {"direct_max_tokens": 4, "reason_max_tokens": 4, "summary_max_tokens": 4},
        "bootstrap": 200, "batch_size": 3, "out": str(tmp_path / "out"),
    }}))  # fmt: skip
    assert cli.main(["eval", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert "agents - base" in out.out and "eval direct: 3/3" in out.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in ("base", "agents"):
        entry = report["systems"][name]["benchmarks"]["tiny"]
        assert entry["n"] == 3 and 0 <= entry["correct"] <= 3
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().split("\n")
             if x]  # fmt: skip
    assert len(preds) == 6 and all(isinstance(p["raw"], str) for p in preds)
    assert all(p["chain"] is not None for p in preds if p["system"] == "agents")
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    # a rerun reuses each system's saved results; a changed checkpoint or sampling
    # setting answers again
    assert cli.main(["eval", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert err.count("results of an earlier run") == 2 and "eval direct" not in err
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert cli.main(["eval", "--config", str(config), "eval.sampling.direct_max_tokens=3"]) == 0
    err = capsys.readouterr().err
    assert "eval: base on tiny" in err and "results of an earlier run" not in err
    assert cli.main(["eval", "--config", str(config)]) == 0  # the first setting's files
    assert capsys.readouterr().err.count("eval: loading") == 2  # were replaced
    assert cli.main(["eval", "--config", str(config)]) == 0
    assert capsys.readouterr().err.count("results of an earlier run") == 2
    (tmp_path / "m" / "config.yaml").write_text((tmp_path / "m" / "config.yaml").read_text() + "\n")
    assert cli.main(["eval", "--config", str(config)]) == 0
    assert "results of an earlier run" not in capsys.readouterr().err
    # a bad override is one line, exit 1
    assert cli.main(["eval", "--config", str(config), "eval.compare=[[agents, nobody]]"]) == 1
    assert "error: eval.compare: 'nobody' is not a system" in capsys.readouterr().err
