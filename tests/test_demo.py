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
    "pipeline": {
        "num_samples": 2,
        "questions": 16,
        "agent_questions": 16,
        "agent_samples": 2,
        "agent_max_tokens": 12,
    },
    "dpo": {
        "train": {"epochs": 1, "global_batch": 8},
        "dpo": {
            "rounds": 1,
            "questions_per_round": 8,
            "samples_per_question": 2,
            "reason_max_tokens": 12,
            "min_gap": 0.0,
            "eval_limit": 4,
            "sample_batch": 8,
            "logprob_batch": 8,
        },
    },  # fmt: skip
    "rl": {
        "train": {"lr": 1.0e-4, "schedule": "constant", "warmup_fraction": 0.0},
        "data": ONE_BUCKET,
        "rl": {
            "rounds": 1,
            "agent": "summary",  # J-GRPO (the reasoning agent's RL: test_rl_loop.py)
            "questions_per_round": 4,
            "group_size": 2,
            "sample_batch": 8,
            "max_response_tokens": 12,
            "logprob_batch": 8,
            "eval_limit": 4,
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
    assert "two_agent_rl1" in systems  # and the RL round's, beside it
    # the RL round trained the summary agent, on corrupted chains of train questions too
    assert "summary_corrupted_rl" in systems
    assert (tmp_path / "runs" / "rl_given_chains.jsonl").is_file()
    assert "summary_corrupted" in systems  # the robustness check: deliberately wrong chains
    chains = (tmp_path / "eval" / "corrupted_chains.jsonl").read_text().splitlines()
    assert chains and all(json.loads(c)["chain"] for c in chains)
    # every corrupted chain says where its error shows (text or image only)
    assert {json.loads(c)["kind"] for c in chains} <= {"text", "image", None}
    # both decodings were evaluated, each with its own report; the headline uses reference
    for rule in ("reference", "greedy"):
        for f in ("report.json", "report.txt", "report.png", "predictions.jsonl"):
            assert (tmp_path / "eval" / rule / f).is_file()
        meta = json.loads((tmp_path / "eval" / rule / "report.json").read_text())["meta"]
        assert meta["decoding"] == rule
    assert "decoding: reference" in text and "decoding: greedy" in text
    assert json.loads((tmp_path / "eval" / "reference" / "headline.json").read_text())["families"]
    # the reasoning agent's own chains reached the summary set verbatim (METHOD §3)
    from insightv_jax.pipeline.records import read_shards

    agent = read_shards(tmp_path / "pipeline" / "agent_chains")
    assert len(agent) == 16 * 2
    summary = json.loads((tmp_path / "pipeline" / "build" / "summary.json").read_text())
    users = {r["id"]: r["conversations"][0]["value"] for r in summary}
    used = [a for a in agent if f"{a['id']}-a{a['sample']}" in users]
    assert used and all(a["chain"].strip() in users[f"{a['id']}-a{a['sample']}"] for a in used)
    # the agents carry the wording they were trained with
    from insightv_jax.data.prompts import read_prompts

    for agent_dir in ("reason", "summary", "cot"):
        got = read_prompts(tmp_path / "runs" / agent_dir)
        assert got is not None and got.summary_instruction == "check the reasoning"
        assert read_prompts(tmp_path / "hf" / agent_dir) == got
    for agent in ("reason", "summary", "cot"):
        assert (tmp_path / "hf" / agent / "config.json").is_file()
    assert "headline (" in text and "stage wall times" in text
    # the stages shared a persistent compilation cache in the workdir, and the
    # setting did not outlive the run
    assert any((tmp_path / "jax_cache").iterdir())
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    # the data engine ran while the base trained (it does not need the base model)
    assert text.index(f"[4/{len(STAGES)}] data: finished") < text.index(
        f"[3/{len(STAGES)}] base: finished"
    )
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
