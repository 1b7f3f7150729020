"""Benchmark evaluation: systems answer EvalItems, answers are scored (docs/method.md).

The scoring modes are pure functions of the items and an `answer_fn(items) ->
list[str | dict]` (a dict carries `answer` and, for two agents, `chain`), so
they run without models in tests. `checkpoint_answer_fn` (eval/answer_fns.py)
builds answer_fns from checkpoints with the sampler; `evaluate` runs a whole
`eval:` config.

Two-agent and given-chain answers also judge the chain itself (`judge_chain`),
for the summary agent's chain-vs-answer confusion (eval/diagnostics.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from insightv_jax.eval.answer_fns import AnswerFn, checkpoint_answer_fn
from insightv_jax.eval.extract import chain_final_claim, extract_number, match
from insightv_jax.eval.metrics import ItemResult
from insightv_jax.eval.readers import EvalItem, read_benchmark

MODES = ("direct", "cot", "two_agent", "given_chain")
CHAIN_MODES = ("two_agent", "given_chain")  # the modes whose answers come from a chain


def cot_answer(text: str) -> str:
    """The answer of a `<thoughts>…</thoughts><output>answer</output>` reply: the
    text in <output> (to the end if unclosed), else after </thoughts>, else all."""
    start = text.find("<output>")
    if start >= 0:
        body = text[start + len("<output>") :]
        end = body.find("</output>")
        return (body[:end] if end >= 0 else body).strip()
    end = text.find("</thoughts>")
    return text[end + len("</thoughts>") :].strip() if end >= 0 else text.strip()


def cot_chain(text: str) -> str:
    """The chain of a `<thoughts>…</thoughts><output>…</output>` reply: the text inside
    <thoughts> (up to <output> when the closing tag is missing)."""
    start = text.find("<thoughts>")
    body = text[start + len("<thoughts>") :] if start >= 0 else text
    for tag in ("</thoughts>", "<output>"):
        if tag in body:
            body = body[: body.find(tag)]
    return body.strip()


def _plain_number(text: str) -> str:
    num = extract_number(text)
    return text if num is None else format(num, "f").rstrip("0").rstrip(".")


def score(item: EvalItem, text: str, seed: int = 0) -> ItemResult:
    """Score one answer. The MC fallback guess is seeded per (seed, benchmark, id),
    so it does not depend on batch order."""
    rng = random.Random(f"{seed}:{item.benchmark}:{item.id}")
    gt = item.answer
    if item.kind == "chartqa":
        got = match(text, gt.rstrip("%").strip(), relaxed=True)
    elif item.kind == "numeric":
        got = match(text, _plain_number(gt))
    elif item.kind == "mc":
        got = match(text, gt, options=item.options, rng=rng)
    else:
        got = match(text, gt)
    return ItemResult(
        id=item.id, benchmark=item.benchmark, category=item.category, kind=item.kind,
        raw=text, value=got.value, answer=gt, correct=got.correct, fallback=got.fallback,
    )  # fmt: skip


def judge_chain(item: EvalItem, chain: str, chain_answer: str | None, seed: int = 0) -> bool | None:
    """Whether a chain's own answer is right: its final claim (`chain_final_claim`)
    or, when it states none, `chain_answer` (the summary agent's greedy answer from
    it), scored like an answer. None when neither exists. A claim that only a
    seeded MC guess could score counts as wrong: the guess is not what the chain says."""
    claim = chain_final_claim(chain)
    text = claim if claim is not None else chain_answer
    if text is None:
        return None
    judged = score(item, text, seed)
    return judged.correct and not judged.fallback


def run_mode(
    mode: str,
    items: Sequence[EvalItem],
    answer_fn: AnswerFn,
    seed: int = 0,
    batch_size: int = 8,
    progress=None,
) -> list[ItemResult]:
    """Answer `items` in batches with `answer_fn` and score them by `mode`:
    direct (the reply), cot (the text in <output>), two_agent or given_chain
    (the summary agent's reply). A dict reply may carry the `chain`; in the chain
    modes its `chain_answer` (the greedy answer from a chain without a claim) and
    `chain_kind` (a given chain's kind of error) go to `judge_chain` and the
    result's `chain_correct` / `chain_kind`."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    results: list[ItemResult] = []
    t0 = time.time()
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        replies = answer_fn(batch)
        if len(replies) != len(batch):
            raise ValueError(f"answer_fn returned {len(replies)} replies for {len(batch)} items")
        for item, reply in zip(batch, replies):
            chain = reply.get("chain") if isinstance(reply, dict) else None
            raw = reply["answer"] if isinstance(reply, dict) else reply
            text = cot_answer(raw) if mode == "cot" else raw
            result = score(item, text, seed)
            if mode == "cot" or chain is not None:
                result = dataclasses.replace(result, raw=raw, chain=chain)
            if mode in CHAIN_MODES and chain is not None:
                result = dataclasses.replace(
                    result,
                    chain_correct=judge_chain(item, chain, reply.get("chain_answer"), seed),
                    chain_kind=reply.get("chain_kind"),
                )
            elif mode == "cot":  # the CoT model's chain, judged like a reasoning agent's
                chain = cot_chain(raw)
                result = dataclasses.replace(
                    result, chain=chain, chain_correct=judge_chain(item, chain, text, seed)
                )
            results.append(result)
        done = start + len(batch)
        rate = done / max(time.time() - t0, 1e-9)
        _say(f"eval {mode}: {done}/{len(items)} ({rate:.2f}/s)", progress)
    return results


def _say(message: str, progress) -> None:
    if progress is not None:
        print(message, file=progress, flush=True)


def run_direct(items, answer_fn: AnswerFn, seed: int = 0, batch_size: int = 8):
    """One model answers each question directly."""
    return run_mode("direct", items, answer_fn, seed, batch_size)


def run_cot(items, answer_fn: AnswerFn, seed: int = 0, batch_size: int = 8):
    """One model writes <thoughts>…</thoughts><output>answer</output>."""
    return run_mode("cot", items, answer_fn, seed, batch_size)


def run_two_agent(items, answer_fn: AnswerFn, seed: int = 0, batch_size: int = 8):
    """Reasoning agent + summary agent (answer_fn returns the summary answers)."""
    return run_mode("two_agent", items, answer_fn, seed, batch_size)


# ------------------------------------------------------------------ a whole config


def load_benchmarks(cfg) -> dict[str, list[EvalItem]]:
    """The items of every benchmark of an `EvalConfig`, by benchmark name."""
    out: dict[str, list[EvalItem]] = {}
    for b in cfg.benchmarks:
        items = read_benchmark(
            b.path, b.layout, name=b.name, kind=b.kind, split=b.split,
            image_root=b.image_root, instruction=b.instruction, limit=cfg.limit,
        )  # fmt: skip
        name = items[0].benchmark
        if name in out:
            from insightv_jax.config import ConfigError

            raise ConfigError(f"eval.benchmarks: two benchmarks named {name!r}; set name")
        out[name] = items
    return out


def files_stamp(path: str | None) -> list:
    """(relative path, size, mtime) of every file under `path`: a checkpoint or
    chains file that is rewritten gets a new stamp."""
    if not path:
        return []
    root = Path(path)
    if root.is_file():
        st = root.stat()
        return [[root.name, st.st_size, st.st_mtime_ns]]
    out = []
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            out.append(
                [os.path.relpath(os.path.join(dirpath, f), root), st.st_size, st.st_mtime_ns]
            )
    return out


def system_fingerprint(system, cfg, prompts, benches: dict[str, list[EvalItem]]) -> str:
    """What a system's results depend on: its config and checkpoint files, the
    sampling settings, prompts, seed and batch size, and the questions asked."""
    parts = {
        "system": dataclasses.asdict(system),
        "files": {k: files_stamp(getattr(system, k)) for k in ("model", "reason", "summary", "chains")},
        "sampling": dataclasses.asdict(cfg.sampling),
        "prompts": prompts,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "questions": {name: [[it.id, it.prompt, it.answer, str(it.image)] for it in items] for name, items in benches.items()},
    }  # fmt: skip
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def load_system_results(path: Path, fingerprint: str) -> list[ItemResult] | None:
    """A system's saved results if they were made with `fingerprint`, else None."""
    try:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != fingerprint:
            return None
        return [ItemResult(**r) for r in saved["results"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing, torn or from another version: answer again


def save_system_results(path: Path, fingerprint: str, results: list[ItemResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rows = [dataclasses.asdict(r) for r in results]
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "results": rows}))
    os.replace(tmp, path)


def evaluate(run_cfg, answer_fns: dict[str, AnswerFn] | None = None, quiet: bool = False) -> dict:
    """Run every system of `run_cfg.eval` on every benchmark; write the report and
    print it (progress on stderr) unless `quiet`. `answer_fns` (system name ->
    answer_fn) replaces checkpoint loading. A checkpoint system's results are saved
    in `<out>/systems/<name>.json` and reused while its fingerprint (config,
    checkpoint files, sampling, prompts, questions) is unchanged, so an interrupted
    or extended evaluation only answers what is missing."""
    progress = None if quiet else sys.stderr
    from insightv_jax.config import ConfigError
    from insightv_jax.eval.report import build_report, write_report

    cfg = run_cfg.eval
    if not cfg.benchmarks or not cfg.systems:
        raise ConfigError("eval: the config needs eval.benchmarks and eval.systems")
    if cfg.decoding == "both":
        return _evaluate_each_decoding(run_cfg, answer_fns, quiet)
    # one decoding rule for every system (resolved here, so it is in the fingerprint)
    cfg = dataclasses.replace(cfg, sampling=cfg.sampling.resolved(cfg.decoding))
    benches = load_benchmarks(cfg)
    results: dict[str, list[ItemResult]] = {}
    modes: dict[str, str] = {}
    for system in cfg.systems:
        modes[system.name] = system.mode
        fn = (answer_fns or {}).get(system.name)
        saved = None
        if fn is None:  # checkpoint systems keep their results for reruns
            key = system_fingerprint(system, cfg, run_cfg.pipeline.prompts, benches)
            saved = Path(cfg.out) / "systems" / f"{system.name}.json"
            results[system.name] = load_system_results(saved, key)
            if results[system.name] is not None:
                _say(f"eval: {system.name}: results of an earlier run ({saved})", progress)
                continue
            _say(f"eval: loading {system.name} ({system.mode})", progress)
            fn = checkpoint_answer_fn(system, cfg.sampling, run_cfg.pipeline.prompts, cfg.seed)
        results[system.name] = []
        for name, items in benches.items():
            _say(f"eval: {system.name} on {name} ({len(items)} questions)", progress)
            results[system.name] += run_mode(
                system.mode, items, fn, cfg.seed, cfg.batch_size, progress
            )
        if saved is not None:
            save_system_results(saved, key, results[system.name])
    report = build_report(
        results, modes, cfg.compare, method=cfg.paired_method, n_boot=cfg.bootstrap,
        seed=cfg.seed,
        meta={"benchmarks": {k: len(v) for k, v in benches.items()}, "decoding": cfg.decoding,
              "sampling": dataclasses.asdict(cfg.sampling)},
    )  # fmt: skip
    table = write_report(report, results, Path(cfg.out))
    if not quiet:
        print(table)
    return report


def _evaluate_each_decoding(run_cfg, answer_fns, quiet: bool) -> dict:
    """`eval.decoding: both`: one evaluation per decoding rule, each in
    `<out>/<rule>/`, and `<out>/report.txt` with both tables."""
    from insightv_jax.config import DECODINGS

    cfg = run_cfg.eval
    reports, texts = {}, []
    for rule in DECODINGS:
        sub = dataclasses.replace(cfg, decoding=rule, out=str(Path(cfg.out) / rule))
        reports[rule] = evaluate(dataclasses.replace(run_cfg, eval=sub), answer_fns, quiet)
        texts.append(f"decoding: {rule}\n" + (Path(sub.out) / "report.txt").read_text().rstrip())
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "report.txt").write_text("\n\n".join(texts) + "\n")
    return {"decodings": reports}
