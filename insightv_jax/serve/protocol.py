"""The chat-completions wire format: request validation and reply bodies.

`parse_chat_request` turns a request body into a `ChatRequest` or raises an
`ApiError` whose message names the field and the reason (a client reads it in
the 4xx body). Messages become our prompt form: each message's content one
string in which `<image>` marks an image (text parts and image parts joined by
newlines, so `[image, text]` renders as our training prompts do:
"<image>\\n<question>"), and the images in order.

What we serve of OpenAI's fields: `messages` (system/developer, user,
assistant; text and `image_url` parts), `n`, `stream` (+ `stream_options.
include_usage`), `temperature`, `top_p`, `max_tokens` /
`max_completion_tokens`, `seed`, `stop`, `response_format` (`text`, or a
`json_schema` that is our reasoning step or final answer, constrained by
`sample.constrain`), and `repetition_penalty` (vLLM's extension, which our
data pipeline sends). Fields that would change the output and that we cannot
honour (tools, logprobs, logit_bias, frequency/presence penalties, general
JSON) are a 400 rather than silently ignored; other unknown fields are ignored.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

from insightv_jax.data.conversation import IMAGE_TOKEN
from insightv_jax.sample.constrain import FINAL_JSON_SCHEMA, STEP_JSON_SCHEMA  # noqa: F401
from insightv_jax.serve.images import ImageRejected, load_image_url

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error reply: HTTP status, one-line message, machine-readable code."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        """OpenAI's error object."""
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "code": self.code,
                "param": self.param,
            }
        }


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (each over-limit request is a 4xx)."""

    max_tokens: int = 512  # new tokens per sample
    max_n: int = 8  # samples per request (at most the decode slots)
    max_images: int = 4  # images per request
    max_image_bytes: int = 8 << 20  # per image, decoded
    max_body_bytes: int = 32 << 20  # a request body (base64 images included)
    max_queue: int = 64  # requests waiting for a decode slot, per agent (429 beyond)


@dataclasses.dataclass
class ChatRequest:
    """A validated chat-completions request."""

    model: str
    messages: list[dict]  # {"role", "content": str with one <image> per image}
    images: list  # PIL images, in the order of their <image> marks
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # None: as many as the limit and the context allow
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    schema: str | None = None  # "step" or "final": constrained to our JSON objects


# ------------------------------------------------------------------ schemas

# STEP_JSON_SCHEMA and FINAL_JSON_SCHEMA (imported above, so clients find them here
# too) are the schemas of our two objects; `schema_kind` also takes them as pydantic
# models write them.
# keywords that describe a schema without constraining it (pydantic writes "title")
_ANNOTATIONS = {"title", "description", "$comment", "examples"}


def _plain(prop) -> dict | None:
    """A property schema without its annotations (None: not an object)."""
    if not isinstance(prop, dict):
        return None
    return {k: v for k, v in prop.items() if k not in _ANNOTATIONS}


def _is_string(prop) -> bool:
    return _plain(prop) == {"type": "string"}


def _is_enum(prop, values: set[str]) -> bool:
    p = _plain(prop)
    if p is None or p.get("type", "string") != "string":
        return False
    p.pop("type", None)
    if set(p) == {"enum"}:
        return isinstance(p["enum"], list) and set(p["enum"]) == values
    if set(p) == {"const"} and len(values) == 1:
        return p["const"] in values
    return False


def schema_kind(schema) -> str:
    """The kind, "step" or "final", of a JSON schema that is our reasoning step or final
    answer (annotations and `required` / `additionalProperties` aside: every
    object we generate has all the properties, in our order, and no other);
    an ApiError naming what differs for any other schema."""
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be an object",
                       "invalid_schema", "response_format")  # fmt: skip
    props = schema.get("properties")
    extra = set(schema) - _ANNOTATIONS - {"type", "properties", "required",
                                          "additionalProperties", "strict"}  # fmt: skip
    if schema.get("type") == "object" and isinstance(props, dict) and not extra:
        if set(props) == {"title", "content", "next_action"} and _is_string(props["title"]) \
                and _is_string(props["content"]) \
                and _is_enum(props["next_action"], {"continue", "final_answer"}):  # fmt: skip
            return "step"
        if set(props) == {"title", "content"} and _is_enum(props["title"], {"FINAL ANSWER"}) \
                and _is_string(props["content"]):  # fmt: skip
            return "final"
    what = sorted(props) if isinstance(props, dict) else "none"
    raise ApiError(
        400,
        "response_format: only our reasoning-step schema (string title and content, "
        "next_action one of continue/final_answer) and final-answer schema (title const "
        "'FINAL ANSWER', string content) can be constrained; this schema "
        f"(properties: {what}{', keywords ' + str(sorted(extra)) if extra else ''}) cannot",
        "unsupported_schema",
        "response_format",
    )


def _response_format(rf) -> str | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ApiError(400, "response_format must be an object", "invalid_value",
                       "response_format")  # fmt: skip
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        raise ApiError(
            400,
            "response_format json_object: general JSON cannot be constrained by this server; "
            "give our reasoning-step schema as json_schema",
            "unsupported_schema",
            "response_format",
        )
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format.json_schema must be an object",
                           "invalid_schema", "response_format")  # fmt: skip
        return schema_kind(spec.get("schema"))
    raise ApiError(400, f"response_format type {kind!r} is not text, json_object or json_schema",
                   "invalid_value", "response_format")  # fmt: skip


# ------------------------------------------------------------------ fields


def _number(body: dict, key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:  # fmt: skip
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key} must be a number", "invalid_type", key)
    if not (low < value if low_open else low <= value) or value > high:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"{key} {value} is not in {bound}", "invalid_value", key)
    return float(value)


def _integer(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", "invalid_type", key)
    return value


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of them", "invalid_type",
                       "stop")  # fmt: skip
    if len(stops) > 4:
        raise ApiError(400, f"stop has {len(stops)} strings; at most 4", "invalid_value", "stop")
    return tuple(stops)


def _unsupported(body: dict) -> None:
    """Fields whose effect we cannot give: a 400, not a reply that ignores them."""
    for key in ("tools", "functions", "logit_bias"):
        if body.get(key):
            raise ApiError(400, f"{key} is not supported by this server", "unsupported_parameter",
                           key)  # fmt: skip
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported by this server", "unsupported_parameter",
                       "logprobs")  # fmt: skip
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"{key} is not supported; use repetition_penalty (a multiplicative "
                           "penalty, 1 = none)", "unsupported_parameter", key)  # fmt: skip


# ---------------------------------------------------------------- messages

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(raw, limits: Limits, image_root: Path | None) -> tuple[list[dict], list]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", "invalid_type", "messages")
    messages, images = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} is not an object", "invalid_type", "messages")
        role = ROLES.get(m.get("role"))
        if role is None:
            raise ApiError(400, f"{where}: role {m.get('role')!r} is not system, developer, user "
                           "or assistant", "invalid_value", "messages")  # fmt: skip
        content = m.get("content")
        if isinstance(content, str):
            pieces = [_text(content, where)]
        elif isinstance(content, list) and content:
            pieces = []
            for j, part in enumerate(content):
                pieces.append(_part(part, f"{where}.content[{j}]", role, images, limits,
                                    image_root))  # fmt: skip
        else:
            raise ApiError(400, f"{where}: content must be a string or a non-empty list of parts",
                           "invalid_type", "messages")  # fmt: skip
        messages.append({"role": role, "content": "\n".join(pieces)})
    # A last assistant message is a finished turn and the reply a new one: our data
    # pipeline's generator opens its dialogue with a pre-filled assistant reply.
    return messages, images


def _text(text: str, where: str) -> str:
    if IMAGE_TOKEN in text:
        raise ApiError(400, f"{where}: text may not contain {IMAGE_TOKEN}; send images as "
                       "image_url parts", "invalid_value", "messages")  # fmt: skip
    return text


def _part(part, where: str, role: str, images: list, limits: Limits, root: Path | None) -> str:
    if not isinstance(part, dict):
        raise ApiError(400, f"{where} is not an object", "invalid_type", "messages")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}: a text part needs a string 'text'", "invalid_type",
                           "messages")  # fmt: skip
        return _text(part["text"], where)
    if kind == "image_url":
        if role != "user":
            raise ApiError(400, f"{where}: images may only be in user messages",
                           "invalid_value", "messages")  # fmt: skip
        if len(images) >= limits.max_images:
            raise ApiError(400, f"{where}: more than {limits.max_images} images in one request",
                           "too_many_images", "messages")  # fmt: skip
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        try:
            images.append(load_image_url(url, limits.max_image_bytes, root, where))
        except ImageRejected as e:
            raise ApiError(400, str(e), e.code, "messages") from None
        return IMAGE_TOKEN
    raise ApiError(400, f"{where}: part type {kind!r} is not text or image_url",
                   "invalid_value", "messages")  # fmt: skip


# ----------------------------------------------------------------- request


def parse_chat_request(body, limits: Limits, image_root: Path | None = None) -> ChatRequest:
    """A validated request; ApiError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be a non-empty string", "invalid_type", "model")
    _unsupported(body)
    n = _integer(body, "n") or 1
    if not 1 <= n <= limits.max_n:
        raise ApiError(400, f"n {n} is not in [1, {limits.max_n}]", "invalid_value", "n")
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is not in [1, {limits.max_tokens}] (the "
                       "server's limit)", "max_tokens_exceeded", "max_tokens")  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "invalid_type", "stream")
    options = body.get("stream_options") or {}
    messages, images = _messages(body.get("messages"), limits, image_root)
    return ChatRequest(
        model=model,
        messages=messages,
        images=images,
        n=n,
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        max_tokens=max_tokens,
        seed=_integer(body, "seed"),
        stop=_stop(body.get("stop")),
        schema=_response_format(body.get("response_format")),
    )


# ------------------------------------------------------------------ replies


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(rid: str, model: str, choices: list[dict], usage: dict) -> dict:
    """A `chat.completion` object; `choices` as `models.Choice.to_dict` gives them."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chunk_body(rid: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """A `chat.completion.chunk` object (one server-sent event)."""
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
