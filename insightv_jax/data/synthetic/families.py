"""Question families: each samples a query for a scene, words it tersely, and
solves it through an `Observer` (so the same code yields the answer, the gold
claims, and — with a corrupting observer — a plausible wrong chain).

Perception families (one read) are the general QA data; reasoning families need
several steps. `mc_*` families are A–D versions of the numeric/colour ones.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from insightv_jax.data.synthetic.claims import DIRECTIONS, format_claim
from insightv_jax.data.synthetic.observer import Observer
from insightv_jax.data.synthetic.scenes import (
    BAR_LABELS,
    COLOURS,
    SHAPES,
    ChartScene,
    GridScene,
    Knobs,
)

LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    scene: str  # "grid" | "chart"
    kind: str  # "perception" | "reasoning"
    answer_type: str  # "number" | "yesno" | "colour" | "shape" | "list"
    sample: Callable  # (scene, rng, knobs) -> query dict | None
    question: Callable  # query -> str
    solve: Callable  # (query, Observer) -> answer value (int or str)


def noun(desc: list) -> str:
    """Plural text of a [colour|None, shape|None] descriptor ("red squares", "shapes")."""
    colour, shape = desc
    plural = f"{shape}s" if shape else "shapes"
    return f"{colour} {plural}" if colour else plural


_DESCRIPTOR_ODDS = {"colour": 2.0, "shape": 1.0, "both": 1.0}


def _desc(rng: random.Random, knobs: Knobs) -> list:
    if tuple(knobs.descriptors) == ("colour", "shape", "both"):  # the default draw, as it was
        u = rng.random()
        kind = "colour" if u < 0.5 else "shape" if u < 0.75 else "both"
    else:
        kinds = list(knobs.descriptors)
        kind = rng.choices(kinds, [_DESCRIPTOR_ODDS[k] for k in kinds])[0]
    if kind == "colour":
        return [rng.choice(knobs.colours), None]
    if kind == "shape":
        return [None, rng.choice(knobs.shapes)]
    return [rng.choice(knobs.colours), rng.choice(knobs.shapes)]


def _two_descs(rng: random.Random, knobs: Knobs) -> tuple[list, list]:
    a = _desc(rng, knobs)
    b = _desc(rng, knobs)
    while b == a:
        b = _desc(rng, knobs)
    return a, b


# ---------------------------------------------------------------- grid families


def _sample_count_colour(g, rng, knobs):
    return {"desc": [rng.choice(knobs.colours), None]}


def _sample_count_shape(g, rng, knobs):
    return {"desc": [None, rng.choice(knobs.shapes)]}


def _sample_count_object(g, rng, knobs):
    return {"desc": [rng.choice(knobs.colours), rng.choice(knobs.shapes)]}


def _solve_count(q, obs):
    return obs.count(*q["desc"])


def _sample_inventory(g, rng, knobs):
    # A fixed order lets a model count the i-th kind by its place in the list; a
    # per-image shuffled order was tried in the demo and learned worse in 2,500 steps
    # (48 % of its count claims true vs 100 % in order).
    return {"descs": [[c, s] for c in knobs.colours for s in knobs.shapes]}


def _solve_inventory(q, obs):
    """Every colour-shape count in a fixed order: "red squares: 2, red circles: 0, ..."."""
    return ", ".join(format_claim(("count", c, s, obs.count(c, s))) for c, s in q["descs"])


def _sample_cell(g: GridScene, rng, knobs):
    r, c = rng.choice(sorted(g.cells))
    return {"cell": [r, c]}


def _sample_pair(g, rng, knobs):
    a, b = _two_descs(rng, knobs)
    return {"a": a, "b": b}


def _sample_compare(g: GridScene, rng, knobs):
    a, b = _two_descs(rng, knobs)
    if g.count(*a) == g.count(*b) and rng.random() < 0.7:
        return None  # ties are rare in questions people ask; keep some
    if (g.count(*a) > g.count(*b)) != (rng.random() < 0.5):
        a, b = b, a  # balance yes/no
    return {"a": a, "b": b}


def _solve_compare(q, obs):
    x, y = obs.count(*q["a"]), obs.count(*q["b"])
    return "yes" if obs.compare(x, y) == ">" else "no"


def _solve_sum(q, obs):
    x, y = obs.count(*q["a"]), obs.count(*q["b"])
    return obs.add(x, y)


def _solve_diff(q, obs):
    x, y = obs.count(*q["a"]), obs.count(*q["b"])
    return obs.sub(max(x, y), min(x, y))


def _sample_hop(g: GridScene, rng, knobs):
    unique = [rc for rc, (col, sh) in g.cells.items() if g.count(col, sh) == 1]
    if not unique:
        return None
    r, c = rng.choice(sorted(unique))
    hops = rng.randint(1, knobs.max_hops)
    path, (pr, pc) = [], (r, c)
    for _ in range(hops):
        options = [d for d, (dr, dc) in DIRECTIONS.items() if g.inside(pr + dr, pc + dc)]
        d = rng.choice(sorted(options))
        path.append(d)
        pr, pc = pr + DIRECTIONS[d][0], pc + DIRECTIONS[d][1]
    if g.at(pr, pc) is None or (pr, pc) == (r, c):
        return None
    colour, shape = g.cells[(r, c)]
    return {"anchor": [colour, shape], "path": path, "ask": rng.choice(["colour", "shape"])}


def _hop_question(q):
    colour, shape = q["anchor"]
    return f"from the {colour} {shape} go {' then '.join(q['path'])}: {q['ask']}?"


def _solve_hop(q, obs):
    r, c = obs.find(*q["anchor"])
    for d in q["path"]:
        r, c = obs.hop(d, r, c)
    content = obs.cell(r, c)
    if content is None:
        return "empty"
    return content[0] if q["ask"] == "colour" else content[1]


# ---------------------------------------------------------------- chart families


def _sample_bar(ch: ChartScene, rng, knobs):
    return {"bar": rng.choice([lab for lab, _ in ch.bars])}


def _sample_bar_pair(ch: ChartScene, rng, knobs):
    a, b = rng.sample([lab for lab, _ in ch.bars], 2)
    return {"a": a, "b": b}


def _solve_chart_sum(q, obs):
    return obs.add(obs.bar(q["a"]), obs.bar(q["b"]))


def _solve_chart_compare(q, obs):
    return "yes" if obs.compare(obs.bar(q["a"]), obs.bar(q["b"])) == ">" else "no"


def _solve_chart_diff(q, obs):
    readings = {lab: obs.bar(lab) for lab in BAR_LABELS if obs.scene.value(lab) is not None}
    hi, lo = obs.extreme("tallest", readings), obs.extreme("shortest", readings)
    return obs.sub(readings[hi], readings[lo])


def _grid(name, kind, answer_type, sample, question, solve):
    return Family(name, "grid", kind, answer_type, sample, question, solve)


def _chart(name, kind, answer_type, sample, question, solve):
    return Family(name, "chart", kind, answer_type, sample, question, solve)


BASE_FAMILIES = [
    _grid(
        "count_colour",
        "perception",
        "number",
        _sample_count_colour,
        lambda q: f"how many {noun(q['desc'])}?",
        _solve_count,
    ),
    _grid(
        "count_shape",
        "perception",
        "number",
        _sample_count_shape,
        lambda q: f"how many {noun(q['desc'])}?",
        _solve_count,
    ),
    _grid(
        "count_object",
        "perception",
        "number",
        _sample_count_object,
        lambda q: f"how many {noun(q['desc'])}?",
        _solve_count,
    ),
    _grid(  # dense perception: one count per colour-shape kind (pretraining data for the base)
        "inventory",
        "perception",
        "list",
        _sample_inventory,
        lambda q: "list the shapes?",
        _solve_inventory,
    ),
    _grid(
        "cell_colour",
        "perception",
        "colour",
        _sample_cell,
        lambda q: "colour of cell {} {}?".format(*q["cell"]),
        lambda q, obs: (obs.cell(*q["cell"]) or ("empty",))[0],
    ),
    _grid(
        "cell_shape",
        "perception",
        "shape",
        _sample_cell,
        lambda q: "shape of cell {} {}?".format(*q["cell"]),
        lambda q, obs: (obs.cell(*q["cell"]) or ("", "empty"))[1],
    ),
    _grid(
        "compare",
        "reasoning",
        "yesno",
        _sample_compare,
        lambda q: f"more {noun(q['a'])} than {noun(q['b'])}?",
        _solve_compare,
    ),
    _grid(
        "sum",
        "reasoning",
        "number",
        _sample_pair,
        lambda q: f"how many {noun(q['a'])} plus {noun(q['b'])}?",
        _solve_sum,
    ),
    _grid(
        "diff",
        "reasoning",
        "number",
        _sample_pair,
        lambda q: f"difference between {noun(q['a'])} and {noun(q['b'])}?",
        _solve_diff,
    ),
    _grid("hop", "reasoning", "colour", _sample_hop, _hop_question, _solve_hop),
    _chart(
        "bar_value",
        "perception",
        "number",
        _sample_bar,
        lambda q: f"value of bar {q['bar']}?",
        lambda q, obs: obs.bar(q["bar"]),
    ),
    _chart(
        "chart_sum",
        "reasoning",
        "number",
        _sample_bar_pair,
        lambda q: f"bar {q['a']} plus bar {q['b']}?",
        _solve_chart_sum,
    ),
    _chart(
        "chart_compare",
        "reasoning",
        "yesno",
        _sample_bar_pair,
        lambda q: f"is bar {q['a']} taller than bar {q['b']}?",
        _solve_chart_compare,
    ),
    _chart(
        "chart_diff",
        "reasoning",
        "number",
        lambda ch, rng, knobs: {},
        lambda q: "tallest bar minus shortest bar?",
        _solve_chart_diff,
    ),
]


# ---------------------------------------------------------------- multiple choice


def _mc(base: Family) -> Family:
    """The A–D version of `base`: options hold the right value and three distractors."""

    def sample(scene, rng, knobs):
        q = base.sample(scene, rng, knobs)
        if q is None:
            return None
        truth = base.solve(q, Observer(scene))
        if base.answer_type == "number":
            pool = [v for v in range(max(0, truth - 3), truth + 4) if v != truth]
        else:
            pool = [x for x in (SHAPES if truth in SHAPES else COLOURS) if x != truth]
        options = [str(truth)] + [str(v) for v in rng.sample(pool, 3)]
        rng.shuffle(options)
        return {**q, "options": options}

    def question(q):
        lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(q["options"]))
        return f"{base.question(q)}\n{lines}"

    def solve(q, obs):
        value = str(base.solve(q, obs))
        if value in q["options"]:
            return LETTERS[q["options"].index(value)]
        if base.answer_type == "number":  # a wrong count: pick the nearest option
            near = min(q["options"], key=lambda o: (abs(int(o) - int(value)), o))
            return LETTERS[q["options"].index(near)]
        return LETTERS[obs.rng.randrange(len(q["options"]))]

    return Family(f"mc_{base.name}", base.scene, "reasoning", "letter", sample, question, solve)


FAMILIES: dict[str, Family] = {f.name: f for f in BASE_FAMILIES}
for _name in ("sum", "diff", "hop", "chart_diff", "chart_sum"):
    FAMILIES[f"mc_{_name}"] = _mc(FAMILIES[_name])

# Default mix: perception is the general QA share; counting/comparison dominate
# the reasoning share because that is what a CPU-scale model learns (docs/design.md).
DEFAULT_WEIGHTS = {
    "count_colour": 1.0, "count_shape": 1.0, "cell_colour": 0.5, "cell_shape": 0.5,
    "bar_value": 1.0, "compare": 2.0, "sum": 2.0, "diff": 1.0, "hop": 1.0,
    "chart_sum": 1.0, "chart_compare": 1.0, "chart_diff": 1.0,
    "mc_sum": 0.5, "mc_diff": 0.5, "mc_hop": 0.25, "mc_chart_diff": 0.5, "mc_chart_sum": 0.25,
}  # fmt: skip
