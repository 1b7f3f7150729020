"""`insightv serve` with the official `openai` client, against the session's
trained micro LLaVA agent (conftest): chat, images, streaming, the step schema,
two-agent, bad requests, a concurrent load, limits, the API key and shutdown."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")

from insightv_jax.data.sources import open_source  # noqa: E402
from insightv_jax.sample.constrain import StepConstraint  # noqa: E402
from insightv_jax.sample.reasoning import encoder_of, generate_encoded, sample_groups  # noqa: E402
from insightv_jax.sample.sampler import SamplingParams  # noqa: E402
from insightv_jax.serve.api import Server  # noqa: E402
from insightv_jax.serve.launch import ServeSettings, build_server  # noqa: E402
from insightv_jax.serve.models import AgentModel  # noqa: E402
from insightv_jax.serve.protocol import STEP_JSON_SCHEMA, Limits  # noqa: E402
from insightv_jax.serve.scheduler import Scheduler  # noqa: E402
from insightv_jax.serve.text import ReplyText  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLOTS, CONTEXT, SCHEMA_TOKENS, LOAD = 4, 512, 120, 32
LIMITS = Limits(max_tokens=160, max_image_bytes=64 << 10, max_body_bytes=1 << 20)


@pytest.fixture(scope="module")
def served(micro_llava_agent):
    """The micro agent served as `micro` and (reasoning and summary agent at
    once) `two-agent`, in this process: 4 decode slots, 16-token chunks."""
    from insightv_jax.sample.infer import load_agent

    root, run = micro_llava_agent
    sampler = load_agent(run)
    settings = ServeSettings(slots=SLOTS, context=CONTEXT, chunk=16, reason_max_tokens=48,
                             limits=LIMITS)  # fmt: skip
    server = build_server(run, run, name="micro", settings=settings, quiet=True, api_key="",
                          samplers={str(run): sampler})  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    records = open_source(root / "d" / "train.json").records
    rows = [(r["question"], root / "d" / r["image"]) for r in records]
    yield SimpleNamespace(server=server, client=client, sampler=sampler, run=run, rows=rows,
                          scheduler=server.schedulers[0])  # fmt: skip
    server.begin_shutdown()
    thread.join(30)
    server.close()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_message(question: str, image: Path) -> dict:
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": question}]}  # fmt: skip


def reference(sampler, question: str, image: Path | None, params: SamplingParams) -> dict:
    """Our library's greedy reply to the same prompt, decoded alone."""
    enc = encoder_of(sampler)
    if image is None:
        e = enc.prompt([{"role": "user", "content": question}])
    else:
        e = enc.prompt([{"role": "user", "content": "<image>\n" + question}], [str(image)])
    return generate_encoded(sampler, [e], params)[0]


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -------------------------------------------------------------------- text


class _CharTokenizer:
    """One character per token; id 0 is the end of turn."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i)


def test_stream_pieces_hold_back_what_may_change():
    tok = _CharTokenizer()
    ids = [ord(c) for c in "ab STOP cd"]
    r = ReplyText(tok, ends=[0], stops=("STOP",))
    pieces = [r.piece(ids[:k]) for k in range(1, 6)]  # up to "ab ST": "ST" may begin STOP
    assert "".join(pieces) == "ab " and r.final(ids) == "ab "
    assert r.last_piece(ids) == "" and r.stopped(ids)
    s = ReplyText(tok, ends=[0], strip=True)
    text = [ord(c) for c in "  hi there  "] + [0]
    joined = "".join(s.piece(text[:k]) for k in range(1, len(text))) + s.last_piece(text)
    assert joined == s.final(text) == "hi there"
    u = ReplyText(tok, ends=[0])
    assert u.piece([ord("a"), 0xFFFD]) == "a"  # an incomplete UTF-8 sequence waits


# -------------------------------------------------------------------- chat


def test_models_are_listed(served):
    names = [m.id for m in served.client.models.list().data]
    assert names == ["micro", "two-agent"]


def test_greedy_chat_and_image_equal_generate_encoded(served):
    params = SamplingParams(max_new_tokens=32)
    for question, image in (served.rows[0][0], None), (served.rows[1][0], None), served.rows[2]:
        msg = image_message(question, image) if image else {"role": "user", "content": question}
        r = served.client.chat.completions.create(model="micro", messages=[msg], temperature=0,
                                                  max_tokens=32)  # fmt: skip
        ref = reference(served.sampler, question, image, params)
        assert r.choices[0].message.content == ref["text"]
        assert r.choices[0].finish_reason == ref["finish_reason"]
        assert r.usage.completion_tokens == len(ref["tokens"])


def test_seeded_stream_equals_reply_and_library_samples(served):
    """n samples share one prefill and draw with the keys `sample_groups` gives
    them: the same text streamed, not streamed, and from the library."""
    question = served.rows[3][0]
    kw = dict(model="micro", messages=[{"role": "user", "content": question}], temperature=1.0,
              top_p=0.9, seed=11, max_tokens=48, n=2)  # fmt: skip
    whole = served.client.chat.completions.create(**kw)
    pieces, usage = {0: [], 1: []}, None
    for chunk in served.client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces[c.index].append(c.delta.content or "")
    streamed = ["".join(pieces[i]) for i in range(2)]
    assert streamed == [c.message.content for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    enc = encoder_of(served.sampler).prompt([{"role": "user", "content": question}])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=48)
    lib = sample_groups(served.sampler, [enc], 2, params, keys=[0])
    assert streamed == [r["text"] for r in lib]
    # stop strings: the reply ends before the first one, streamed or not
    text = streamed[0]
    stop = text[3:6] if len(text) >= 6 else text[-2:]
    kw.update(n=1, stop=[stop])
    cut = served.client.chat.completions.create(**kw).choices[0]
    assert cut.message.content == text[: text.find(stop)] and cut.finish_reason == "stop"
    joined = "".join(c.choices[0].delta.content or "" for c in
                     served.client.chat.completions.create(**kw, stream=True) if c.choices)  # fmt: skip
    assert joined == cut.message.content


def test_step_schema_is_constrained_decoding(served):
    pydantic_like = {  # what `openai`'s pydantic helpers write: annotated properties
        "title": "Step", "type": "object", "additionalProperties": False,
        "required": ["title", "content", "next_action"],
        "properties": {"title": {"title": "Title", "type": "string"},
                       "content": {"title": "Content", "type": "string"},
                       "next_action": {"title": "Next Action", "type": "string",
                                       "enum": ["continue", "final_answer"]}},
    }  # fmt: skip
    question, image = served.rows[4]
    sampler = served.sampler
    e = encoder_of(sampler).prompt([{"role": "user", "content": "<image>\n" + question}],
                                   [str(image)])  # fmt: skip
    ends = tuple(encoder_of(sampler).end_of_turn())
    ref = sampler.generate([e.ids], SamplingParams(max_new_tokens=SCHEMA_TOKENS,
                                                   stop_token_ids=ends),
                           constraint=StepConstraint(sampler.tokenizer),
                           **encoder_of(sampler).images([e]))[0]  # fmt: skip
    for schema in (STEP_JSON_SCHEMA, pydantic_like):
        r = served.client.chat.completions.create(
            model="micro", messages=[image_message(question, image)], temperature=0,
            max_tokens=SCHEMA_TOKENS,
            response_format={"type": "json_schema", "json_schema": {"name": "step",
                                                                    "schema": schema}},
        )  # fmt: skip
        content = r.choices[0].message.content
        step = json.loads(content)
        assert set(step) == {"title", "content", "next_action"}
        assert step["next_action"] in ("continue", "final_answer")
        assert content == ref["text"] and r.choices[0].finish_reason == "stop"
    bad = dict(STEP_JSON_SCHEMA, properties={"answer": {"type": "integer"}})
    with pytest.raises(openai.BadRequestError, match="only our reasoning-step schema"):
        served.client.chat.completions.create(
            model="micro", messages=[{"role": "user", "content": question}], max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )  # fmt: skip


def test_two_agent_equals_infer(served):
    """The served two-agent answer and chain are `insightv infer --decoding greedy`'s:
    `two_agent_answer` in the agents' trained wording (the run's prompts.json)."""
    from insightv_jax.checkpoint import agent_prompts
    from insightv_jax.sample.infer import InferSettings
    from insightv_jax.sample.reasoning import two_agent_answer

    question, image = served.rows[5]
    greedy = InferSettings.for_decoding("greedy")
    reason = SamplingParams(temperature=greedy.reason_temperature, top_p=greedy.top_p,
                            max_new_tokens=48)  # fmt: skip
    answer = dataclasses.replace(reason, temperature=greedy.summary_temperature, max_new_tokens=24)
    ref = two_agent_answer(served.sampler, served.sampler, [question], reason, answer,
                           agent_prompts(None, served.run, served.run), [[str(image)]])[0]  # fmt: skip
    for stream in (False, True):
        kw = dict(model="two-agent", messages=[image_message(question, image)], temperature=0,
                  max_tokens=24)  # fmt: skip
        if not stream:
            message = served.client.chat.completions.create(**kw).choices[0].message
            answer, chain = message.content, message.reasoning_content
        else:
            answer = chain = ""
            for chunk in served.client.chat.completions.create(**kw, stream=True):
                for c in chunk.choices:
                    answer += c.delta.content or ""
                    chain += getattr(c.delta, "reasoning_content", None) or ""
        assert (answer, chain) == (ref["answer"], ref["chain"])


# ------------------------------------------------------------- bad requests


def test_bad_requests_are_4xx_with_a_message_and_serving_goes_on(served, tmp_path):
    url, c = served.server.url, served.client
    ok = {"model": "micro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(80 << 10))
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (dict(ok, model="nope"), 400, "not served here"),
        (dict(ok, messages=[]), 400, "non-empty list"),
        (dict(ok, messages=[{"role": "tool", "content": "x"}]), 400, "role 'tool'"),
        (dict(ok, messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400,
         "part type 'audio'"),
        (dict(ok, messages=[{"role": "user", "content": "look <image>"}]), 400,
         "may not contain <image>"),
        (dict(ok, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/a.png"}}]}]), 400, "not fetched"),
        (dict(ok, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "/etc/passwd"}}]}]), 400, "--image-root"),
        (dict(ok, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,@@@"}}]}]), 400, "base64"),
        (dict(ok, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": data_url(big)}}]}]), 400, "over the server's limit"),
        (dict(ok, max_tokens=10_000), 400, "server's limit"),
        (dict(ok, n=9), 400, "n 9"),
        (dict(ok, temperature=3), 400, "temperature 3"),
        (dict(ok, tools=[{"type": "function"}]), 400, "tools"),
        (dict(ok, response_format={"type": "json_object"}), 400, "general JSON"),
        (dict(ok, response_format={"type": "json_schema", "json_schema": {
            "schema": STEP_JSON_SCHEMA}}, max_tokens=8), 400, "cannot fit a step object"),
        (dict(ok, model="two-agent", messages=[{"role": "user", "content": "a"},
                                               {"role": "assistant", "content": "b"},
                                               {"role": "user", "content": "c"}]), 400,
         "one user message"),
        (b"{" + b" " * (1 << 20) + b"}", 413, "over the server's limit"),
    ]  # fmt: skip
    for body, status, words in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, reply = post(url, raw)
        assert got == status and words in reply["error"]["message"], (body, reply)
        assert reply["error"]["type"] and reply["error"]["code"]
    with pytest.raises(openai.BadRequestError, match="not served here"):
        c.chat.completions.create(model="gpt-4", messages=ok["messages"])
    prefilled = ok["messages"] + [{"role": "assistant", "content": "Understood."}]
    for messages in ok["messages"], prefilled:  # a pre-filled reply is a turn of its own
        r = c.chat.completions.create(model="micro", messages=messages, temperature=0,
                                      max_tokens=4)  # fmt: skip
        assert r.choices[0].message.content is not None


# -------------------------------------------------------------------- load


def test_concurrent_requests_are_each_served_as_alone(served):
    """32 concurrent requests (greedy text and image; every fourth seeded
    sampling, which runs on to 40 tokens) on the fixture's fixed server: 4
    decode slots, each prompt prefilled alone in the one 64-token bucket. None
    lost, none served twice, each reply (text, finish reason, token counts)
    equal to the same request served alone, and the batch really held several
    at once."""
    c, rows = served.client, served.rows
    requests = []
    for i in range(LOAD):
        question, image = rows[6 + i]
        kw = dict(model="micro", temperature=0, max_tokens=24,
                  messages=[image_message(question, image) if i % 3 == 0 else
                            {"role": "user", "content": question}])  # fmt: skip
        if i % 4 == 1:
            kw.update(temperature=1.0, seed=100 + i, max_tokens=40)
        requests.append(kw)
    before = dict(served.scheduler.stats)

    def ask(kw):
        r = c.chat.completions.create(**kw)
        (choice,) = r.choices
        usage = (r.usage.prompt_tokens, r.usage.completion_tokens)
        return r.id, (choice.message.content, choice.finish_reason, usage)

    with ThreadPoolExecutor(LOAD) as pool:
        together = list(pool.map(ask, requests))  # a lost request raises (or times out)
    alone = [ask(kw) for kw in requests]
    assert len(together) == len(alone) == LOAD
    assert len({rid for rid, _ in together + alone}) == 2 * LOAD  # a reply each, none shared
    assert [reply for _, reply in together] == [reply for _, reply in alone]
    prompt_tokens = [usage[0] for _, (_, _, usage) in alone]
    assert max(prompt_tokens) <= served.scheduler.prefill_bucket  # one prefill shape for all
    stats = served.scheduler.stats
    # the scheduler took each request once and gave it one row: none duplicated
    assert stats["jobs"] - before["jobs"] == stats["rows"] - before["rows"] == 2 * LOAD
    assert stats["peak_rows"] == SLOTS  # the batch was full at some point


# ------------------------------------------------- limits, key and shutdown


def _status(fn):
    try:
        fn()
        return 200
    except openai.APIStatusError as e:
        return e.status_code


def test_queue_limit_api_key_and_graceful_shutdown(served):
    """A server with a one-request queue and an API key on the same agent; a
    gate before each decode chunk holds requests in place while we look."""
    sched = Scheduler(served.sampler, slots=SLOTS, context=CONTEXT, max_queue=1, name="small")
    gate, decode_chunk = threading.Event(), sched._decode_chunk
    sched._decode_chunk = lambda: gate.wait() and decode_chunk()
    server = Server({"micro": AgentModel("micro", sched, 160)}, [sched], quiet=True, api_key="k")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    health = server.url.removesuffix("/v1") + "/health"

    def load():
        with urllib.request.urlopen(health) as resp:  # no key needed
            return json.loads(resp.read())["agents"]["small"]

    def until(what):
        while not what(load()):
            time.sleep(0.01)

    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0, timeout=120)
        full = dict(model="micro", messages=[{"role": "user", "content": "Count."}], n=SLOTS,
                    temperature=0, max_tokens=8)  # fmt: skip
        ask = lambda: _status(lambda: client.chat.completions.create(**full))  # noqa: E731
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask)  # takes every slot
            until(lambda x: x["busy_rows"] == SLOTS)
            waiting = pool.submit(ask)  # the one place in the queue
            until(lambda x: x["waiting"] == 1)
            assert ask() == 429
            gate.set()
            assert running.result() == waiting.result() == 200
            gate.clear()
            running = pool.submit(ask)
            until(lambda x: x["busy_rows"] == SLOTS)
            queued = pool.submit(ask)
            until(lambda x: x["waiting"] == 1)
            server.begin_shutdown()  # what SIGTERM calls
            assert queued.result() == 503
            gate.set()
            assert running.result() == 200
        thread.join(30)
        assert not thread.is_alive()
    finally:
        gate.set()
        server.begin_shutdown()
        server.close()


def test_cli_serves_and_exits_0_on_sigterm(micro_llava_agent):
    _, run = micro_llava_agent
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("INSIGHTV_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "insightv_jax.cli", "serve", "--model", str(run), "--port", "0",
         "--slots", "2", "--context", "256", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split()[2]
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="-").models.list().data] == [
            "run"
        ]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopped" in out and "SIGTERM" in err
    finally:
        if proc.poll() is None:
            proc.kill()
