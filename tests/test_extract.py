"""Answer extraction (docs/method.md §4): letters, option text, numbers, yes/no, fallback."""

import random

import pytest

from insightv_jax.eval.extract import (
    extract_choice,
    extract_number,
    extract_yes_no,
    match,
    parse_options,
    strip_answer,
)

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


@pytest.mark.parametrize(
    "reply, letter",
    [("(B)", "B"), ("B.", "B"), ("B", "B"), ("B blue", "B"), ("b", "B"), ("B)", "B"),
     ("The answer is (C).", "C"), ("Answer: D", "D"), ("blue", "B"), ("It is green.", "C"),
     ("I cannot tell", None), ("", None)],
)  # fmt: skip
def test_extract_choice(reply, letter):
    assert extract_choice(reply, OPTIONS) == letter


def test_parse_options():
    q = "what colour?\nA. red\n(B) blue\nC) green\nD. yellow"
    assert parse_options(q) == OPTIONS
    assert parse_options("how many red shapes?") == {}


def test_numbers_and_yes_no():
    assert extract_number("2 + 1 = 3, so 3.") == 3.0
    assert extract_number("about 1,250.5 units") == 1250.5
    assert extract_number("-4 degrees") == -4.0 and extract_number("none") is None
    assert extract_yes_no("No, because yes is wrong") == "no"
    assert extract_yes_no("Not sure; nobody knows") is None
    assert strip_answer("<thoughts>x</thoughts><output>7</output>") == "7"
    assert strip_answer("so the answer is 12") == "12"


def test_match_by_type():
    assert match("The answer is 3.", "3").correct
    assert not match("4", "3").correct and match("4", "3").value == "4"
    assert match("3.1", "3", relaxed=True).correct and not match("3.2", "3", relaxed=True).correct
    assert match("Yes.", "yes").correct and not match("no", "yes").correct
    assert match("Blue!", "blue").correct and not match("dark blue", "blue").correct


def test_multiple_choice_fallback_is_seeded_and_counted():
    q = "which?\nA. 1\nB. 2\nC. 3\nD. 4"
    opts = parse_options(q)
    got = [match("hmm", "A", options=opts, rng=random.Random(7)) for _ in range(2)]
    assert got[0] == got[1] and got[0].fallback
    letters = {match("hmm", "A", options=opts, rng=random.Random(s)).value for s in range(40)}
    assert letters == set("ABCD")
    ok = match("(A)", "A", options=opts)
    assert ok.correct and not ok.fallback
    assert match("2", "B", options=opts).correct  # option text
