"""The harness scores hand-made benchmarks in every layout through scripted
answer_fns (direct, CoT, two-agent), counts MC fallbacks, applies ChartQA relaxed
accuracy, and writes the JSON / table / PNG report."""

import json
import random

import pytest
from PIL import Image
from test_eval_readers import LAYOUTS, write_layout

from insightv_jax.config import RunConfig, from_dict
from insightv_jax.eval.harness import cot_answer, evaluate, run_cot, run_direct, run_two_agent
from insightv_jax.eval.readers import read_benchmark

# replies to ROWS of test_eval_readers: right, unparseable (fallback), right, wrong, right
REPLIES = {"1": "(B)", "2": "I cannot tell from the picture", "3": "Yes, there is one.",
           "4": "There are 13 shapes.", "5": "Circle."}  # fmt: skip


def scripted(replies, wrap=lambda s: s):
    calls = []

    def answer_fn(items):
        calls.append(len(items))
        return [wrap(replies[it.id]) for it in items]

    answer_fn.calls = calls
    return answer_fn


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_every_layout_with_fallback_counted(tmp_path, layout):
    items = read_benchmark(write_layout(tmp_path, layout), name="hand")
    fn = scripted(REPLIES)
    res = run_direct(items, fn, seed=0, batch_size=2)
    assert fn.calls == [2, 2, 1]
    assert [r.correct for r in res][2:] == [True, False, True] and res[0].correct
    assert [r.fallback for r in res] == [False, True, False, False, False]
    guess = res[1].value  # a seeded guess: same seed -> same letter, whatever the batching
    assert guess in "ABCD" and res[1].correct == (guess == "A")
    again = run_direct(items, scripted(REPLIES), seed=0, batch_size=5)
    assert again[1].value == guess
    guesses = {run_direct(items[1:2], scripted(REPLIES), seed=s)[0].value for s in range(30)}
    assert guesses == set("ABCD")
    assert [r.value for r in res] == ["B", guess, "yes", "13", "circle"]


def test_cot_and_two_agent_modes(tmp_path):
    items = read_benchmark(write_layout(tmp_path, "json"), name="hand")
    cot = run_cot(items, scripted(REPLIES, lambda s: f"<thoughts>I look. (A) no</thoughts>"
                                                     f"<output>{s}</output>"))  # fmt: skip
    assert [r.correct for r in cot][2:] == [True, False, True] and cot[0].correct
    assert cot[1].fallback and cot[0].raw.startswith("<thoughts>")  # raw keeps the whole reply
    assert cot_answer("<thoughts>a</thoughts> B") == "B" and cot_answer("<output>7") == "7"
    two = run_two_agent(items, scripted(REPLIES, lambda s: {"answer": s, "chain": "c" + s}))
    assert [r.correct for r in two] == [r.correct for r in cot] and two[0].chain == "c(B)"


def test_chartqa_relaxed_accuracy(tmp_path):
    recs = [
        ("a", "45", "46.5", True),
        ("b", "45", "48", False),
        ("c", "12%", "12.5%", True),
        ("d", "0.5", "0.52", True),
        ("e", "Apple", "apple", True),
        ("f", "80", "-", False),
    ]
    p = tmp_path / "chartqa.jsonl"
    p.write_text("\n".join(json.dumps({"id": i, "query": "q", "label": [gt]})
                           for i, gt, _, _ in recs))  # fmt: skip
    replies = {i: r for i, _, r, _ in recs}
    relaxed = run_direct(read_benchmark(p, kind="chartqa"), scripted(replies))
    assert [r.correct for r in relaxed] == [ok for *_, ok in recs]
    exact = run_direct(read_benchmark(p), scripted(replies))  # numeric kind: exact numbers
    assert [r.correct for r in exact][:4] == [False, False, False, False]


def test_evaluate_writes_report(tmp_path):
    bench = write_layout(tmp_path, "tsv_base64")
    right = dict(REPLIES, **{"2": "A", "4": "12"})
    cfg = from_dict(RunConfig, {"eval": {
        "benchmarks": [{"path": str(bench), "name": "hand"}],
        "systems": [{"name": "base", "mode": "direct", "model": "unused"},
                    {"name": "agents", "mode": "two_agent", "reason": "r", "summary": "s"}],
        "compare": [["agents", "base"]], "bootstrap": 500, "out": str(tmp_path / "out"),
    }})  # fmt: skip
    cfg.validate()
    fns = {"base": scripted(REPLIES), "agents": scripted(right, lambda s: {"answer": s})}
    report = evaluate(cfg, answer_fns=fns, quiet=True)
    out = tmp_path / "out"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    base, agents = (on_disk["systems"][n]["benchmarks"]["hand"] for n in ("base", "agents"))
    assert (agents["correct"], agents["fallbacks"], base["fallbacks"]) == (5, 0, 1)
    assert base["categories"]["count"]["n"] == 2 and on_disk["systems"]["base"]["mode"] == "direct"
    comp = on_disk["comparisons"][0]["benchmarks"]["hand"]
    assert comp["diff"] == pytest.approx((5 - base["correct"]) / 5)
    table = (out / "report.txt").read_text()
    assert "agents - base" in table and "100.0 [56.6,100.0]" in table and "count" in table
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 10 and preds[1]["fallback"] and preds[1]["system"] == "base"
    with Image.open(out / "report.png") as im:
        im.load()
        assert im.format == "PNG" and im.width >= 360 and im.height > 200
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 16)}
    assert (66, 133, 244) in colours and (219, 68, 55) in colours  # both systems' bars


def test_bad_config_is_one_line():
    from insightv_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mode two_agent needs reason"):
        load_config(None, ["eval.systems=[{name: x, mode: two_agent, summary: s}]"])
    with pytest.raises(ConfigError, match="'y' is not a system"):
        load_config(None, ["eval.systems=[{name: x, model: m}]", "eval.compare=[[x, y]]"])
    with pytest.raises(ConfigError, match="needs eval.benchmarks"):
        evaluate(RunConfig(), answer_fns={})


def test_oracle_answers_score_perfectly_on_the_synthetic_suite(tmp_path):
    from insightv_jax.data.synthetic.writer import write_llava

    write_llava(tmp_path, 40, 3)
    items = read_benchmark(tmp_path)
    res = run_direct(items, lambda its: [it.answer for it in its], seed=0, batch_size=16)
    assert all(r.correct for r in res) and not any(r.fallback for r in res)
    rng = random.Random(0)  # a wrong MC reply is never scored right, and is no fallback
    mc = [it for it in items if it.kind == "mc"]
    wrong = run_direct(mc, lambda its: [rng.choice([k for k in it.options if k != it.answer])
                                        for it in its])  # fmt: skip
    assert mc and not any(r.correct or r.fallback for r in wrong)
