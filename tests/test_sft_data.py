"""`insightv sft` on a real (synthetic-suite) dataset with the tiny VLM preset."""

import json

from insightv_jax import cli
from insightv_jax.data import conversation as conv
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.writer import write_llava


def test_sft_on_synthetic_data_learns_and_writes_a_run_dir(tmp_path, capsys):
    write_llava(tmp_path / "d", 64, seed=0)
    src = open_source(tmp_path / "d" / "train.json")
    corpus = [t["value"] for r in src.records for t in r["conversations"]]
    conv.build_tokenizer(corpus * 2, tmp_path / "tok", template="minimal", vocab_size=508)
    run = tmp_path / "run"
    code = cli.main(
        [
            "sft",
            "--config",
            "configs/sft/tiny-synthetic.yaml",
            f"train.data={tmp_path / 'd' / 'train.json'}",
            f"train.tokenizer={tmp_path / 'tok'}",
            f"train.workdir={run}",
            "train.steps=30",
            "train.global_batch=16",
            "train.log_every=10",
            "train.checkpoint_every=0",
            "mesh.fsdp=2",
            "mesh.data=4",
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "processor" / "preprocessor_config.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["30"]
    from insightv_jax.hf import load_pretrained

    model, tok, proc, cfg = load_pretrained(run)
    assert cfg.kind == "llava" and tok is not None and proc is not None
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
