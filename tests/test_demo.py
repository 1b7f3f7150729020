"""The demo's wiring at a micro size: every stage runs, a rerun skips them all."""

from __future__ import annotations

import io
import json
import os

from insightv_jax.demo import STAGES, Demo, load_preset

ONE_BUCKET = {"max_length": 128, "buckets": [128]}  # one compile per SFT
MICRO = {
    "parallel": 2,  # what the presets use: SFT subprocesses, the data engine beside the base
    "suite": {"n": 24, "n_eval": 24},
    "tokenizer": {"chains": 24},
    "base": {
        "train": {"steps": 2, "global_batch": 8, "checkpoint_every": 0, "log_every": 1},
        "data": ONE_BUCKET,
    },
    **{
        name: {
            "train": {"steps": 2, "global_batch": 8, "checkpoint_every": 0, "log_every": 1},
            "data": ONE_BUCKET,
        }
        for name in ("reason", "summary", "cot")
    },
    "pipeline": {"num_samples": 2, "questions": 16},
    "dpo": {
        "train": {"epochs": 1, "global_batch": 8},
        "dpo": {
            "rounds": 1,
            "questions_per_round": 8,
            "samples_per_question": 2,
            "reason_max_tokens": 12,
            "min_gap": 0.0,
        },
    },  # fmt: skip
    "eval": {
        "limit": 4,
        "batch_size": 4,
        "bootstrap": 200,
        "sampling": {"cot_max_tokens": 12, "reason_max_tokens": 12},
    },  # fmt: skip
}


def test_demo_micro_runs_every_stage_and_resumes(tmp_path, eight_devices, monkeypatch):
    # The SFT subprocesses see one device each, as in a user's run; the 8 fake
    # devices of this process (conftest; initialised by the fixture before the
    # flags change) made them ~2x slower to compile and run.
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    spec = load_preset("tiny", MICRO)
    out = io.StringIO()
    report = Demo(spec, tmp_path, out=out).run()
    text = out.getvalue()
    for i, name in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {name}: finished" in text
        assert (tmp_path / "stages" / f"{name}.done").exists()
    systems = set(report["systems"])
    assert {"base", "cot", "two_agent"} <= systems
    assert "two_agent_dpo1" in systems  # the DPO round's policy was evaluated
    assert "summary_corrupted" in systems  # the robustness check: deliberately wrong chains
    chains = (tmp_path / "eval" / "corrupted_chains.jsonl").read_text().splitlines()
    assert chains and all(json.loads(c)["chain"] for c in chains)
    for f in ("report.json", "report.txt", "report.png", "predictions.jsonl", "headline.json"):
        assert (tmp_path / "eval" / f).is_file()
    assert json.loads((tmp_path / "eval" / "headline.json").read_text())["families"]
    for agent in ("reason", "summary", "cot"):
        assert (tmp_path / "hf" / agent / "config.json").is_file()
    assert "headline (" in text and "stage wall times" in text
    # the stages shared a persistent compilation cache in the workdir, and the
    # setting did not outlive the run
    assert any((tmp_path / "jax_cache").iterdir())
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    # the data engine ran while the base trained (it does not need the base model)
    assert text.index("[4/8] data: finished") < text.index("[3/8] base: finished")
    # the base trained on direct QA plus one inventory question per training grid image
    perception = json.loads((tmp_path / "data" / "perception.json").read_text())
    assert perception and {r["family"] for r in perception} == {"inventory"}
    assert json.loads((tmp_path / "stages" / "base.done").read_text())["perception"] == len(
        perception
    )
    # a rerun finds every done-marker and redoes nothing
    again = io.StringIO()
    Demo(spec, tmp_path, out=again).run()
    assert again.getvalue().count("skipped") >= len(STAGES)
    assert ": running" not in again.getvalue()


def test_demo_unknown_perception_family_is_a_config_error(tmp_path):
    import pytest

    from insightv_jax.config import ConfigError

    spec = load_preset("tiny", {**MICRO, "suite": {**MICRO["suite"], "perception": "colours"}})
    with pytest.raises(ConfigError, match="suite.perception: unknown synthetic family 'colours'"):
        Demo(spec, tmp_path, out=io.StringIO()).stage_synth()
    assert not (tmp_path / "data").exists()  # nothing written before the check
