"""The HTTP side of `insightv serve` (stdlib `http.server`, one thread per
connection; the model work happens on the schedulers' threads).

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`
(JSON, or server-sent events with `stream: true`), and `GET /health` (load
figures, no key needed). Every error is OpenAI's JSON error object with a 4xx
or 5xx status, and the server goes on serving.

Guards, in the order a request meets them: the API key (when the environment
variable `INSIGHTV_API_KEY` is set, every route but /health wants `Authorization:
Bearer <key>`: 401), the body size (from Content-Length, before reading the
body: 413; none: 411), JSON and fields (400), the model name (400), then the
prompt, images and token limits (400) and the agent's queue (429).

Connections are HTTP/1.0, one request each: a finished reply closes its
connection, so a shutdown never waits on an idle keep-alive connection.
Shutdown (`begin_shutdown`, which SIGTERM and SIGINT call): stop accepting,
refuse what is queued (503), let the running requests finish, then return
from `serve_forever`.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from insightv_jax.serve.protocol import (
    ApiError,
    Limits,
    chunk_body,
    completion_body,
    new_id,
    parse_chat_request,
)

API_KEY_ENV = "INSIGHTV_API_KEY"


class _Gone(Exception):
    """The client closed the connection mid-stream."""


class Server:
    """`models` (name -> AgentModel / TwoAgentModel) on host:port."""

    def __init__(self, models: dict, schedulers: list, host: str = "127.0.0.1", port: int = 0,
                 limits: Limits | None = None, image_root: str | Path | None = None,
                 api_key: str | None = None, quiet: bool = False):  # fmt: skip
        self.models, self.schedulers, self.limits = models, schedulers, limits or Limits()
        self.image_root = Path(image_root) if image_root else None
        # None: the environment's key (if set); "": no key whatever the environment says
        self.api_key = (os.environ.get(API_KEY_ENV) or None) if api_key is None else api_key
        self.quiet = quiet
        self.stats = dict.fromkeys(("requests", "ok", "client_errors", "server_errors"), 0)
        self._stats_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = False  # server_close() waits for running requests
        self.httpd.app = self
        self._shutdown_started = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def begin_shutdown(self) -> None:
        """Stop accepting and refuse what waits; returns at once (callable from
        a signal handler: the accept loop is stopped from another thread)."""
        if self._shutdown_started.is_set():
            return
        self._shutdown_started.set()
        for s in self.schedulers:
            s.drain()
        threading.Thread(target=self.httpd.shutdown, name="serve-shutdown", daemon=True).start()

    def close(self) -> None:
        """After `serve_forever` returned: wait for the requests still running,
        close the socket, stop the schedulers."""
        self.httpd.server_close()  # joins the request threads
        for s in self.schedulers:
            s.close()

    def count(self, status: int) -> None:
        key = "ok" if status < 400 else "client_errors" if status < 500 else "server_errors"
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats[key] += 1


class _Handler(BaseHTTPRequestHandler):
    server_version = "insightv-serve"
    protocol_version = "HTTP/1.0"
    # seconds a socket read or write may block: a client that connects and goes
    # silent must not hold its thread (and a shutdown, which waits for threads)
    timeout = 60

    @property
    def app(self) -> Server:
        return self.server.app

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        if not self.app.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # ---------------------------------------------------------------- routes

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/health":
                return self._json(200, self._health())
            self._check_key()
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": [
                    m.describe() for m in self.app.models.values()]})  # fmt: skip
            if path.startswith("/v1/models/"):
                return self._json(200, self._model(path[len("/v1/models/") :]).describe())
            raise ApiError(404, f"no route GET {path}", "not_found")
        except ApiError as e:
            self._error(e)

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._check_key()
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no route POST {path}", "not_found")
            body = self._read_json()
            request = parse_chat_request(body, self.app.limits, self.app.image_root)
            model = self._model(request.model)
            if request.stream:
                return self._stream(model, request)
            choices, usage = model.complete(request)
            rid = new_id()
            self._json(200, completion_body(rid, request.model, [c.to_dict() for c in choices],
                                            usage))  # fmt: skip
        except ApiError as e:
            self._error(e)
        except Exception as e:  # noqa: BLE001 - a bug: answer 500, keep serving
            import traceback

            traceback.print_exc()
            self._error(ApiError(500, f"internal error ({type(e).__name__})", "server_error"))

    # ---------------------------------------------------------------- pieces

    def _health(self) -> dict:
        return {
            "status": "draining" if self.app._shutdown_started.is_set() else "ok",
            "models": sorted(self.app.models),
            "http": dict(self.app.stats),
            "agents": {s.name: s.snapshot() for s in self.app.schedulers},
        }

    def _model(self, name: str):
        model = self.app.models.get(name)
        if model is None:
            raise ApiError(400, f"model {name!r} is not served here (served: "
                           f"{', '.join(sorted(self.app.models))})", "model_not_found",
                           "model")  # fmt: skip
        return model

    def _check_key(self) -> None:
        key = self.app.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, f"missing or wrong API key (Authorization: Bearer <key>, the "
                           f"server's {API_KEY_ENV})", "invalid_api_key")  # fmt: skip

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "the request needs a Content-Length header", "length_required")
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", "invalid_request") from None
        if length > self.app.limits.max_body_bytes:
            self._discard(length)
            raise ApiError(413, f"the request body of {length} bytes is over the server's limit "
                           f"of {self.app.limits.max_body_bytes}", "body_too_large")  # fmt: skip
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") \
                from None  # fmt: skip

    def _discard(self, length: int) -> None:
        """Read and drop a refused body (up to 8x the limit), so that the client,
        which sends its whole body before reading the reply, gets the 413
        rather than a connection reset."""
        if length > 8 * self.app.limits.max_body_bytes:
            return
        while length > 0:
            got = self.rfile.read(min(length, 1 << 16))
            if not got:
                break
            length -= len(got)

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client is gone; nothing to tell it
        self.app.count(status)

    def _error(self, e: ApiError) -> None:
        self._json(e.status, e.body())

    def _stream(self, model, request) -> None:
        """Server-sent events: a role delta per choice, content (and, for the
        two-agent model, reasoning_content) deltas, a finish chunk per choice,
        a usage chunk if asked, then `data: [DONE]`. Errors before the first
        event are plain JSON errors; after it, an `error` event."""
        rid, name = new_id(), request.model
        started = False

        def send(obj) -> None:
            nonlocal started
            try:
                if not started:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()
                    started = True
                data = obj if isinstance(obj, str) else json.dumps(obj)
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, OSError):
                raise _Gone from None

        def emit(index: int, delta: dict) -> None:
            send(chunk_body(rid, name, [{"index": index, "delta": delta, "finish_reason": None,
                                         "logprobs": None}]))  # fmt: skip

        try:
            for i in range(request.n):
                emit(i, {"role": "assistant", "content": ""})
            choices, usage = model.complete(request, emit)
            for c in choices:
                send(chunk_body(rid, name, [{"index": c.index, "delta": {},
                                             "finish_reason": c.finish_reason,
                                             "logprobs": None}]))  # fmt: skip
            if request.include_usage:
                send(chunk_body(rid, name, [], usage))
            send("[DONE]")
            self.app.count(200)
        except _Gone:
            self.app.count(499)  # the client closed the connection (nginx's figure)
        except ApiError as e:
            if not started:
                return self._error(e)
            try:
                send(e.body())
            except _Gone:
                pass
            self.app.count(e.status)


def started_line(server: Server) -> str:
    """The line `insightv serve` prints once it listens (tests read the port)."""
    return f"listening on {server.url} ({time.strftime('%H:%M:%S')})"
