"""The `openai` backend against a real HTTP server on 127.0.0.1 that plays the
oracle teacher, judge and scorer as a chat model — plus scripted faults."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from insightv_jax.config import load_config
from insightv_jax.data.prompts import DEFAULT_PROMPTS
from insightv_jax.data.synthetic.oracle import OracleJudge, OracleScorer
from insightv_jax.data.synthetic.teacher import OracleTeacher
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.pipeline.assess import run_assess
from insightv_jax.pipeline.backend_common import BackendError, job_seed, parse_step
from insightv_jax.pipeline.build import run_build
from insightv_jax.pipeline.generate import load_queries, run_generate
from insightv_jax.pipeline.openai_backend import (
    OpenAIGenerator,
    OpenAIJudge,
    OpenAIScorer,
    image_data_url,
)
from insightv_jax.pipeline.records import read_shards

ROOT = Path(__file__).resolve().parents[1]
SEED, ERROR_RATE, SAMPLES = 0, 0.3, 2


class OracleChat:
    """Chat replies of the oracle: the request's seed names (query, sample)."""

    def __init__(self, queries: list[dict]):
        self.teacher = OracleTeacher(ERROR_RATE, "full", SEED)
        self.judge, self.scorer = OracleJudge(SEED), OracleScorer()
        self.by_seed = {job_seed(SEED, q["id"], s): (q, s) for q in queries for s in range(SAMPLES)}
        self.by_image = {image_data_url(q["image_path"]): q for q in queries}

    def reply(self, req: dict) -> str:
        msgs = req["messages"]
        if req["model"] == "generator":
            chain = self.teacher.chain(*self.by_seed[req["seed"]])
            if msgs[-1]["content"] == DEFAULT_PROMPTS.final_answer:
                return json.dumps({"title": "FINAL ANSWER", "content": chain["final_answer"]})
            done = sum(
                m["role"] == "assistant" and parse_step(m["content"]) is not None for m in msgs[3:]
            )
            return json.dumps(chain["steps"][done])
        if req["model"] == "judge":
            m = re.search(
                r"Question: (.*)\nGround truth: (.*?)\nPredicted answer: (.*)\nVerdict:$",
                msgs[0]["content"], re.DOTALL,
            )  # fmt: skip
            return self.judge.judge(*m.groups())[1]
        image, text = msgs[0]["content"][0]["image_url"]["url"], msgs[0]["content"][1]["text"]
        paths = re.split(r"^Path \d+:\n", text, flags=re.MULTILINE)[1:]
        scores = self.scorer.score(self.by_image[image], [p.strip() for p in paths])
        return "\n".join(f"Path {i + 1}: {s}" for i, s in enumerate(scores))


class ChatServer:
    """A threaded chat-completions server; `script` holds faults served first."""

    def __init__(self, chat: OracleChat):
        self.chat, self.script, self.lock = chat, [], threading.Lock()
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    action = server.script.pop(0) if server.script else ("oracle", None)
                kind, arg = action
                if kind == "sleep":
                    time.sleep(arg)
                    kind = "oracle"
                if kind == "status":
                    self.send_response(arg)
                    self.end_headers()
                    return
                if kind == "body":
                    body = arg
                else:
                    text = server.chat.reply(req) if kind == "oracle" else arg
                    body = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.stopper = threading.Timer(120, self.httpd.shutdown)  # stops by itself
        self.stopper.daemon = True
        self.stopper.start()

    def close(self):
        self.stopper.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    write_llava(d, 16, seed=5)
    return d


@pytest.fixture(scope="module")
def server(suite):
    s = ChatServer(OracleChat(load_queries(suite / "train.json")))
    yield s
    s.close()


def _cfg(suite, out, backend, *extra):
    return load_config(
        ROOT / "configs/pipeline/synthetic-oracle.yaml",
        [f"pipeline.data={suite / 'train.json'}", f"pipeline.out={out}",
         f"pipeline.num_samples={SAMPLES}", f"pipeline.error_rate={ERROR_RATE}",
         "pipeline.shard=0", "pipeline.num_shards=1", f"seed={SEED}",
         f"pipeline.generator={backend}", f"pipeline.judge={backend}",
         f"pipeline.scorer={backend}", *extra],
    )  # fmt: skip


def test_through_the_server_equals_the_backend_called_directly(suite, server, tmp_path):
    outs = {}
    for backend, extra in (
        ("oracle", ()),
        ("openai", (f"pipeline.endpoint={server.url}", "pipeline.concurrency=4")),
    ):
        cfg = _cfg(suite, tmp_path / backend, backend, *extra)
        gen = run_generate(cfg)
        run_assess(cfg)
        outs[backend] = (gen, run_build(cfg))
    gen = outs["openai"][0]
    assert gen["samples_failed"] == 0 and gen["stats"].get("retries", 0) == 0
    fields = ("steps", "final_answer")
    direct, served = (
        {r["key"]: [r[f] for f in fields] for r in read_shards(tmp_path / b / "generate")}
        for b in ("oracle", "openai")
    )
    assert direct == served and len(direct) == 16 * SAMPLES
    assessed = [read_shards(tmp_path / b / "assess") for b in ("oracle", "openai")]
    key = lambda recs: sorted(json.dumps(r, sort_keys=True) for r in recs)  # noqa: E731
    assert key(assessed[0]) == key(assessed[1])
    assert outs["oracle"][1]["buckets"] == outs["openai"][1]["buckets"]
    for name in ("reasoning.json", "cot.json", "summary.json", "pairs.jsonl"):
        a, b = (tmp_path / x / "build" / name for x in ("oracle", "openai"))
        assert a.read_text() == b.read_text(), name


def _fault_cfg(suite, server, tmp_path, *extra):
    cfg = _cfg(suite, tmp_path, "openai", f"pipeline.endpoint={server.url}",
               "pipeline.concurrency=1", "pipeline.timeout_s=0.5", "pipeline.backoff_s=0.01",
               "pipeline.retries=3", "pipeline.json_retries=3", *extra)  # fmt: skip
    return cfg.pipeline


def test_faults_are_retried_and_counted(suite, server, tmp_path):
    p = _fault_cfg(suite, server, tmp_path)
    query = load_queries(suite / "train.json")[0]
    expect = OracleTeacher(ERROR_RATE, "full", SEED).chain(query, 0)
    server.script[:] = [
        ("status", 500), ("body", b"{not json"), ("sleep", 1.0),  # one request, 3 retries
        ("reply", "Sure! The first step is to look."), ("reply", '{"title": "x"}'),
    ]  # fmt: skip
    gen = OpenAIGenerator(p, SEED)
    [(i, chain)] = list(gen.generate([(query, 0)]))
    assert chain["steps"] == expect["steps"] and chain["final_answer"] == expect["final_answer"]
    stats = gen.stats.as_dict()
    assert stats["http_500"] == 1 and stats["malformed_replies"] == 1
    assert stats["timeouts"] == 1 and stats["retries"] == 3 and stats["json_retries"] == 2
    assert "error_steps" not in stats and chain["error_steps"] == 0

    # invalid JSON 4 times: an Error step, then the final answer
    server.script[:] = [("reply", "no json here")] * 4
    [(_, chain)] = list(gen.generate([(query, 0)]))
    assert chain["steps"][0] == {"title": "Error", "content": "no json here",
                                 "next_action": "final_answer"}  # fmt: skip
    assert chain["error_steps"] == 1 and gen.stats.as_dict()["error_steps"] == 1

    # a request that fails every retry: the job fails (None), the run goes on
    server.script[:] = [("status", 503)] * 4
    [(_, chain)] = list(gen.generate([(query, 1)]))
    assert chain is None and gen.stats.as_dict()["dialogues_failed"] == 1


def test_judge_and_scorer_fallbacks_are_counted(suite, server, tmp_path):
    p = _fault_cfg(suite, server, tmp_path)
    query = load_queries(suite / "train.json")[0]
    judge = OpenAIJudge(p)
    server.script[:] = [("reply", "They look the same to me."), ("status", 502)]
    assert judge.judge_many([("q?", "3", "3")]) == [0]  # unparseable -> 0
    assert judge.judge_many([("q?", "3", "3")]) == [1]  # 502, then the oracle's [1]
    assert judge.stats.as_dict()["judge_unparseable"] == 1
    assert judge.stats.as_dict()["http_502"] == 1
    server.script[:] = [("status", 500)] * 4
    assert judge.judge_many([("q?", "3", "3")]) == [0]
    assert judge.stats.as_dict()["judge_failed"] == 1

    scorer = OpenAIScorer(p)
    server.script[:] = [("reply", "Path 1: 120\nPath two is weak")]
    assert scorer.score_many([(query, ["a: 1", "b: 2"])]) == [[100.0, None]]
    assert scorer.stats.as_dict()["scores_missing"] == 1


def test_run_survives_failures_and_a_rerun_completes(suite, server, tmp_path):
    cfg = _cfg(suite, tmp_path, "openai", f"pipeline.endpoint={server.url}",
               "pipeline.concurrency=1", "pipeline.backoff_s=0.01", "pipeline.retries=1",
               "pipeline.num_samples=1")  # fmt: skip
    server.script[:] = [("status", 500)] * 2  # the first dialogue fails
    first = run_generate(cfg)
    assert first["samples_failed"] == 1 and first["samples_written"] == 15
    again = run_generate(cfg)
    assert again["samples_written"] == 1 and again["samples_resumed"] == 15
    assert len(read_shards(tmp_path / "generate")) == 16


def test_client_errors_stop_with_one_line(suite, server, tmp_path):
    p = _fault_cfg(suite, server, tmp_path)
    server.script[:] = [("status", 401)]
    with pytest.raises(BackendError, match="HTTP 401"):
        OpenAIJudge(p).judge_many([("q?", "3", "3")])
