"""Decoding constrained to the Insight-V step schema.

A byte-level automaton accepts exactly

    {"title": "<text>", "content": "<text>", "next_action": "continue"|"final_answer"}

(the step object) or `{"title": "FINAL ANSWER", "content": "<text>"}` (the final
answer), where <text> is a JSON string body (escapes allowed, no raw control
characters). It is lifted to the tokenizer's vocabulary once: `next[state,
token]` runs the token's bytes through the automaton, and `dist[state]` is the
fewest tokens that finish the object from there. Inside the jitted decode loop
a token is allowed iff it keeps the automaton alive *and* the object can still
be finished within the remaining budget, so every output parses.

Works for any `transformers` tokenizer: byte-level BPE (GPT-2/Llama-3 style),
sentencepiece (▁ pieces, <0xNN> byte fallback) and plain vocabularies.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_STRING = object()  # marker in a schema: a JSON string body follows
_INF = 1 << 20


def step_schema() -> list:
    """The step object: title, content, next_action."""
    return [
        '{"title": "',
        _STRING,
        '", "content": "',
        _STRING,
        '", "next_action": "',
        ("continue", "final_answer"),
        '"}',
    ]


def final_schema() -> list:
    """The final-answer object."""
    return ['{"title": "FINAL ANSWER", "content": "', _STRING, '"}']


# The same two objects as JSON Schemas, for clients that ask a server for them
# (`response_format`): `insightv serve` constrains a request giving either to
# this automaton, and the data pipeline's `openai` generator sends them.
STEP_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "content": {"type": "string"},
        "next_action": {"type": "string", "enum": ["continue", "final_answer"]},
    },
    "required": ["title", "content", "next_action"],
    "additionalProperties": False,
}
FINAL_JSON_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "const": "FINAL ANSWER"},
                   "content": {"type": "string"}},
    "required": ["title", "content"],
    "additionalProperties": False,
}  # fmt: skip


class _Automaton:
    """A byte DFA built from a schema: literals, string bodies and enums.
    State 0 is the absorbing dead state; `table[state, byte]` is the next state."""

    def __init__(self, schemas: list[list]):
        self.rows: list[np.ndarray] = []
        self.dead = self._new()
        self.starts, self.accepts = [], []
        for schema in schemas:
            state = self._new()
            self.starts.append(state)
            for part in schema:
                if isinstance(part, str):
                    state = self._literal(part, state)
                elif isinstance(part, tuple):
                    state = self._enum(part, state)
                else:
                    state = self._string(state)
            self.accepts.append(state)
        self.table = np.stack(self.rows)

    def _new(self) -> int:
        self.rows.append(np.zeros(256, np.int32))
        return len(self.rows) - 1

    def _literal(self, text: str, state: int) -> int:
        for b in text.encode():
            nxt = self._new()
            self.rows[state][b] = nxt
            state = nxt
        return state

    def _enum(self, options: tuple[str, ...], state: int) -> int:
        """Options (none a prefix of another) share one end state."""
        end = self._new()
        for option in options:
            s, data = state, option.encode()
            for b in data[:-1]:
                if self.rows[s][b] == 0:
                    self.rows[s][b] = self._new()
                s = self.rows[s][b]
            self.rows[s][data[-1]] = end
        return end

    def _string(self, state: int) -> int:
        """A JSON string body of valid UTF-8 and its closing quote: no raw
        control characters, no bare '"' or backslash; a backslash starts a
        one-byte escape."""
        body, esc, closed = self._new(), self._new(), self._new()
        # Strict UTF-8 (no overlongs, no surrogates): decoders replace invalid
        # byte runs wholesale, which could swallow a closing quote.
        need1, need2, need3 = self._new(), self._new(), self._new()
        e0, ed, f0, f4 = self._new(), self._new(), self._new(), self._new()
        self.rows[need1][0x80:0xC0] = body
        self.rows[need2][0x80:0xC0] = need1
        self.rows[need3][0x80:0xC0] = need2
        self.rows[e0][0xA0:0xC0] = need1
        self.rows[ed][0x80:0xA0] = need1
        self.rows[f0][0x90:0xC0] = need2
        self.rows[f4][0x80:0x90] = need2
        for s in (state, body):
            row = self.rows[s]
            row[0x20:0x80] = body
            row[0xC2:0xE0] = need1
            row[0xE0], row[0xED], row[0xF0], row[0xF4] = e0, ed, f0, f4
            row[0xE1:0xED] = need2
            row[0xEE:0xF0] = need2
            row[0xF1:0xF4] = need3
            row[0x22] = closed
            row[0x5C] = esc
        for b in b'"\\/bfnrt':
            self.rows[esc][b] = body
        return closed


def _fix_quote_literals(schema: list) -> list:
    """A string consumes its own closing quote: strip it from the next literal."""
    out, prev_string = [], False
    for part in schema:
        if isinstance(part, str) and prev_string:
            assert part.startswith('"')
            part = part[1:]
        out.append(part)
        prev_string = part is _STRING
    return out


# ------------------------------------------------------------ vocabulary bytes


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode <-> byte table, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id contributes to decoded text (None = never allowed:
    special and added tokens)."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    pieces: list[str | None] = [None] * size
    for piece, idx in vocab.items():
        pieces[idx] = piece
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    byte_level = _is_byte_level(tokenizer, pieces)
    dec = _byte_decoder()
    out: list[bytes | None] = []
    for idx, piece in enumerate(pieces):
        if piece is None or idx in special or idx in added:
            out.append(None)
            continue
        if byte_level:
            try:
                out.append(bytes(dec[c] for c in piece))
            except KeyError:
                out.append(None)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def _is_byte_level(tokenizer, pieces) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.decoder is not None:
        return "ByteLevel" in type(backend.decoder).__name__ or "ByteLevel" in str(
            backend.decoder.__getstate__() if hasattr(backend.decoder, "__getstate__") else ""
        )
    return any(p is not None and "Ġ" in p for p in pieces[:5000])


# ------------------------------------------------------------- token automaton


class StepConstraint:
    """Token-level tables for the step and final-answer schemas and one
    tokenizer. Each decoded row starts in `start_step` or `start_final`."""

    def __init__(self, tokenizer):
        dfa = _Automaton([_fix_quote_literals(step_schema()), _fix_quote_literals(final_schema())])
        tb = token_bytes(tokenizer)
        V = len(tb)
        maxlen = max((len(b) for b in tb if b), default=1)
        arr = np.full((V, maxlen), -1, np.int32)
        usable = np.zeros(V, bool)
        for i, b in enumerate(tb):
            if b:  # empty or None tokens are never allowed
                arr[i, : len(b)] = np.frombuffer(b, np.uint8)
                usable[i] = True
        S = dfa.table.shape[0]
        nxt = np.zeros((S, V), np.int32)
        for s in range(S):
            cur = np.full(V, s, np.int32)
            for j in range(maxlen):
                col = arr[:, j]
                step = dfa.table[cur, np.maximum(col, 0)]
                cur = np.where(col < 0, cur, step)
            nxt[s] = np.where(usable & (s != dfa.dead), cur, dfa.dead)
        nxt[dfa.accepts] = dfa.dead  # nothing follows the closing brace
        dist = np.full(S, _INF, np.int64)
        dist[dfa.accepts] = 0
        for _ in range(S + 1):  # Bellman-Ford over token edges
            best = np.where(nxt == dfa.dead, _INF, dist[nxt]).min(axis=1) + 1
            new = np.minimum(dist, best)
            new[dfa.dead] = _INF
            if np.array_equal(new, dist):
                break
            dist = new
        self.start_step, self.start_final = dfa.starts
        self.next = nxt
        self.allowed = nxt != dfa.dead
        self.dist = np.minimum(dist, _INF).astype(np.int32)
        for name, start in (("step", self.start_step), ("final answer", self.start_final)):
            if self.dist[start] >= _INF:
                raise ValueError(f"the tokenizer cannot express the {name} schema")

    def min_tokens(self, final: bool = False) -> int:
        """Fewest tokens of any valid step (or final answer)."""
        return int(self.dist[self.start_final if final else self.start_step])

    def device_tables(self, vocab_size: int | None = None):
        """(next, finish, dist) as device arrays for the decode loop.

        `finish[state, token]` = 1 + dist[next[state, token]] for a live move
        (the tokens the object needs if `token` is emitted now), a huge value
        otherwise, so one (B, V) gather per step decides what is allowed.
        Token ids the tokenizer lacks (a model vocabulary padded past it) are
        never allowed. `finish` is int16 when the distances fit (they do for
        any real vocabulary), halving the bytes gathered per step.
        """
        V = vocab_size or self.next.shape[1]
        if V < self.next.shape[1]:
            raise ValueError(
                f"model vocabulary {V} is smaller than the tokenizer's {self.next.shape[1]}"
            )
        if getattr(self, "_device_vocab", None) != V:
            pad = V - self.next.shape[1]
            nxt = np.pad(self.next, ((0, 0), (0, pad)))  # 0 = the dead state
            longest = int(self.dist[self.dist < _INF].max(initial=0)) + 1
            dtype = np.int16 if longest < np.iinfo(np.int16).max else np.int32
            dead = np.iinfo(dtype).max  # the decode loop reads the dtype's max as "dead"
            live = (nxt != 0) & (self.dist[nxt] < _INF)
            finish = np.where(live, self.dist[nxt] + 1, dead).astype(dtype)
            self._device = (jnp.asarray(nxt), jnp.asarray(finish), jnp.asarray(self.dist))
            self._device_vocab = V
        return self._device
