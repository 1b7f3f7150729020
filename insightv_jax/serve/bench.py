"""`insightv bench serve`: what continuous batching buys a server.

The same greedy requests are sent to a running `insightv serve` (in this
process, over HTTP on 127.0.0.1) once one at a time and once from
`concurrency` clients at a time; the figure is the ratio of their generated
tokens per second (target >= 4x at concurrency 8 with 8 decode slots). The
answers of the two runs must be the same (each request decodes as it would
alone, whatever shares its batch).

Model: bench-20m's decoder (configs/bench-20m.yaml; vocabulary cut to the
tokenizer's 512) behind a small CLIP tower, random weights, with a
synthetic-suite tokenizer (`sample.benchmark._bench_vlm`): weights of this
size make a decode step cost about the same for 1 row as for 8 on a CPU, which
is what batching turns into throughput. Random weights rarely emit the end of
turn, so most replies run to max_tokens; the report gives the actual lengths.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _ask(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def _run(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    if concurrency == 1:
        replies = [_ask(url, b) for b in bodies]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            replies = list(pool.map(lambda b: _ask(url, b), bodies))
    return time.perf_counter() - t0, replies


def bench_serve(requests: int = 24, concurrency: int = 8, slots: int = 8, max_tokens: int = 64,
                chunk: int = 16) -> dict:  # fmt: skip
    from insightv_jax.sample.benchmark import _bench_decoder, _bench_vlm
    from insightv_jax.serve.launch import ServeSettings, build_server
    from insightv_jax.serve.protocol import Limits

    with tempfile.TemporaryDirectory() as tmp:
        sampler, _ = _bench_vlm(_bench_decoder(), Path(tmp))
        records = json.loads((Path(tmp) / "suite" / "train.json").read_text())
    questions = [r["question"] for r in records]
    settings = ServeSettings(slots=slots, context=512, chunk=chunk,
                             limits=Limits(max_tokens=max_tokens, max_queue=requests))  # fmt: skip
    server = build_server("bench-20m-vlm", settings=settings, quiet=True, api_key="",
                          samplers={"bench-20m-vlm": sampler})  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        bodies = [
            {"model": "bench-20m-vlm", "temperature": 0, "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": f"{questions[i % len(questions)]} ({i})"}]}
            for i in range(requests)
        ]  # fmt: skip
        _run(server.url, bodies[:concurrency], concurrency)  # compile: prefill buckets, decode
        _run(server.url, bodies[:1], 1)
        t_seq, seq = _run(server.url, bodies, 1)
        t_con, con = _run(server.url, bodies, concurrency)
    finally:
        server.begin_shutdown()
        thread.join(60)
        server.close()
    text = lambda replies: [r["choices"][0]["message"]["content"] for r in replies]  # noqa: E731
    tokens = sum(r["usage"]["completion_tokens"] for r in seq)
    prompt = [r["usage"]["prompt_tokens"] for r in seq]
    d = sampler.cfg
    return {
        "model": f"bench-20m decoder (hidden {d.hidden_size}, {d.num_layers} layers, vocab "
        f"{d.vocab_size}) + small CLIP tower, random weights, fp32",
        "machine": f"CPU, {os.cpu_count()} cores",
        "slots": slots,
        "chunk": chunk,
        "requests": requests,
        "prompt_tokens": f"{min(prompt)}-{max(prompt)} (mean {sum(prompt) / len(prompt):.0f})",
        "max_tokens": max_tokens,
        "generated_tokens_mean": round(tokens / requests, 1),
        "sequential": {"seconds": round(t_seq, 2), "tokens_per_s": round(tokens / t_seq, 1)},
        f"concurrency_{concurrency}": {
            "seconds": round(t_con, 2),
            "tokens_per_s": round(tokens / t_con, 1),
        },  # fmt: skip
        "speedup": round(t_seq / t_con, 2),
        "target_speedup": 4.0,
        "same_answers": text(seq) == text(con),
    }
