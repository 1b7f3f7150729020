"""The claim grammar: small canonical phrases every teacher wording contains, so
the oracle scorer can grade ANY chain (the teacher's or a trained model's).

    red squares: 2          count (colour and/or shape; `shapes: 5` = all)
    cell 2 3: blue circle   content of a cell (`cell 2 3: empty`)
    right of cell 2 3 is cell 2 4     a spatial hop (left/right/above/below)
    bar B: 7                value of a bar
    tallest bar: B          (also `shortest bar: A`)
    2 + 1 = 3               arithmetic (+ and -)
    3 > 1                   comparison (>, <, =)

A claim is a tuple whose first item names its kind. `parse_claims` finds every
claim in free text; `check_claim` says whether a claim is true of a scene.
"""

from __future__ import annotations

import re

from insightv_jax.data.synthetic.scenes import COLOURS, SHAPES, ChartScene, GridScene, Scene

Claim = tuple

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
_COL = "|".join(COLOURS)
_SH = "|".join(SHAPES)
_PL = "|".join(s + "s" for s in SHAPES)
_I = re.IGNORECASE

_PATTERNS = [
    ("hop", re.compile(r"\b(left|right|above|below) of cell (\d+) (\d+) is cell (\d+) (\d+)", _I)),
    ("cell", re.compile(rf"\bcell (\d+) (\d+): (?:(empty)|({_COL}) ({_SH}))\b", _I)),
    ("count", re.compile(rf"\b(?:({_COL}) )?({_PL}|shapes): (\d+)", _I)),
    ("bar", re.compile(r"\bbar ([A-E]): (\d+)", _I)),
    ("extreme", re.compile(r"\b(tallest|shortest) bar: ([A-E])\b", _I)),
    ("arith", re.compile(r"(?<!\d)(?<!\d\.)(\d+) ([+-]) (\d+) = (\d+)(?!\d|\.\d)")),
    ("cmp", re.compile(r"(?<!\d)(?<!\d\.)(\d+) ([<>=]) (\d+)(?!\d|\.\d)")),
]


def format_claim(claim: Claim) -> str:
    """The canonical text of a claim."""
    kind = claim[0]
    if kind == "count":
        _, colour, shape, n = claim
        noun = f"{shape}s" if shape else "shapes"
        return f"{colour} {noun}: {n}" if colour else f"{noun}: {n}"
    if kind == "cell":
        _, r, c, colour, shape = claim
        return f"cell {r} {c}: {colour} {shape}" if colour else f"cell {r} {c}: empty"
    if kind == "hop":
        _, d, r, c, r2, c2 = claim
        return f"{d} of cell {r} {c} is cell {r2} {c2}"
    if kind == "bar":
        return f"bar {claim[1]}: {claim[2]}"
    if kind == "extreme":
        return f"{claim[1]} bar: {claim[2]}"
    if kind == "arith":
        _, a, op, b, res = claim
        return f"{a} {op} {b} = {res}"
    if kind == "cmp":
        _, a, op, b = claim
        return f"{a} {op} {b}"
    raise ValueError(f"unknown claim kind {kind!r}")


def _to_claim(kind: str, m: re.Match) -> Claim:
    g = [x.lower() if x and x.isalpha() and len(x) > 1 else x for x in m.groups()]
    g = [x.upper() if x and x.isalpha() and len(x) == 1 else x for x in g]
    if kind == "hop":
        return ("hop", g[0], int(g[1]), int(g[2]), int(g[3]), int(g[4]))
    if kind == "cell":
        return ("cell", int(g[0]), int(g[1]), g[3], g[4])
    if kind == "count":
        shape = None if g[1] == "shapes" else g[1][:-1]
        return ("count", g[0], shape, int(g[2]))
    if kind == "bar":
        return ("bar", g[0], int(g[1]))
    if kind == "extreme":
        return ("extreme", g[0], g[1])
    if kind == "arith":
        return ("arith", int(g[0]), g[1], int(g[2]), int(g[3]))
    return ("cmp", int(g[0]), g[1], int(g[2]))


def parse_claims(text: str) -> list[Claim]:
    """All claims in `text`, in order of appearance (spans never overlap)."""
    found: list[tuple[int, Claim]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(text):
            if any(m.start() < e and s < m.end() for s, e in taken):
                continue
            taken.append(m.span())
            found.append((m.start(), _to_claim(kind, m)))
    return [c for _, c in sorted(found, key=lambda x: x[0])]


def check_claim(claim: Claim, scene: Scene) -> bool:
    """Whether `claim` is true (scene claims against the scene, others by arithmetic)."""
    kind = claim[0]
    if kind == "arith":
        _, a, op, b, res = claim
        return res == (a + b if op == "+" else a - b)
    if kind == "cmp":
        _, a, op, b = claim
        return {"<": a < b, ">": a > b, "=": a == b}[op]
    if isinstance(scene, GridScene):
        if kind == "count":
            return scene.count(claim[1], claim[2]) == claim[3]
        if kind == "cell":
            _, r, c, colour, shape = claim
            want = (colour, shape) if colour else None
            return scene.inside(r, c) and scene.at(r, c) == want
        if kind == "hop":
            _, d, r, c, r2, c2 = claim
            dr, dc = DIRECTIONS[d]
            return scene.inside(r, c) and (r + dr, c + dc) == (r2, c2) and scene.inside(r2, c2)
        return False
    if isinstance(scene, ChartScene):
        if kind == "bar":
            return scene.value(claim[1]) == claim[2]
        if kind == "extreme":
            pick = max if claim[1] == "tallest" else min
            return pick(scene.bars, key=lambda b: b[1])[0] == claim[2]
    return False


def chain_text(chain) -> str:
    """Text of a chain given as a string, a list of steps, or {"steps": [...]}."""
    if isinstance(chain, str):
        return chain
    if isinstance(chain, dict):
        chain = chain.get("steps", [])
    lines = []
    for step in chain:
        if isinstance(step, dict):
            lines.append(f"{step.get('title', '')}: {step.get('content', '')}")
        else:
            lines.append(str(step))
    return "\n".join(lines)
