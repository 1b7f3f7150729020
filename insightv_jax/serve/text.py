"""Generated tokens -> the text a client sees.

A reply is the decoded tokens without the end-of-turn token (as
`sample.reasoning.generate_encoded` gives it), cut before the first of the
request's stop strings (OpenAI's rule: the stop string is not returned), and
for the two-agent answer stripped of surrounding whitespace (as
`sample.reasoning.summary_answer`).

A stream sends that text in pieces as tokens arrive. A piece is only sent once
no later token can change it: text that ends in an incomplete UTF-8 sequence
(decoded as U+FFFD), that could be the start of a stop string, or (stripped
replies) trailing whitespace is held back. So the pieces joined equal the
non-streamed reply.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the first stop string starts in `text` (-1: none)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits, default=-1)


class ReplyText:
    """The reply of one generated row, whole or as stream pieces."""

    def __init__(self, tokenizer, ends: Sequence[int], stops: Sequence[str] = (), strip=False):
        self.tokenizer, self.ends, self.stops, self.strip = (
            tokenizer,
            set(ends),
            tuple(stops),
            strip,
        )
        self.sent = ""  # what the stream has sent so far

    def decoded(self, tokens: Sequence[int]) -> str:
        """The tokens' text, without an end-of-turn token at the end."""
        if tokens and tokens[-1] in self.ends:
            tokens = tokens[:-1]
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def stopped(self, tokens: Sequence[int]) -> bool:
        """Whether the text has reached one of the stop strings."""
        return bool(self.stops) and first_stop(self.decoded(tokens), self.stops) >= 0

    def final(self, tokens: Sequence[int]) -> str:
        """The reply of a finished row."""
        text = self.decoded(tokens)
        cut = first_stop(text, self.stops) if self.stops else -1
        if cut >= 0:
            text = text[:cut]
        return text.strip() if self.strip else text

    def piece(self, tokens: Sequence[int]) -> str:
        """The next stream piece after `tokens` (possibly ""), for a row still going."""
        text = self.decoded(tokens)
        cut = first_stop(text, self.stops) if self.stops else -1
        if cut >= 0:
            text = text[:cut]
        else:  # hold back a tail that may grow into a stop string
            text = text[: len(text) - _stop_prefix(text, self.stops)]
        text = text.rstrip(REPLACEMENT)  # an incomplete UTF-8 sequence so far
        if self.strip:
            text = text.strip()
        return self._advance(text)

    def last_piece(self, tokens: Sequence[int]) -> str:
        """What is left to send once the row is finished."""
        return self._advance(self.final(tokens))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            # Nothing new, or a decoder that rewrote earlier text: what was sent
            # stays sent (the client cannot take it back).
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
