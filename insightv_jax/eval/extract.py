"""Answer extraction and normalisation (docs/method.md), in one place.

Multiple choice: the option letter ("(A)", "A.", "A ", "A)") or the option text;
unparseable -> a seeded random letter, flagged as a fallback so callers count it.
Numbers: the last number in the text, compared as numbers (exact, or relaxed
within 5% for ChartQA-style scoring). Yes/no: the first yes/no token. Anything
else: normalised text equality.
"""

from __future__ import annotations

import dataclasses
import random
import re

LETTERS = "ABCDEFGHIJ"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.)]\s+(.+?)\s*$", re.MULTILINE)
_ANSWER_TAG = re.compile(r"<output>(.*?)(?:</output>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Extracted:
    """An answer as extracted: its normal form, correctness and whether it was a guess."""

    value: str
    correct: bool
    fallback: bool = False


def normalize_text(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation and quotes."""
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .,:;!?\"'`()[]{}")


def strip_answer(text: str) -> str:
    """The answer part of a model reply: inside <output>…</output> when present,
    after an 'answer is/answer:' marker when present, else the whole text."""
    m = _ANSWER_TAG.search(text)
    if m:
        text = m.group(1)
    m = re.search(r"answer(?: is)?\s*[:\-]?\s*(.+)$", text, re.IGNORECASE | re.DOTALL)
    return m.group(1).strip() if m and m.group(1).strip() else text.strip()


def parse_options(question: str) -> dict[str, str]:
    """Options written one per line as "A. text" or "(A) text" in a question."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question)}


def extract_number(text: str) -> float | None:
    """The last number in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def extract_yes_no(text: str) -> str | None:
    """The first standalone yes/no in `text`, lower-cased, or None."""
    m = _YES_NO.search(text)
    return m.group(1).lower() if m else None


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a reply picks, or None when it cannot be told."""
    letters = "".join(options) or LETTERS[:4]
    t = text.strip()
    if len(t.strip(" .()")) == 1 and t.strip(" .()").upper() in letters:  # "b", "(c)"
        return t.strip(" .()").upper()
    for pattern in (
        rf"^\(?([{letters}])\)?(?:[.):,\s]|$)",  # "B", "(B)", "B.", "B)", "B "
        rf"\(([{letters}])\)",  # "... (B) ..."
        rf"\b(?i:answer|option)(?: is)?\s*:?\s*\(?([{letters}])\b",
    ):
        m = re.search(pattern, t)
        if m:
            return m.group(1)
    norm = normalize_text(t)
    hits = [k for k, v in options.items() if normalize_text(v) == norm]
    if not hits:  # option text inside a longer reply: longest option wins
        hits = sorted(
            (
                k
                for k, v in options.items()
                if re.search(rf"\b{re.escape(normalize_text(v))}\b", norm)
            ),
            key=lambda k: -len(options[k]),
        )
    return hits[0] if hits else None


def _numbers_equal(a: float, b: float, relaxed: bool) -> bool:
    if relaxed:
        return abs(a - b) <= 0.05 * abs(b) if b != 0 else a == 0
    return abs(a - b) < 1e-9


def match(
    answer: str,
    ground_truth: str,
    *,
    options: dict[str, str] | None = None,
    relaxed: bool = False,
    rng: random.Random | None = None,
) -> Extracted:
    """Compare a free-form `answer` with `ground_truth` by the answer's type.

    With `options` (multiple choice) the ground truth is a letter; an unparseable
    answer becomes a random letter from `rng` (seeded by the caller) with
    `fallback=True`.
    """
    gt = ground_truth.strip()
    text = strip_answer(answer)
    if options:
        letter = extract_choice(text, options) or extract_choice(answer, options)
        fallback = letter is None
        if fallback:
            letter = (rng or random.Random(0)).choice(sorted(options))
        want = gt.upper() if gt.upper() in options else extract_choice(gt, options)
        return Extracted(letter, letter == want, fallback)
    if normalize_text(gt) in ("yes", "no"):
        got = extract_yes_no(text) or extract_yes_no(answer) or ""
        return Extracted(got, got == normalize_text(gt))
    gt_num = extract_number(gt) if _NUMBER.fullmatch(gt.replace(" ", "")) else None
    if gt_num is not None:
        got = extract_number(text)
        if got is None:
            return Extracted("", False)
        return Extracted(f"{got:g}", _numbers_equal(got, gt_num, relaxed))
    got = normalize_text(text)
    return Extracted(got, got == normalize_text(gt))


_CLAIM = re.compile(
    r"^(?:[^:]*:\s*)?(?:so\s+)?(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:\-]?\s*(\S.*?)\s*\.?$",
    re.IGNORECASE,
)


def chain_final_claim(chain: str) -> str | None:
    """The answer a reasoning chain states itself, if its format has one: its last
    line reads "answer X", "Answer: X", "Final answer: X" or "So the answer is X"
    (after an optional step title; the synthetic chains end with `Answer: answer X`).
    None when the last line states no answer (a chain cut short, or a format without
    one) — then a caller judges the chain by the summary agent's answer from it."""
    lines = [ln.strip() for ln in chain.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    m = _CLAIM.match(lines[-1])
    if m is None or not any(ch.isalnum() for ch in m.group(1)):
        return None
    return m.group(1).strip()
