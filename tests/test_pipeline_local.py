"""The data pipeline with the `local` backend on a tiny untrained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers_for_tests import byte_bpe

from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import DecoderConfig, ModelConfig, load_config
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.models.factory import construct
from insightv_jax.pipeline.assess import run_assess
from insightv_jax.pipeline.backend_common import parse_step
from insightv_jax.pipeline.build import run_build
from insightv_jax.pipeline.generate import run_generate
from insightv_jax.pipeline.records import read_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    tok = byte_bpe(root / "tok")
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
            num_heads=4, num_kv_heads=2,
        )
    )  # fmt: skip
    ckpt = save_model_dir(construct(cfg, 0), cfg, root / "model", tokenizer_dir=root / "tok")
    write_llava(root / "synth", 6, seed=1)
    return root, ckpt


def test_local_pipeline_runs_end_to_end_and_every_step_parses(setup):
    root, ckpt = setup
    cfg = load_config(
        ROOT / "configs/pipeline/synthetic-oracle.yaml",
        [f"pipeline.data={root / 'synth/train.json'}", f"pipeline.out={root / 'run'}",
         "pipeline.generator=local", "pipeline.judge=local", "pipeline.scorer=oracle",
         f"pipeline.generator_checkpoint={ckpt}", f"pipeline.judge_checkpoint={ckpt}",
         "pipeline.num_samples=2", "pipeline.batch_size=3", "pipeline.prompts.max_steps=3",
         "pipeline.step_tokens=40", "pipeline.final_tokens=24", "pipeline.judge_max_tokens=4",
         "pipeline.shard=0", "pipeline.num_shards=1"],
    )  # fmt: skip
    gen = run_generate(cfg)
    assert gen["samples_written"] == 12 and gen["samples_failed"] == 0
    stats = gen["stats"]
    assert stats.get("steps_invalid", 0) == 0 and stats["steps"] >= 12
    records = read_shards(root / "run/generate")
    assert len(records) == 12
    for rec in records:
        assert 1 <= len(rec["steps"]) <= 3
        for step in rec["steps"]:  # constrained decoding: every step is a schema step
            assert parse_step(json.dumps(step)) == step
        assert isinstance(rec["final_answer"], str)
    outside = 1 - stats["sampler_ms"] / max(stats["total_ms"], 1)
    print(f"\nlocal generate: {gen['questions_per_s']} questions/s, "
          f"{100 * outside:.0f}% of generate time outside the sampler calls")  # fmt: skip
    summary = run_assess(cfg)
    assert summary["questions"] == 6
    # an untrained judge rarely writes [0]/[1]: those count as 0 and are counted
    unparsed = summary["judge_stats"].get("judge_unparseable", 0)
    assert unparsed <= 12 and summary["buckets_this_run"]["wrong"] >= unparsed
    counts = run_build(cfg)
    assert counts["questions"] == 6
