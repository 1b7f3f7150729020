"""Chain diagnostics: each two-agent / given-chain answer also judges its chain (its
own final claim, else the summary agent's greedy answer from it), and the report
gives the summary agent's confusion against the chain (kept / broke right, fixed /
kept wrong, overturn and fix rates) overall, per category and per kind of error."""

import dataclasses
import json

import pytest
from PIL import Image
from test_eval_readers import write_layout

from insightv_jax.config import EvalSampling, RunConfig, SystemConfig, from_dict
from insightv_jax.errors import DataError
from insightv_jax.eval.diagnostics import diagnostics, diagnostics_by_benchmark
from insightv_jax.eval.harness import (
    checkpoint_answer_fn,
    evaluate,
    judge_chain,
    load_system_results,
    run_mode,
    save_system_results,
)
from insightv_jax.eval.metrics import ItemResult
from insightv_jax.eval.readers import read_benchmark
from insightv_jax.eval.report import build_report, draw_chart, format_table, write_report

# (id, category, chain kind, chain right, answer right) -> the confusion cell
HAND = [
    ("1", "count", "text", True, True),  # kept right
    ("2", "count", "text", False, True),  # fixed wrong
    ("3", "count", "image", False, False),  # kept wrong
    ("4", "count", None, True, False),  # broke right
    ("5", "chart", "image", False, True),  # fixed wrong
    ("6", "chart", "image", False, False),  # kept wrong
    ("7", "chart", "text", False, False),  # kept wrong
    ("8", "chart", None, True, True),  # kept right
]


def hand_results(with_unjudged=True) -> list[ItemResult]:
    rs = [
        ItemResult(id=i, benchmark="syn", category=cat, kind="numeric", raw="", value="",
                   answer="", correct=ok, chain="c", chain_correct=chain_ok, chain_kind=kind)
        for i, cat, kind, chain_ok, ok in HAND
    ]  # fmt: skip
    if with_unjudged:  # a result whose chain was never judged (an old saved one) is left out
        rs.append(dataclasses.replace(rs[0], id="9", correct=False, chain_correct=None))
    return rs


def cells(d: dict) -> tuple:
    return (d["n"], d["kept_right"], d["broke_right"], d["fixed_wrong"], d["kept_wrong"])


def test_confusion_counts_and_rates_overall_per_category_and_kind():
    d = diagnostics(hand_results())
    assert cells(d) == (8, 2, 1, 2, 3) and d["chain_correct"] == 3
    assert d["chain_accuracy"] == pytest.approx(3 / 8)
    assert d["overturn_rate"] == pytest.approx(1 / 3) and d["fix_rate"] == pytest.approx(2 / 5)
    count, chart = d["categories"]["count"], d["categories"]["chart"]
    assert cells(count) == (4, 1, 1, 1, 1) and cells(chart) == (4, 1, 0, 1, 2)
    assert (count["chain_accuracy"], count["overturn_rate"], count["fix_rate"]) == (0.5, 0.5, 0.5)
    assert (chart["chain_accuracy"], chart["overturn_rate"]) == (0.25, 0.0)
    assert chart["fix_rate"] == pytest.approx(1 / 3)
    kinds = d["chain_kinds"]
    assert list(kinds) == ["clean", "image", "text"]
    assert cells(kinds["text"]) == (3, 1, 0, 1, 1) and kinds["text"]["fix_rate"] == 0.5
    assert cells(kinds["image"]) == (3, 0, 0, 1, 2) and kinds["image"]["overturn_rate"] is None
    assert kinds["image"]["fix_rate"] == pytest.approx(1 / 3)
    assert cells(kinds["clean"]) == (2, 1, 1, 0, 0) and kinds["clean"]["fix_rate"] is None
    # two-agent chains record no kind: no kind split; no judged chain: no diagnostics
    plain = [dataclasses.replace(r, chain_kind=None) for r in hand_results()]
    assert "chain_kinds" not in diagnostics(plain) and cells(diagnostics(plain)) == cells(d)
    unjudged = [dataclasses.replace(r, chain_correct=None) for r in hand_results()]
    assert diagnostics_by_benchmark(unjudged) == {}


def test_predictions_file_round_trip_and_old_saved_results(tmp_path):
    """A predictions file's rows load back into the same diagnostics; results saved
    before chains were judged (no chain_correct / chain_kind) still load, with None."""
    results = {"corrupt": hand_results()}
    report = build_report(results, {"corrupt": "given_chain"}, n_boot=100)
    write_report(report, results, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    loaded = [ItemResult(**{k: v for k, v in r.items() if k != "system"}) for r in rows]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["systems"]["corrupt"]["benchmarks"]["syn"]["diagnostics"] == diagnostics(loaded)
    old = [{k: v for k, v in dataclasses.asdict(r).items() if not k.startswith("chain_")}
           for r in hand_results()]  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps({"fingerprint": "f", "results": old}))
    again = load_system_results(tmp_path / "old.json", "f")
    assert again and all(r.chain_correct is None and r.chain_kind is None for r in again)
    save_system_results(tmp_path / "new.json", "g", hand_results())
    assert load_system_results(tmp_path / "new.json", "g") == hand_results()


# the hand benchmark of test_eval_readers: 1 mc B, 2 mc A, 3 yes, 4 numeric 12, 5 circle
CHAINS = {
    "1": "Step: the big square looks blue.\nAnswer: answer B",  # right chain, answer wrong
    "2": "Count: three circles.\nAnswer: answer C",  # wrong chain, answer right
    "3": "Step: a triangle is at the bottom.\nSo the answer is yes.",  # both right
    "4": "Total: 13 shapes.\nAnswer: answer 13",  # both wrong (chain_answer ignored: a claim)
    "5": "Step: the top-left shape is round.",  # no claim: judged by chain_answer
}
ANSWERS = {"1": "(A)", "2": "A", "3": "Yes", "4": "13", "5": "square"}
CHAIN_ANSWERS = {"4": "12", "5": "circle"}


def chain_replies(items):
    return [
        {"answer": ANSWERS[it.id], "chain": CHAINS[it.id], "chain_answer": CHAIN_ANSWERS.get(it.id)}
        for it in items
    ]


def test_run_mode_judges_the_chains_claims(tmp_path):
    items = read_benchmark(write_layout(tmp_path, "json"), name="hand")
    res = run_mode("two_agent", items, chain_replies, batch_size=2)
    assert [r.correct for r in res] == [False, True, True, False, False]
    assert [r.chain_correct for r in res] == [True, False, True, False, True]
    assert all(r.chain_kind is None for r in res) and res[0].chain == CHAINS["1"]
    d = diagnostics(res)
    assert cells(d) == (5, 1, 2, 1, 1) and d["overturn_rate"] == pytest.approx(2 / 3)
    # direct answers have no chain to judge, whatever the reply carries
    assert all(r.chain_correct is None for r in run_mode("direct", items, chain_replies))
    # a CoT reply's chain is the text inside <thoughts>, judged by its own claim
    cot = run_mode("cot", items, lambda its: [
        f"<thoughts>\n{CHAINS[it.id]}\n</thoughts>\n<output>{ANSWERS[it.id]}</output>"
        for it in its])  # fmt: skip
    assert [r.chain for r in cot] == [CHAINS[it.id].strip() for it in items]
    # (item 5's chain states no answer: judged by the CoT model's own <output>, "square")
    assert [r.chain_correct for r in cot] == [True, False, True, False, False]
    # a reply without a chain (a scripted answer) leaves the chain unjudged
    bare = run_mode("two_agent", items, lambda its: [{"answer": ANSWERS[it.id]} for it in its])
    assert all(r.chain_correct is None for r in bare)


def test_chain_without_claim_is_judged_by_chain_answer(tmp_path):
    items = {it.id: it for it in read_benchmark(write_layout(tmp_path, "json"), name="hand")}
    chain = CHAINS["5"]
    assert judge_chain(items["5"], chain, "circle") is True
    assert judge_chain(items["5"], chain, "A square.") is False
    assert judge_chain(items["5"], chain, None) is None  # nothing to judge it by
    assert judge_chain(items["4"], CHAINS["4"], "12") is False  # the chain's own claim wins
    # an unparseable MC claim would be a seeded guess: never a right chain, whatever the seed
    vague = "Step: hard to tell.\nAnswer: answer unclear"
    assert not any(judge_chain(items["1"], vague, None, seed=s) for s in range(12))


def test_answer_fns_pass_kinds_and_rerun_greedy_only_for_chains_without_claims(
    tmp_path, monkeypatch
):
    """given_chain reads each chain's kind; both chain systems ask the summary agent
    once more, greedily, for the chains that state no answer (no models: the
    sampler functions are replaced by scripted ones)."""
    import insightv_jax.sample.infer as infer
    import insightv_jax.sample.reasoning as reasoning

    items = read_benchmark(write_layout(tmp_path, "json"), name="hand")
    calls = []

    def fake_summary(summarizer, questions, chains, params, prompts, images=None):
        calls.append((len(questions), params.temperature, params.top_p, params.max_new_tokens))
        greedy = params.temperature == 0
        return [{"answer": "circle" if greedy else "square", "chain": c} for c in chains]

    def fake_two_agent(reasoner, summarizer, questions, rp, sp, prompts, images=None):
        return [{"chain": CHAINS[it.id], "answer": ANSWERS[it.id]} for it in items]

    monkeypatch.setattr(infer, "load_agent", lambda path: path)
    monkeypatch.setattr(reasoning, "summary_answer", fake_summary)
    monkeypatch.setattr(reasoning, "two_agent_answer", fake_two_agent)
    path = tmp_path / "chains.jsonl"
    kinds = {"1": "text", "2": "image", "3": None, "4": "text"}
    rows = [{"id": i, "chain": CHAINS[i], **({"kind": kinds[i]} if i in kinds else {})}
            for i in CHAINS]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sampling = EvalSampling(summary_temperature=0.7, summary_max_tokens=40)
    given = SystemConfig(name="g", mode="given_chain", summary="s", chains=str(path))
    res = run_mode("given_chain", items, checkpoint_answer_fn(given, sampling), batch_size=8)
    assert [r.chain_kind for r in res] == ["text", "image", None, "text", None]
    assert calls == [(5, 0.7, 0.95, 40), (1, 0.0, 1.0, 40)]  # the rerun: item 5 only, greedy
    assert res[4].chain_correct is True and res[4].raw == "square" and not res[4].correct
    assert [r.chain_correct for r in res[:4]] == [True, False, True, False]

    calls.clear()
    two = SystemConfig(name="t", mode="two_agent", reason="r", summary="s")
    res = run_mode("two_agent", items, checkpoint_answer_fn(two, sampling), batch_size=8)
    assert calls == [(1, 0.0, 1.0, 40)] and res[4].chain_correct is True
    calls.clear()  # a greedy summary agent already gave the greedy answer: no rerun
    greedy = dataclasses.replace(sampling, summary_temperature=0.0)
    res = run_mode("two_agent", items, checkpoint_answer_fn(two, greedy), batch_size=8)
    assert calls == [] and res[4].chain_correct is False  # "square", its own answer

    path.write_text(json.dumps({"id": "1", "chain": "c", "kind": 3}) + "\n")
    with pytest.raises(DataError, match="kind 3 is not a string"):
        checkpoint_answer_fn(given, sampling)


def test_report_has_diagnostics_section_json_and_png(tmp_path):
    bench = write_layout(tmp_path, "json")
    kinds = {"1": "text", "2": "image", "4": "text"}
    cfg = from_dict(RunConfig, {"eval": {
        "benchmarks": [{"path": str(bench), "name": "hand"}],
        "systems": [{"name": "base", "mode": "direct", "model": "unused"},
                    {"name": "agents", "mode": "two_agent", "reason": "r", "summary": "s"},
                    {"name": "corrupt", "mode": "given_chain", "summary": "s", "chains": "c"}],
        "bootstrap": 100, "out": str(tmp_path / "out"),
    }})  # fmt: skip
    cfg.validate()

    def corrupt(items):
        return [dict(r, chain_kind=kinds.get(it.id)) for it, r in zip(items, chain_replies(items))]

    fns = {"base": lambda its: [ANSWERS[it.id] for it in its], "agents": chain_replies,
           "corrupt": corrupt}  # fmt: skip
    report = evaluate(cfg, answer_fns=fns, quiet=True)
    systems = report["systems"]
    assert "diagnostics" not in systems["base"]["benchmarks"]["hand"]
    agents = systems["agents"]["benchmarks"]["hand"]["diagnostics"]
    assert cells(agents) == (5, 1, 2, 1, 1) and "chain_kinds" not in agents
    assert set(agents["categories"]) == {"colour", "count", "exist", "shape"}
    by_kind = systems["corrupt"]["benchmarks"]["hand"]["diagnostics"]["chain_kinds"]
    assert {k: cells(v) for k, v in by_kind.items()} == {
        "clean": (2, 1, 1, 0, 0), "image": (1, 0, 0, 1, 0), "text": (2, 0, 1, 0, 1)
    }  # fmt: skip
    text = (tmp_path / "out" / "report.txt").read_text()
    line = ("agents on hand: chain 60.0% (n=5); kept right 1, broke right 2, fixed wrong 1, "
            "kept wrong 1; overturn 66.7%, fix 50.0%")  # fmt: skip
    assert line + "\n" in text and text.index("chain diagnostics") > text.index("accuracy %")
    assert "corrupt on hand: chain 60.0% (n=5)" in text
    assert "overturn 66.7%, fix 50.0% (image 100.0%, text 0.0%)" in text
    assert "base on" not in text and text == format_table(report) + "\n"
    with Image.open(tmp_path / "out" / "report.png") as im:
        with_notes = im.height
    results = {"base": run_mode("direct", read_benchmark(bench, name="hand"), fns["base"])}
    draw_chart(build_report(results, {"base": "direct"}, n_boot=100), tmp_path / "plain.png")
    with Image.open(tmp_path / "plain.png") as im:
        assert with_notes >= im.height + 14 * 5  # title + two lines per chain system
