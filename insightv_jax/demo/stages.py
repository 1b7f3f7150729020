"""`Demo`: one demo run in a workdir, stage by stage (stages 1-8; 9-10 in evaluation.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml

from insightv_jax.config import ConfigError, RunConfig, deep_merge, from_dict, read_with_includes
from insightv_jax.demo.evaluation import EvalStages, headline_text
from insightv_jax.demo.jobs import SFTJobs, check_finished, compile_cache, redirect
from insightv_jax.demo.preset import AGENTS, STAGES
from insightv_jax.errors import InsightVError


class Demo(SFTJobs, EvalStages):
    """One demo run in `workdir` from a preset dict (see `load_preset`)."""

    def __init__(self, spec: dict, workdir: str | Path, out=sys.stdout):
        self.spec, self.ws, self.out = spec, Path(workdir).resolve(), out
        self.data = self.ws / "data"
        self.runs = self.ws / "runs"
        self.times: dict[str, float] = {}

    # ------------------------------------------------------------ plumbing

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    def run(self) -> dict:
        """All stages in order (finished ones skipped); returns the eval report."""
        self.ws.mkdir(parents=True, exist_ok=True)
        with compile_cache(self.ws / "jax_cache"):
            return self._run_stages()

    def _run_stages(self) -> dict:
        (self.ws / "preset.yaml").write_text(yaml.safe_dump(self.spec, sort_keys=False))
        t0 = time.time()
        for i, name in enumerate(STAGES, 1):
            self._stage(i, name, getattr(self, f"stage_{name}"))
        main = self.main_eval_dir()
        report = json.loads((main / "report.json").read_text())
        self.say("\n" + (self.ws / "eval" / "report.txt").read_text().rstrip())
        self.say(headline_text(main, self.spec))
        rows = "  ".join(f"{k} {v:.0f}s" for k, v in self.times.items())
        self.say(f"\nstage wall times: {rows}\ndemo total {time.time() - t0:.0f}s; "
                 f"workdir {self.ws}")  # fmt: skip
        return report

    def main_eval_dir(self) -> Path:
        """Where the headline's report is: `eval/reference/` when the preset evaluates
        under both decodings, else `eval/`."""
        both = self.spec["eval"].get("decoding") == "both"
        return self.ws / "eval" / "reference" if both else self.ws / "eval"

    def _marker(self, name: str) -> Path:
        return self.ws / "stages" / f"{name}.done"

    def _stage(self, i: int, name: str, fn) -> None:
        marker = self._marker(name)
        tag = f"[{i}/{len(STAGES)}] {name}"
        if marker.exists():
            when = "alongside an earlier stage" if name in self.times else "earlier"
            self.times[name] = json.loads(marker.read_text()).get("seconds", 0.0)
            self.say(f"{tag}: done {when} ({self.times[name]:.0f}s), skipped")
            return
        self.say(f"{tag}: running")
        t0 = time.time()
        info = fn() or {}
        dt = time.time() - t0
        self.times[name] = dt
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"seconds": dt, **info}, indent=1) + "\n")
        self.say(f"{tag}: finished in {dt:.0f}s {json.dumps(info) if info else ''}".rstrip())

    def _config(self, section: str, extra: dict) -> dict:
        """The SFT config merged with the preset's `section` and `extra` (a dict)."""
        base = read_with_includes(self.spec["sft_config"])
        merged = deep_merge(deep_merge(base, self.spec.get(section) or {}), extra)
        merged["seed"] = self.spec.get("seed", 0)
        merged.setdefault("pipeline", {})["prompts"] = self.spec["pipeline"].get("prompts", {})
        return merged

    # ------------------------------------------------------------ 1-2

    def stage_synth(self) -> dict:
        from insightv_jax.data.synthetic.families import FAMILIES
        from insightv_jax.data.synthetic.scenes import Knobs
        from insightv_jax.data.synthetic.writer import perception_records, write_llava

        s = self.spec["suite"]
        family = s.get("perception")
        if family and family not in FAMILIES:
            raise ConfigError(f"suite.perception: unknown synthetic family {family!r}")
        knobs = from_dict(Knobs, s.get("knobs") or {})
        n_eval = s.get("n_eval")
        counts = write_llava(
            self.data, int(s["n"]), int(s.get("seed", 0)), knobs, weights=s.get("weights"),
            n_eval=None if n_eval is None else int(n_eval),
        )  # fmt: skip
        if family:  # dense perception questions on the training images, for the base
            train = json.loads((self.data / "train.json").read_text())
            extra = perception_records(train, knobs, family)
            (self.data / "perception.json").write_text(json.dumps(extra, indent=1) + "\n")
            counts["perception"] = len(extra)
        return counts

    def stage_tokenizer(self) -> dict:
        """Train the BPE on questions, answers, terse teacher chains and the prompts."""
        from insightv_jax.config.model import QWEN_VL_KINDS
        from insightv_jax.data.conversation import LLAVA_IMAGE, QWEN_VL_IMAGE, build_tokenizer
        from insightv_jax.data.prompts import reasoning_question, summary_question
        from insightv_jax.data.synthetic.teacher import OracleTeacher
        from insightv_jax.pipeline.backend_common import thoughts

        prompts = self._prompts()
        p = self.spec["pipeline"]
        teacher = OracleTeacher(p.get("error_rate", 0.3), "terse", self.spec.get("seed", 0))
        lines, budget = [], int(self.spec["tokenizer"]["chains"])
        for rec in self._perception():
            lines += [rec["question"], rec["answer"]]
        for split in ("train", "val", "test"):
            for i, rec in enumerate(json.loads((self.data / f"{split}.json").read_text())):
                lines += [rec["question"], rec["answer"]]
                if split == "train" and i < budget:
                    chain = thoughts(teacher.chain(rec, 0))
                    lines.append(reasoning_question(rec["question"], prompts))
                    lines.append(reasoning_question(rec["question"]))  # DPO pairs' wording
                    lines.append(f"{chain}\n<output>{rec['answer']}</output>")
                    lines.append(summary_question(rec["question"], chain, prompts))
        kind = (read_with_includes(self.spec["sft_config"]).get("model") or {}).get("kind")
        tok = build_tokenizer(
            lines, self.ws / "tokenizer", template="minimal",
            vocab_size=int(self.spec["tokenizer"]["vocab_size"]),
            image_span=QWEN_VL_IMAGE if kind in QWEN_VL_KINDS else LLAVA_IMAGE,
        )  # fmt: skip
        return {"vocab": len(tok), "lines": len(lines)}

    def _prompts(self):
        from insightv_jax.data.prompts import Prompts

        return from_dict(Prompts, self.spec["pipeline"].get("prompts") or {})

    # ------------------------------------------------------------ 3-5

    def _perception(self) -> list[dict]:
        path = self.data / "perception.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def stage_base(self) -> dict:
        """Direct question -> answer data plus the perception questions (if any)."""
        data = self.data / "train.json"
        perception = self._perception()
        if perception:
            data = self.data / "base.json"
            train = json.loads((self.data / "train.json").read_text())
            data.write_text(json.dumps(train + perception) + "\n")  # the loader shuffles
        cfg = self._config("base", {
            "train": {"data": str(data), "tokenizer": str(self.ws / "tokenizer"),
                      "workdir": str(self.runs / "base"), "trainable": ["vision", "projector", "llm"]},
            "data": {"image_root": str(self.data)},
        })  # fmt: skip
        if int(self.spec.get("parallel", 1)) >= 2 and not self._marker("data").exists():
            self._base_alongside_data(cfg)
        else:
            self._sft_jobs({"base": cfg})
        return {"steps": cfg["train"].get("steps"), "perception": len(perception)}

    def _base_alongside_data(self, cfg: dict) -> None:
        """The data engine (oracle generator, judge, scorer: Python on one core)
        does not need the base model, so it runs here while the base trains in a
        subprocess on all cores."""
        path = self.ws / "configs" / "base.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc, pump = self._spawn("base", path, core=None)
        try:
            self._stage(STAGES.index("data") + 1, "data", self.stage_data)
        except BaseException:
            proc.terminate()
            raise
        finally:
            proc.wait()
            pump.join()
        if proc.returncode:
            raise InsightVError(f"demo SFT base failed (exit {proc.returncode}); "
                                f"see {self.ws}/logs/base.log")  # fmt: skip
        check_finished("base", cfg)

    def stage_data(self) -> dict:
        from insightv_jax.pipeline.assess import run_assess
        from insightv_jax.pipeline.build import run_build
        from insightv_jax.pipeline.generate import run_generate

        section = dict(self.spec["pipeline"])
        questions = self.data / "train.json"
        limit = int(section.pop("questions", 0) or 0)
        if limit:  # the data engine runs on the first `questions` training questions
            subset = self.ws / "pipeline" / "questions.json"
            subset.parent.mkdir(parents=True, exist_ok=True)
            subset.write_text(json.dumps(json.loads(questions.read_text())[:limit]) + "\n")
            questions = subset
        section.update(data=str(questions), out=str(self.ws / "pipeline"))
        cfg = from_dict(RunConfig, {"seed": self.spec.get("seed", 0), "pipeline": section})
        cfg.validate()
        quiet = open(os.devnull, "w")
        run_generate(cfg, progress_file=quiet)
        run_assess(cfg, progress_file=quiet)
        counts = run_build(cfg)
        return {k: counts[k] for k in ("questions", "reasoning", "cot")} | {
            "summary": sum(counts["summary"].values()),
            "pairs": counts["pairs"].get("pairs", 0),
        }

    def _agent_config(self, name: str) -> dict:
        sets = {"reason": "reasoning", "summary": "summary", "cot": "cot"}
        build = self.ws / "pipeline" / "build"
        return self._config(name, {
            "train": {"data": str(build / f"{sets[name]}.json"), "tokenizer": None,
                      "init": str(self.runs / "base"), "workdir": str(self.runs / name)},
            "data": {"image_root": str(self.data)},
        })  # fmt: skip

    def stage_agents(self) -> dict:
        """The reasoning agent and the CoT baseline: same base, same schedule (the
        preset's `reason` section; `cot` may only change the data buckets)."""
        jobs = {name: self._agent_config(name) for name in AGENTS}
        if jobs["cot"]["train"] != {**jobs["reason"]["train"], **{
            k: jobs["cot"]["train"][k] for k in ("data", "workdir")
        }}:  # fmt: skip
            raise ConfigError("demo preset: the reason and cot sections must train with the "
                              "same schedule (equal budgets)")  # fmt: skip
        self._sft_jobs(jobs)
        return {name: jobs[name]["train"].get("steps") for name in AGENTS}

    def stage_chains(self) -> dict:
        """The reasoning agent's own chains on training questions, judged by the chain's
        own final claim (oracle judge), then the summary set rebuilt with them."""
        from insightv_jax.pipeline.agent_chains import run_agent_chains
        from insightv_jax.pipeline.build import run_build

        # the training questions from the suite's own file (its images resolve beside it);
        # the first `agent_questions` of them are among the data engine's questions
        section = {k: v for k, v in self.spec["pipeline"].items() if k != "questions"}
        section.update(data=str(self.data / "train.json"), out=str(self.ws / "pipeline"),
                       agent_reasoner=str(self.runs / "reason"))  # fmt: skip
        spec = {"seed": self.spec.get("seed", 0), "pipeline": section}
        cfg = from_dict(RunConfig, spec)
        cfg.validate()
        # for reruns by hand: `insightv agent-chains|build --config D/configs/pipeline.yaml`
        (self.ws / "configs").mkdir(parents=True, exist_ok=True)
        (self.ws / "configs" / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        with redirect(self.out):
            stats = run_agent_chains(cfg, progress_file=open(os.devnull, "w"))
        counts = run_build(cfg)
        return {"chains": stats["chains_written"] + stats["chains_resumed"],
                "right": counts["agent_chains"]["right"],
                "summary": counts["summary"]}  # fmt: skip

    def stage_summary(self) -> dict:
        cfg = self._agent_config("summary")
        self._sft_jobs({"summary": cfg})
        return {"summary": cfg["train"].get("steps") or f"{cfg['train'].get('epochs')} epochs"}

    # ------------------------------------------------------------ 6-8

    def _rounds_config(self, section: str, extra: dict | None = None) -> RunConfig:
        """The run config of the DPO or RL rounds (`section`), from the reasoning agent
        with the summary agent, the training questions and the held-out val slice (and
        the `extra` fields of the section); written to configs/<section>.yaml."""
        d = self._config(section, {
            "train": {"init": str(self.runs / "reason"), "workdir": str(self.runs / section),
                      "tokenizer": None, "data": None},
            "data": {"image_root": str(self.data)},
            section: {"questions": str(self.data / "train.json"),
                      "summary": str(self.runs / "summary"),
                      "eval_data": str(self.data / "val.json"),  # the held-out slice
                      **(extra or {})},
            "pipeline": {**{k: v for k, v in self.spec["pipeline"].items() if k != "questions"},
                         "data": str(self.data / "train.json")},
        })  # fmt: skip
        (self.ws / "configs").mkdir(parents=True, exist_ok=True)
        (self.ws / "configs" / f"{section}.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
        cfg = from_dict(RunConfig, d)
        cfg.validate()
        return cfg

    def stage_dpo(self) -> dict:
        try:
            from insightv_jax.train.iterate import run_iterate
        except ImportError as e:
            self.say(f"  iterative DPO is not available ({e}); the stage is skipped")
            return {"rounds": 0, "skipped": str(e)}
        rounds = int(self.spec["dpo"]["dpo"].get("rounds", 3))
        cfg = self._rounds_config("dpo")
        beside = self._eval_beside_dpo()
        try:
            with redirect(self.out):
                rows = run_iterate(cfg, rounds=rounds, print_fn=lambda m: self.say(f"  dpo | {m}"))
        finally:
            if beside is not None:
                code = beside.wait()
                self.say(f"  eval | systems before DPO: {'done' if code == 0 else f'exit {code}'}"
                         f", log {self.ws / 'logs' / 'eval_before_dpo.log'}")  # fmt: skip
        return {"rounds": len(rows), "pairs": [r.get("pairs") for r in rows]}

    def stage_rl(self) -> dict:
        """On-policy RL rounds (`insightv rl`), when the preset's `rl:` section asks for
        rounds (`rl.rl.rounds`) of the agent(s) `rl.rl.agent`; they start from the
        agents the DPO rounds started from, so the two are compared side by side. A
        summary agent trained by RL also reads corrupted oracle chains of the
        training questions (`rl.given_chains`)."""
        from insightv_jax.train.rl.loop import run_rl

        section = (self.spec.get("rl") or {}).get("rl") or {}
        rounds = int(section.get("rounds", 0))
        if rounds == 0:
            self.say("  the preset asks for no RL rounds (rl.rl.rounds); nothing to do")
            return {"rounds": 0}
        extra = {}
        if section.get("agent", "reason") != "reason" and not section.get("given_chains"):
            path = self.corrupted_chains("train", self.runs / "rl_given_chains.jsonl")
            extra["given_chains"] = str(path)
        cfg = self._rounds_config("rl", extra)
        with redirect(self.out):
            rows = run_rl(cfg, rounds=rounds, print_fn=lambda m: self.say(f"  rl | {m}"))
        return {"rounds": len(rows), "reward": [round(r.get("reward_mean", 0.0), 3) for r in rows]}
