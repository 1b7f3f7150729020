"""The demo's evaluation: the eval config (systems, comparisons), the corrupted
chains of the robustness check, stages 9-10 (eval, export) and the headline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from insightv_jax.config import RunConfig, from_dict
from insightv_jax.demo.jobs import redirect
from insightv_jax.demo.preset import REPO, one_thread_env
from insightv_jax.jsonl import read_jsonl


class EvalStages:
    """`Demo`'s evaluation stages (a mixin: it uses the demo's `spec`, `ws`, `runs`,
    `data`, `out` and `say`)."""

    def _eval_beside_dpo(self) -> subprocess.Popen | None:
        """An `insightv eval` subprocess for the systems that do not depend on DPO,
        run while DPO trains (it leaves cores idle); the eval stage reuses their saved
        results (eval/systems/). Same environment, so the same programs run."""
        if int(self.spec.get("parallel", 1)) < 2:
            return None
        self.corrupted_chains(self.spec["eval"].get("split", "test"))
        path = self.ws / "configs" / "eval_before_dpo.yaml"
        path.write_text(yaml.safe_dump(self.eval_config(with_dpo=False), sort_keys=False))
        log = self.ws / "logs" / "eval_before_dpo.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "insightv_jax.cli", "eval", "--config", str(path)]
        self.say(f"  eval | systems before DPO: started beside it, log {log}")
        env = one_thread_env(dict(os.environ))
        with open(log, "w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))

    def round_policies(self, kind: str = "dpo") -> list[str]:
        """The reasoning agent after each finished DPO (or RL: `kind="rl"`) round."""
        return [reason for reason, _ in self.round_agents(kind)]

    def round_agents(self, kind: str = "dpo") -> list[tuple[str, str]]:
        """(reasoning agent, summary agent) after each finished round: RL of the
        summary agent (J-GRPO) changes the second, DPO never does."""
        out = []
        for t in range(1, 100):
            done = self.runs / kind / f"round_{t}" / "summary.json"
            if not done.exists():
                break
            row = json.loads(done.read_text())
            out.append((row["policy_out"], row.get("summary_out") or str(self.runs / "summary")))
        return out

    def eval_config(self, with_dpo: bool = True) -> dict:
        e = dict(self.spec["eval"])
        systems = [
            {"name": "base", "mode": "direct", "model": str(self.runs / "base")},
            {"name": "cot", "mode": "cot", "model": str(self.runs / "cot")},
            {"name": "two_agent", "mode": "two_agent", "reason": str(self.runs / "reason"),
             "summary": str(self.runs / "summary")},
        ]  # fmt: skip
        chains = self.ws / "eval" / "corrupted_chains.jsonl"
        systems.append({"name": "summary_corrupted", "mode": "given_chain",
                        "summary": str(self.runs / "summary"), "chains": str(chains)})  # fmt: skip
        compare = [["cot", "base"], ["two_agent", "cot"], ["two_agent", "base"],
                   ["summary_corrupted", "base"]]  # fmt: skip
        rounds = self.round_policies() if with_dpo else []
        for t, policy in enumerate(rounds, 1):
            systems.append({"name": f"two_agent_dpo{t}", "mode": "two_agent", "reason": policy,
                            "summary": str(self.runs / "summary")})  # fmt: skip
        if rounds:  # the last DPO round against the agents before DPO
            compare.append([systems[-1]["name"], "two_agent"])
        rl_rounds = self.round_agents("rl") if with_dpo else []
        for t, (policy, summary) in enumerate(rl_rounds, 1):
            systems.append({"name": f"two_agent_rl{t}", "mode": "two_agent", "reason": policy,
                            "summary": summary})  # fmt: skip
        if rl_rounds:  # the last RL round against the agents before it
            compare.append([systems[-1]["name"], "two_agent"])
            summary = rl_rounds[-1][1]
            if summary != str(self.runs / "summary"):  # J-GRPO trained it: the robustness row
                systems.append({"name": "summary_corrupted_rl", "mode": "given_chain",
                                "summary": summary, "chains": str(chains)})  # fmt: skip
                compare.append(["summary_corrupted_rl", "summary_corrupted"])
        split = e.pop("split", "test")
        e.update(
            benchmarks=[{"path": str(self.data), "name": "synthetic", "split": split}],
            systems=systems, compare=compare, out=str(self.ws / "eval"),
        )  # fmt: skip
        return {"seed": self.spec.get("seed", 0), "eval": e,
                "pipeline": {"prompts": self.spec["pipeline"].get("prompts", {})}}  # fmt: skip

    def corrupted_chains(self, split: str, path: Path | None = None) -> Path:
        """Robustness check input: for each question of `split`, an oracle chain with
        one deliberate error (a miscount, wrong cell, misread bar or slip); written to
        `path` (default eval/corrupted_chains.jsonl)."""
        from insightv_jax.data.synthetic.teacher import ERROR_VISIBLE_IN, OracleTeacher
        from insightv_jax.pipeline.backend_common import chain_steps_text

        p = self.spec["pipeline"]
        teacher = OracleTeacher(1.0, p.get("oracle_style", "terse"), self.spec.get("seed", 0))
        records = json.loads((self.data / f"{split}.json").read_text())
        path = path or self.ws / "eval" / "corrupted_chains.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for r in records:
            chain = teacher.chain(r, 0)
            kind = ERROR_VISIBLE_IN.get(chain["corrupted_kind"]) if chain["corrupted"] else None
            rows.append({"id": r["id"], "chain": chain_steps_text(chain), "kind": kind})
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not path.is_file() or path.read_text() != text:  # unchanged: saved results stay valid
            path.write_text(text)
        return path

    def stage_eval(self) -> dict:
        from insightv_jax.eval.harness import evaluate

        self.corrupted_chains(self.spec["eval"].get("split", "test"))
        cfg = from_dict(RunConfig, self.eval_config())
        cfg.validate()
        with redirect(self.out):
            report = evaluate(cfg, quiet=True)
        reports = report.get("decodings") or {cfg.eval.decoding: report}
        return {rule: {n: round(s["benchmarks"]["synthetic"]["accuracy"], 4)
                       for n, s in rep["systems"].items()}
                for rule, rep in reports.items()}  # fmt: skip

    def stage_export(self) -> dict:
        from insightv_jax.checkpoint import atomic_dir, load_model
        from insightv_jax.data.prompts import read_prompts
        from insightv_jax.hf.convert import export_hf

        policies = self.round_policies()
        final = {"reason": policies[-1] if policies else str(self.runs / "reason"),
                 "summary": str(self.runs / "summary"), "cot": str(self.runs / "cot")}  # fmt: skip
        for name, src in final.items():
            model, cfg, tok_dir, proc_dir = load_model(src)
            with atomic_dir(self.ws / "hf" / name, overwrite=True) as tmp:
                export_hf(model, cfg, tmp, tok_dir, proc_dir, prompts=read_prompts(src))
        return {name: str(self.ws / "hf" / name) for name in final}


# ------------------------------------------------------------------ headline


def headline(eval_dir: Path, families: list[str], a: str = "cot", b: str = "base") -> dict:
    """acc(a) - acc(b) pooled over `families`, with its paired 95% CI."""
    from insightv_jax.eval.metrics import paired_ci

    got: dict[str, dict[str, bool]] = {a: {}, b: {}}
    for row in read_jsonl(eval_dir / "predictions.jsonl"):
        if row["system"] in got and row["category"] in families:
            got[row["system"]][row["id"]] = bool(row["correct"])
    ids = sorted(set(got[a]) & set(got[b]))
    if not ids:
        return {"n": 0}
    xa, xb = [got[a][i] for i in ids], [got[b][i] for i in ids]
    diff, lo, hi = paired_ci(xa, xb)
    return {"n": len(ids), "a": sum(xa) / len(ids), "b": sum(xb) / len(ids),
            "diff": diff, "ci95": [lo, hi]}  # fmt: skip


def headline_text(eval_dir: Path, spec: dict) -> str:
    fams = list(spec.get("headline_families", ["compare", "sum", "diff"]))
    h = headline(eval_dir, fams)
    (eval_dir / "headline.json").write_text(json.dumps({"families": fams, **h}, indent=1) + "\n")
    if not h["n"]:
        return f"headline: no test questions of families {fams}"
    return (
        f"\nheadline ({', '.join(fams)}; n={h['n']}): single-model CoT {100 * h['a']:.1f}% vs "
        f"direct {100 * h['b']:.1f}% -> {100 * h['diff']:+.1f} points "
        f"(paired 95% CI {100 * h['ci95'][0]:+.1f} .. {100 * h['ci95'][1]:+.1f})"
    )
