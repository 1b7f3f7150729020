"""The data pipeline (generate -> assess -> build) with the oracle backends."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from insightv_jax.config import load_config
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.pipeline.assess import run_assess
from insightv_jax.pipeline.build import build_preference_pairs, format_table, run_build
from insightv_jax.pipeline.generate import run_generate
from insightv_jax.pipeline.records import ShardWriter, read_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    write_llava(d, 60, seed=3)
    return d


def _cfg(suite: Path, out: Path, *extra: str):
    return load_config(
        ROOT / "configs/pipeline/synthetic-oracle.yaml",
        [f"pipeline.data={suite / 'train.json'}", f"pipeline.out={out}",
         "pipeline.num_samples=4", "pipeline.batch_size=16", *extra],
    )  # fmt: skip


def _run_all(cfg):
    gen = run_generate(cfg)
    run_assess(cfg)
    return gen, run_build(cfg)


@pytest.fixture(scope="module")
def oracle_run(suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(suite, out, "pipeline.error_rate=0.3", "pipeline.shard=0", "pipeline.num_shards=1")
    gen, counts = _run_all(cfg)
    return cfg, out, gen, counts


def test_counts_follow_the_error_rate(oracle_run):
    cfg, out, gen, counts = oracle_run
    samples = read_shards(out / "generate")
    assert len(samples) == 60 * 4 and gen["samples_written"] == 240
    corrupted = sum(s["corrupted"] for s in samples) / len(samples)
    # binomial(240, 0.3): 4 standard deviations
    assert abs(corrupted - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 240), corrupted
    assessed = {r["id"]: r for r in read_shards(out / "assess")}
    by_key = {(s["id"], s["sample"]): s for s in samples}
    wrong = 0
    for rec in assessed.values():
        for s in rec["samples"]:
            if not s["correct"]:  # every wrong answer comes from an injected error
                assert by_key[(rec["id"], s["sample"])]["corrupted"]
                assert s["score"] == cfg.pipeline.floor_score and s["bucket"] == "wrong"
                wrong += 1
    assert 0 < wrong <= corrupted * 240
    assert counts["buckets"]["wrong"] == wrong
    assert sum(counts["buckets"].values()) == 240
    print("\n" + format_table(counts))
    print(f"generate with the oracle backend: {gen['questions_per_s']} questions/s")


def test_error_rate_zero_is_all_correct(suite, tmp_path):
    cfg = _cfg(suite, tmp_path, "pipeline.error_rate=0.0", "pipeline.num_samples=2",
               "pipeline.shard=0", "pipeline.num_shards=1")  # fmt: skip
    _, counts = _run_all(cfg)
    assert counts["buckets"]["wrong"] == 0
    assert counts["buckets"]["high"] == 120  # oracle chains at error rate 0 score >= 90
    assert counts["reasoning"] == 60 and counts["pairs"].get("pairs", 0) == 0


def test_reasoning_set_holds_only_best_correct_chains(oracle_run):
    cfg, out, _, counts = oracle_run
    assessed = {r["id"]: r for r in read_shards(out / "assess")}
    reasoning = json.loads((out / "build/reasoning.json").read_text())
    cot = json.loads((out / "build/cot.json").read_text())
    assert len(reasoning) == len(cot) == counts["reasoning"] > 0
    for rec, c in zip(reasoning, cot):
        qid = rec["id"].removesuffix("-reason")
        samples = assessed[qid]["samples"]
        best = max(s["score"] for s in samples if s["correct"])
        reply = rec["conversations"][1]["value"]
        assert reply.startswith("<thoughts>\n") and reply.endswith("\n</thoughts>")
        chain = reply[len("<thoughts>\n") : -len("\n</thoughts>")]
        picked = [s for s in samples if s["chain"] == chain]
        assert picked and all(s["correct"] and s["score"] == best for s in picked)
        assert "Perform step-by-step reasoning" in rec["conversations"][0]["value"]
        assert c["conversations"][1]["value"] == (
            f"{reply}\n<output>{assessed[qid]['answer']}</output>"
        )
    summary = json.loads((out / "build/summary.json").read_text())
    parts = counts["summary"]
    assert len(summary) == sum(parts.values())
    live = [n for k, n in parts.items() if counts["summary_available"][k]]
    assert max(live) - min(live) <= 1  # equal parts by default
    assert all(r["conversations"][1]["value"] for r in summary)


def test_pairs_always_prefer_the_higher_score(oracle_run):
    cfg, out, _, counts = oracle_run
    pairs = [json.loads(line) for line in (out / "build/pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == counts["pairs"]["pairs"] > 0
    for p in pairs:
        assert p["chosen_score"] > p["rejected_score"]
        assert p["chosen_score"] - p["rejected_score"] >= cfg.pipeline.min_gap
        assert p["chosen"].startswith("<thoughts>") and p["chosen"] != p["rejected"]
    total = counts["pairs"]["pairs"] + sum(
        n for k, n in counts["pairs"].items() if k.startswith("drop_")
    )
    assert total == 60


def test_build_preference_pairs_drop_reasons():
    items = [{"id": q, "question": "How many?", "answer": "2"} for q in "abcd"]
    s = lambda chain, score, correct: {"chain": chain, "score": score, "correct": correct}  # noqa: E731
    samples = {
        "a": [s("x: 2", 90, True), s("y: 3", 1, False), s("z: 2", 60, True)],
        "b": [s("x: 2", 85, True), s("y: 2", 80, True)],  # gap 5 < 10
        "c": [s("x: 3", 1, False), s("y: 4", 1, False)],  # no correct chain
        "d": [s("x: 2", None, True)],
    }
    pairs, counts = build_preference_pairs(items, samples, min_gap=10, round=2)
    assert [p["id"] for p in pairs] == ["a-r2"]
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (90.0, 1.0)
    assert pairs[0]["rejected"] == "<thoughts>\ny: 3\n</thoughts>" and pairs[0]["round"] == 2
    assert counts == {"pairs": 1, "drop_gap": 1, "drop_no_correct": 1,
                      "drop_too_few_samples": 1, "unscored_samples": 1}  # fmt: skip


def test_two_shards_merge_to_the_single_process_result(suite, oracle_run, tmp_path):
    _, single_out, _, single_counts = oracle_run
    for k in range(2):
        cfg = _cfg(suite, tmp_path, "pipeline.error_rate=0.3", f"pipeline.shard={k}",
                   "pipeline.num_shards=2")  # fmt: skip
        run_generate(cfg)
        run_assess(cfg)
    shards = sorted(p.name for p in (tmp_path / "generate").glob("shard-*"))
    assert shards == ["shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    counts = run_build(cfg)
    assert counts == single_counts | {"image_root": counts["image_root"]}
    for name in ("reasoning.json", "summary.json", "pairs.jsonl"):
        assert (tmp_path / "build" / name).read_text() == (single_out / "build" / name).read_text()


def test_torn_last_line_is_dropped_and_rewritten(tmp_path):
    path = tmp_path / "shard-00000-of-00001.jsonl"
    with ShardWriter(path) as w:
        assert w.write({"key": "q#0", "v": 1}) and not w.write({"key": "q#0", "v": 2})
    with open(path, "ab") as f:
        f.write(b'{"key": "q#1", "v"')  # killed mid-write
    with ShardWriter(path) as w:
        assert w.done == {"q#0"}
        w.write({"key": "q#1", "v": 3})
    assert [r["v"] for r in read_shards(tmp_path)] == [1, 3]


def test_writer_syncs_once_a_second_and_on_close(tmp_path, monkeypatch):
    from insightv_jax.pipeline import records

    synced = []
    monkeypatch.setattr(records.os, "fsync", lambda fd: synced.append(fd))
    with ShardWriter(tmp_path / "shard-00000-of-00001.jsonl") as w:
        for i in range(100):
            w.write({"key": f"q#{i}"})
        assert len(synced) <= 1  # a fast burst: not a disk flush per line
    assert len(synced) <= 2 and len(read_shards(tmp_path)) == 100  # the close syncs
    synced.clear()
    with ShardWriter(tmp_path / "b" / "shard-00000-of-00001.jsonl", sync_every=0.0) as w:
        for i in range(10):
            w.write({"key": f"q#{i}"})
        assert len(synced) == 10


def test_sigkill_halfway_then_rerun_loses_and_duplicates_nothing(suite, oracle_run, tmp_path):
    _, ref_out, _, _ = oracle_run
    args = [sys.executable, "-m", "insightv_jax.cli", "generate",
            "--config", str(ROOT / "configs/pipeline/synthetic-oracle.yaml"),
            f"pipeline.data={suite / 'train.json'}", f"pipeline.out={tmp_path}",
            "pipeline.num_samples=4", "pipeline.batch_size=16", "pipeline.error_rate=0.3",
            "pipeline.shard=0", "pipeline.num_shards=1"]  # fmt: skip
    shard = tmp_path / "generate/shard-00000-of-00001.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([*args, "pipeline.oracle_delay_s=0.02"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 30
    while time.time() < deadline:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 80:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    halfway = shard.read_bytes().count(b"\n")
    assert 80 <= halfway < 240, halfway
    subprocess.run(args, env=env, cwd=ROOT, check=True, capture_output=True)
    lines = shard.read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == 240
    got = {r["key"]: r for r in map(json.loads, lines)}
    ref = {r["key"]: r for r in read_shards(ref_out / "generate")}
    assert got == ref


def test_cli_stages_and_bad_input(suite, tmp_path, capsys):
    from insightv_jax import cli

    base = ["--config", str(ROOT / "configs/pipeline/synthetic-oracle.yaml"),
            f"pipeline.data={suite / 'train.json'}", f"pipeline.out={tmp_path}",
            "pipeline.num_samples=1", "pipeline.shard=0", "pipeline.num_shards=1"]  # fmt: skip
    for stage in ("generate", "assess", "build"):
        assert cli.main([stage, *base]) == 0
    assert "reasoning set" in capsys.readouterr().out
    assert cli.main(["generate", *base, f"pipeline.data={tmp_path / 'none.json'}"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.json'}: file not found"
    assert cli.main(["build", *base, f"pipeline.out={tmp_path / 'empty'}"]) == 1
    assert "no shard-*.jsonl files" in capsys.readouterr().err


def test_summary_set_takes_agent_chains_verbatim_and_slips(suite, oracle_run, tmp_path):
    import random

    from insightv_jax.pipeline.build import arithmetic_slip, build_sets
    from insightv_jax.pipeline.generate import load_queries

    rng = random.Random(0)
    chain = "Count: red squares: 1\nCount: blue circles: 2\nCompute: 1 + 2 = 3\nAnswer: answer 3"
    slipped = arithmetic_slip(chain, rng)
    assert slipped in (chain.replace("3", "2"), chain.replace("3", "4"))  # carried to the answer
    assert arithmetic_slip("Count: red squares: 1\nAnswer: answer 1", rng) is None
    assert arithmetic_slip("Compute: 1 + 2 = 4", rng) is None  # already wrong: no slip to add

    cfg, out, _, _ = oracle_run
    queries = load_queries(cfg.pipeline.data)
    assessed = read_shards(out / "assess")
    agent = [
        {"key": f"{q['id']}#a0", "id": q["id"], "sample": 0, "image": q.get("image"),
         "question": q["question"], "answer": q["answer"], "correct": i % 2 == 0,
         "chain": f"Look: agent chain {i}\nAnswer: answer {q['answer']}"}
        for i, q in enumerate(queries[:10])
    ]  # fmt: skip
    mix = {"high": 1.0, "mid": 0.0, "low": 0.0, "wrong": 0.0, "general": 0.0, "agent": 1.0,
           "slip": 1.0}  # fmt: skip
    p = dataclasses.replace(cfg.pipeline, summary_mix=mix)
    _, _, summary, _, counts = build_sets(assessed, queries, p, 0, agent)
    assert counts["summary"]["agent"] == 10 and counts["agent_chains"] == {"chains": 10, "right": 5}
    users = {r["id"]: r["conversations"][0]["value"] for r in summary}
    answers = {r["id"]: r["conversations"][1]["value"] for r in summary}
    for a in agent:  # the agent's chain text verbatim, answered with the ground truth
        assert a["chain"] in users[f"{a['id']}-a0"] and answers[f"{a['id']}-a0"] == a["answer"]
    slips = [k for k in users if k.endswith("-slip")]
    assert len(slips) == counts["summary"]["slip"] > 0
    truth = {q["id"]: q["answer"] for q in queries}
    assert all(answers[k] == truth[k[: -len("-slip")]] for k in slips)
