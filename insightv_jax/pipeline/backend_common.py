"""What every backend of the pipeline shares (oracle, openai, local): its errors,
its counters, per-job seeds, the text of a chain, and the parsing of model
replies. The roles' interface and the factories are in `pipeline.backends`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter

from insightv_jax.errors import InsightVError

NEXT_ACTIONS = ("continue", "final_answer")
VERDICT = re.compile(r"\[\s*[01]\s*\]")  # a parseable judge reply


class BackendError(InsightVError):
    """A backend cannot serve requests at all (bad endpoint, bad key, bad model)."""


class RetriesExhausted(Exception):
    """One request failed after all retries; the caller counts it and goes on."""


class Stats:
    """Thread-safe counters of retries, failures and parse fallbacks."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))


# ------------------------------------------------------------------ chains


def chain_steps_text(chain) -> str:
    """The `title: content` lines of a chain (steps, {"steps": ...} or <thoughts> text)."""
    if isinstance(chain, str):
        text = chain.strip()
        if text.startswith("<thoughts>"):
            text = text[len("<thoughts>") :]
        end = text.find("</thoughts>")
        return (text[:end] if end >= 0 else text).strip()
    if isinstance(chain, dict):
        chain = chain.get("steps", [])
    return "\n".join(f"{s.get('title', '')}: {s.get('content', '')}" for s in chain)


def thoughts(chain) -> str:
    """The reasoning agent's output for a chain: `<thoughts>\\n…\\n</thoughts>`."""
    return f"<thoughts>\n{chain_steps_text(chain)}\n</thoughts>"


def job_seed(seed: int, query_id: str, sample: int) -> int:
    """A stable 31-bit seed per (run seed, query, sample)."""
    digest = hashlib.sha256(f"{seed}/{query_id}/{sample}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# ----------------------------------------------------------------- parsing


def _json_object(text: str):
    text = text.strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            return None
    return None


def parse_step(text: str) -> dict | None:
    """A valid step {title, content, next_action} from a reply, or None."""
    obj = _json_object(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("title"), str):
        return None
    content, action = obj.get("content"), obj.get("next_action")
    if content is None or action not in NEXT_ACTIONS:
        return None
    content = content if isinstance(content, str) else json.dumps(content)
    return {"title": obj["title"], "content": content, "next_action": action}


def parse_final(text: str) -> str | None:
    """The final answer of a `{"title": "FINAL ANSWER", "content": ...}` reply, or None."""
    obj = _json_object(text)
    if not isinstance(obj, dict) or "content" not in obj:
        return None
    content = obj["content"]
    return content if isinstance(content, str) else json.dumps(content)


def parse_scores(text: str, n: int) -> list[float | None]:
    """`Path k: s` lines -> a score per path (clipped to 1–100; None where missing)."""
    out: list[float | None] = [None] * n
    for m in re.finditer(r"path\s*(\d+)\s*[:=\-]\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE):
        k = int(m.group(1)) - 1
        if 0 <= k < n and out[k] is None:
            out[k] = min(100.0, max(1.0, float(m.group(2))))
    return out
