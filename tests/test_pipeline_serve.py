"""The data pipeline's `openai` backend against `insightv serve`: generate ->
assess -> build end to end, every role a request to our own server.

The served agent is the tiny LLaVA preset with random weights and 1024
positions. The trained micro agent of conftest has 512, too few: in its
tokenizer the generator's opening turns (system prompt, image and question,
pre-filled reply) take ~430 tokens and each further step ~100 more. The
tokenizer here is trained on the suite's conversations and the pipeline's
prompts, as a real agent's has seen the language it reads. A random model
writes no JSON of its own: with `pipeline.step_schema` the generator asks the
server for the step and final-answer schemas, which it serves by constrained
decoding, so every step parses. Its free-text verdicts and scores do not
parse, and the pipeline counts them as it is built to: an unparsed verdict is
wrong, so assess (almost surely) has no right chain to score, and the scorer's
request (the paths with the image) goes to the server in a test of its own.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import load_config
from insightv_jax.data import conversation as conv
from insightv_jax.data.images import ImageProcessor
from insightv_jax.data.prompts import DEFAULT_PROMPTS, summary_question
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.models.factory import construct
from insightv_jax.pipeline.assess import SCORE_BUCKETS, run_assess
from insightv_jax.pipeline.backend_common import chain_steps_text, parse_step
from insightv_jax.pipeline.build import run_build
from insightv_jax.pipeline.generate import load_queries, run_generate
from insightv_jax.pipeline.openai_backend import OpenAIGenerator, OpenAIScorer
from insightv_jax.pipeline.records import read_shards
from insightv_jax.serve.launch import ServeSettings, build_server
from insightv_jax.serve.protocol import Limits

ROOT = Path(__file__).resolve().parents[1]
QUERIES, SAMPLES, MAX_STEPS, SLOTS = 4, 2, 3, 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(suite folder, server): the random micro agent served as `micro`."""
    root = tmp_path_factory.mktemp("pipeline_serve")
    write_llava(root / "d", QUERIES, seed=3)
    records = open_source(root / "d" / "train.json").records
    p = DEFAULT_PROMPTS
    corpus = [t["value"] for r in records for t in r["conversations"]]
    corpus += [p.generator_system, p.generator_prefill, p.next_step, p.final_answer, p.judge,
               p.scorer]  # fmt: skip
    conv.build_tokenizer(corpus * 2, root / "tok", template="minimal", vocab_size=508)
    cfg = load_config(ROOT / "configs/models/tiny.yaml",
                      ["model.decoder.max_position_embeddings=1024"]).model  # fmt: skip
    ImageProcessor.for_model(cfg).save_pretrained(root / "processor")
    ckpt = save_model_dir(construct(cfg, 0), cfg, root / "micro", tokenizer_dir=root / "tok",
                          processor_dir=root / "processor")  # fmt: skip
    settings = ServeSettings(slots=SLOTS, context=1024, chunk=16, limits=Limits(max_tokens=64))
    server = build_server(ckpt, settings=settings, quiet=True, api_key="")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root / "d", server
    server.begin_shutdown()
    thread.join(30)
    server.close()


def _cfg(suite: Path, out: Path, url: str, *extra: str):
    return load_config(
        ROOT / "configs/pipeline/openai-example.yaml",
        [f"pipeline.data={suite / 'train.json'}", f"pipeline.out={out}",
         f"pipeline.endpoint={url}", "pipeline.generator_model=micro",
         "pipeline.judge_model=micro", "pipeline.scorer_model=micro", "pipeline.step_schema=true",
         f"pipeline.num_samples={SAMPLES}", f"pipeline.concurrency={SLOTS}",
         f"pipeline.prompts.max_steps={MAX_STEPS}", "pipeline.max_new_tokens=40",
         "pipeline.final_tokens=24", "pipeline.judge_max_tokens=8",
         "pipeline.scorer_max_tokens=24", "pipeline.timeout_s=60", "pipeline.shard=0",
         "pipeline.num_shards=1", *extra],
    )  # fmt: skip


def test_generate_assess_build_against_our_server(served, tmp_path):
    suite, server = served
    cfg = _cfg(suite, tmp_path, server.url)
    jobs = QUERIES * SAMPLES

    gen = run_generate(cfg)
    assert gen["samples_written"] == jobs and gen["samples_failed"] == 0
    records = read_shards(tmp_path / "generate")
    keys = sorted(r["key"] for r in records)  # every job once: none lost, none twice
    assert keys == sorted(f"{q['id']}#{s}" for q in load_queries(suite / "train.json")
                          for s in range(SAMPLES))  # fmt: skip
    for rec in records:  # constrained decoding: every step and final answer parsed
        steps = rec["steps"]
        assert 1 <= len(steps) <= MAX_STEPS and rec["error_steps"] == 0
        for step in steps:
            assert parse_step(json.dumps(step)) == step and step["title"] != "Error"
        assert [s["next_action"] for s in steps[:-1]] == ["continue"] * (len(steps) - 1)
        assert steps[-1]["next_action"] == "final_answer" or len(steps) == MAX_STEPS
        assert isinstance(rec["final_answer"], str)
    stats = gen["stats"]
    # one request per step and one per final answer; nothing retried or unparsed
    assert stats["requests"] == sum(len(r["steps"]) for r in records) + jobs
    unwanted = {"retries", "json_retries", "error_steps", "final_unparsed", "requests_failed",
                "malformed_replies", "dialogues_failed"}  # fmt: skip
    assert not unwanted & set(stats), stats

    summary = run_assess(cfg)
    assert summary["questions"] == QUERIES and summary["questions_incomplete"] == 0
    judged = summary["judge_stats"]
    assert judged["requests"] == jobs and "judge_failed" not in judged
    buckets = summary["buckets_this_run"]
    assert sum(buckets.values()) == jobs
    # an untrained judge rarely writes [0]/[1]: such a reply counts as wrong, and is counted
    assert buckets["wrong"] >= judged.get("judge_unparseable", 0)
    assessed = read_shards(tmp_path / "assess")
    by_key = {r["key"]: r for r in records}
    for rec in assessed:
        for s in rec["samples"]:
            assert s["bucket"] in SCORE_BUCKETS and isinstance(s["correct"], bool)
            assert s["chain"] == chain_steps_text(by_key[f"{rec['id']}#{s['sample']}"]["steps"])
            if not s["correct"]:
                assert s["score"] == cfg.pipeline.floor_score and s["bucket"] == "wrong"

    counts = run_build(cfg)
    built = tmp_path / "build"
    sets = {n: json.loads((built / f"{n}.json").read_text()) for n in ("reasoning", "cot",
                                                                       "summary")}  # fmt: skip
    right = sum(any(s["correct"] for s in r["samples"]) for r in assessed)
    assert counts["questions"] == QUERIES and len(sets["reasoning"]) == len(sets["cot"]) <= right
    assert len(sets["summary"]) == sum(counts["summary"].values()) > 0
    wrong = [r for r in sets["summary"] if "-s" in r["id"]]
    assert wrong, counts  # the served chains reach the summary agent's set verbatim
    for r in wrong:
        rec = by_key["#".join(r["id"].rsplit("-s", 1))]
        chain = chain_steps_text(rec["steps"])
        user, reply = (t["value"] for t in r["conversations"])
        assert user == "<image>\n" + summary_question(rec["question"], chain)
        assert reply == rec["answer"]
    assert (built / "pairs.jsonl").is_file() and (built / "manifest.json").is_file()
    assert server.stats["client_errors"] == server.stats["server_errors"] == 0
    assert server.schedulers[0].stats["peak_rows"] > 1  # the dialogues shared the batch


def test_step_schema_is_what_makes_a_random_model_write_steps(served, tmp_path):
    """Without the option the same server answers in free text: the generator's
    fallbacks (an Error step, an unparsed final answer) count it."""
    suite, server = served
    query = load_queries(suite / "train.json")[0]
    for on in (True, False):
        cfg = _cfg(suite, tmp_path, server.url, f"pipeline.step_schema={on}",
                   "pipeline.json_retries=0").pipeline  # fmt: skip
        gen = OpenAIGenerator(cfg, seed=0)
        [(_, chain)] = list(gen.generate([(query, 0)]))
        stats = gen.stats.as_dict()
        if on:
            assert chain["error_steps"] == 0 and "final_unparsed" not in stats
        else:
            assert chain["steps"][0]["title"] == "Error" and stats["error_steps"] == 1
            assert stats["final_unparsed"] == 1


def test_scorer_request_with_its_image_is_served(served, tmp_path):
    """The scorer's request (every path of a question, with the image) through
    our server: answered; a reply without `Path k: s` lines leaves the scores
    missing, counted."""
    suite, server = served
    cfg = _cfg(suite, tmp_path, server.url).pipeline
    query = load_queries(suite / "train.json")[1]
    chains = [[{"title": "Look", "content": "two red squares", "next_action": "continue"}],
              [{"title": "Count", "content": "three", "next_action": "final_answer"}]]  # fmt: skip
    scorer = OpenAIScorer(cfg)
    [scores] = scorer.score_many([(query, chains)])
    stats = scorer.stats.as_dict()
    assert stats["requests"] == 1 and "scorer_failed" not in stats
    assert len(scores) == 2 and all(s is None or 1 <= s <= 100 for s in scores)
    assert stats.get("scores_missing", 0) == sum(s is None for s in scores)
