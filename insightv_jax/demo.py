"""`insightv demo`: the whole Insight-V pipeline on the embedded synthetic suite.

Stages (each leaves its outputs under the workdir and `stages/<name>.done`; a
rerun skips finished stages, and an interrupted SFT resumes from its checkpoint):
  1 synth      train/val/test of the synthetic suite (LLaVA JSON + PNGs)
  2 tokenizer  a byte-level BPE on every text the demo tokenises
  3 base       the base VLM from scratch on direct question -> answer data
  4 data       oracle generation (N chains per question) -> assess -> build
  5 agents     SFT of the reasoning agent and the CoT baseline, one budget for both
  6 chains     the reasoning agent's own chains on training questions, judged, added
               to the summary set (pipeline/agent_chains.py, docs/method.md)
  7 summary    SFT of the summary agent on that set
  8 dpo        iterative DPO of the reasoning agent (train/iterate.py)
  9 eval       base direct, CoT, two-agent, two-agent after each DPO round, the summary
               agent on corrupted chains; each under the reference and greedy decoding
 10 export     the final agents as Hugging Face folders
A preset (configs/demo/<preset>.yaml) holds every knob; its `base`, `reason`,
`summary`, `cot` and `dpo` sections are merged over the SFT config it names.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from insightv_jax.config import (
    ConfigError,
    RunConfig,
    deep_merge,
    from_dict,
    read_with_includes,
    read_yaml,
)
from insightv_jax.errors import InsightVError

STAGES = ("synth", "tokenizer", "base", "data", "agents", "chains", "summary", "dpo", "eval",
          "export")  # fmt: skip
AGENTS = ("cot", "reason")  # trained side by side, with the same schedule
REPO = Path(__file__).resolve().parents[1]
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def one_thread_env(env: dict) -> dict:
    """`env` with XLA:CPU limited to one thread (a subprocess that shares the cores)."""
    return {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD}".strip()}


def preset_path(preset: str) -> Path:
    """configs/demo/<preset>.yaml (or a path to a preset file)."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        return path
    path = REPO / "configs" / "demo" / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: demo preset {preset!r} not found")
    return path


def load_preset(preset: str, overrides: dict | None = None) -> dict:
    """The preset as a dict (relative config paths resolved), `overrides` merged in."""
    path = preset_path(preset)
    spec = deep_merge(read_yaml(path), overrides or {})  # bad YAML: a one-line ConfigError
    for key in ("sft_config", "suite", "pipeline", "eval", "base"):
        if key not in spec:
            raise ConfigError(f"{path}: demo preset has no '{key}' section")
    sft = Path(spec["sft_config"])
    spec["sft_config"] = str(sft if sft.is_absolute() else (path.parent / sft).resolve())
    return spec


class Demo:
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
        from insightv_jax.data.conversation import build_tokenizer
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
        tok = build_tokenizer(
            lines, self.ws / "tokenizer", template="minimal",
            vocab_size=int(self.spec["tokenizer"]["vocab_size"]),
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
        _check_finished("base", cfg)

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
        with _redirect(self.out):
            stats = run_agent_chains(cfg, progress_file=open(os.devnull, "w"))
        counts = run_build(cfg)
        return {"chains": stats["chains_written"] + stats["chains_resumed"],
                "right": counts["agent_chains"]["right"],
                "summary": counts["summary"]}  # fmt: skip

    def stage_summary(self) -> dict:
        cfg = self._agent_config("summary")
        self._sft_jobs({"summary": cfg})
        return {"summary": cfg["train"].get("steps") or f"{cfg['train'].get('epochs')} epochs"}

    def _sft_jobs(self, jobs: dict[str, dict]) -> None:
        """Run SFT configs; with `parallel` >= 2, side by side as 1-thread
        subprocesses pinned one per core (independent jobs: more throughput than one 2-thread process)."""
        from insightv_jax.train import run_sft

        parallel = int(self.spec.get("parallel", 1))
        cfg_dir = self.ws / "configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        if parallel < 2 or len(jobs) < 2:
            for name, d in jobs.items():
                (cfg_dir / f"{name}.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
                steps = d["train"].get("steps")
                budget = f"{steps} steps" if steps else f"{d['train'].get('epochs', 1)} epoch(s)"
                self.say(f"  sft {name}: {budget}")
                with _redirect(self.out):
                    run_sft(from_dict(RunConfig, d))
                _check_finished(name, d)
            return
        pending = list(jobs)
        running: dict[int, tuple[str, subprocess.Popen, threading.Thread]] = {}
        failed = []
        while pending or running:
            for core in range(parallel):
                if core not in running and pending:
                    name = pending.pop(0)
                    path = cfg_dir / f"{name}.yaml"
                    path.write_text(yaml.safe_dump(jobs[name], sort_keys=False))
                    running[core] = (name, *self._spawn(name, path, core))
            time.sleep(0.5)
            for core, (name, proc, pump) in list(running.items()):
                if proc.poll() is not None:
                    pump.join()
                    del running[core]
                    if proc.returncode:
                        failed.append(f"{name} (exit {proc.returncode})")
        if failed:
            raise InsightVError(f"demo SFT failed: {', '.join(failed)}; see {self.ws}/logs/")
        for name, d in jobs.items():
            _check_finished(name, d)

    def _spawn(self, name: str, path: Path, core: int | None):
        """An `insightv sft` subprocess: one thread pinned to `core`, or (None) all cores."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # progress lines as they come
        cmd = [sys.executable, "-m", "insightv_jax.cli", "sft", "--config", str(path)]
        if core is not None:
            env = one_thread_env(env)
            if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
                cmd = ["taskset", "-c", str(core), *cmd] if _has_taskset() else cmd
        logs = self.ws / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        where = "all cores" if core is None else f"core {core}"
        self.say(f"  sft {name}: started on {where}, log {logs / (name + '.log')}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, cwd=str(REPO))  # fmt: skip
        pump = threading.Thread(target=self._pump, args=(name, proc, logs / f"{name}.log"))
        pump.start()
        return proc, pump

    def _pump(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        with open(log, "a") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if line.startswith(("step ", "finished", "error", "Traceback")):
                    self.say(f"  {name} | {line.rstrip()}")

    # ------------------------------------------------------------ 6-8

    def stage_dpo(self) -> dict:
        try:
            from insightv_jax.train.iterate import run_iterate
        except ImportError as e:
            self.say(f"  iterative DPO is not available ({e}); the stage is skipped")
            return {"rounds": 0, "skipped": str(e)}
        rounds = int(self.spec["dpo"]["dpo"].get("rounds", 3))
        d = self._config("dpo", {
            "train": {"init": str(self.runs / "reason"), "workdir": str(self.runs / "dpo"),
                      "tokenizer": None, "data": None},
            "data": {"image_root": str(self.data)},
            "dpo": {"questions": str(self.data / "train.json"),
                    "summary": str(self.runs / "summary"),
                    "eval_data": str(self.data / "val.json")},  # the held-out slice
            "pipeline": {**{k: v for k, v in self.spec["pipeline"].items() if k != "questions"},
                         "data": str(self.data / "train.json")},
        })  # fmt: skip
        (self.ws / "configs").mkdir(parents=True, exist_ok=True)
        (self.ws / "configs" / "dpo.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
        cfg = from_dict(RunConfig, d)
        cfg.validate()
        beside = self._eval_beside_dpo()
        try:
            with _redirect(self.out):
                rows = run_iterate(cfg, rounds=rounds, print_fn=lambda m: self.say(f"  dpo | {m}"))
        finally:
            if beside is not None:
                code = beside.wait()
                self.say(f"  eval | systems before DPO: {'done' if code == 0 else f'exit {code}'}"
                         f", log {self.ws / 'logs' / 'eval_before_dpo.log'}")  # fmt: skip
        return {"rounds": len(rows), "pairs": [r.get("pairs") for r in rows]}

    def _eval_beside_dpo(self) -> subprocess.Popen | None:
        """An `insightv eval` subprocess for the systems that do not depend on DPO,
        run while DPO keeps ~1.3 of 2 cores busy; the eval stage reuses their saved
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

    def round_policies(self) -> list[str]:
        """The reasoning agent after each finished DPO round."""
        out = []
        for t in range(1, 100):
            done = self.runs / "dpo" / f"round_{t}" / "summary.json"
            if not done.exists():
                break
            out.append(json.loads(done.read_text())["policy_out"])
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
        split = e.pop("split", "test")
        e.update(
            benchmarks=[{"path": str(self.data), "name": "synthetic", "split": split}],
            systems=systems, compare=compare, out=str(self.ws / "eval"),
        )  # fmt: skip
        return {"seed": self.spec.get("seed", 0), "eval": e,
                "pipeline": {"prompts": self.spec["pipeline"].get("prompts", {})}}  # fmt: skip

    def corrupted_chains(self, split: str) -> Path:
        """Robustness check input: for each eval question, an oracle chain with
        one deliberate error (a miscount, wrong cell, misread bar or slip)."""
        from insightv_jax.data.synthetic.teacher import ERROR_VISIBLE_IN, OracleTeacher
        from insightv_jax.pipeline.backend_common import chain_steps_text

        p = self.spec["pipeline"]
        teacher = OracleTeacher(1.0, p.get("oracle_style", "terse"), self.spec.get("seed", 0))
        records = json.loads((self.data / f"{split}.json").read_text())
        path = self.ws / "eval" / "corrupted_chains.jsonl"
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
        with _redirect(self.out):
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


def _check_finished(name: str, d: dict) -> None:
    """An SFT stopped early (SIGTERM / preemption) must not count as done."""
    from insightv_jax.checkpoint import latest_step

    steps = int(d["train"].get("steps") or 0)
    if steps and latest_step(d["train"]["workdir"]) < steps:
        raise InsightVError(f"demo SFT {name} stopped before step {steps}; rerun to continue")


def _has_taskset() -> bool:
    from shutil import which

    return which("taskset") is not None


class _redirect:
    """Send in-process stage output (print) to the demo's stream."""

    def __init__(self, out):
        self.out = out

    def __enter__(self):
        import contextlib

        self._ctx = contextlib.redirect_stdout(self.out)
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ------------------------------------------------------------------ headline


def headline(eval_dir: Path, families: list[str], a: str = "cot", b: str = "base") -> dict:
    """acc(a) - acc(b) pooled over `families`, with its paired 95% CI."""
    from insightv_jax.eval.metrics import paired_ci

    got: dict[str, dict[str, bool]] = {a: {}, b: {}}
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
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


@contextlib.contextmanager
def compile_cache(folder: Path):
    """JAX's persistent compilation cache in `folder` while the block runs, for this
    process and the stages it spawns, unless the user chose one already
    (JAX_COMPILATION_CACHE_DIR); the previous setting is restored afterwards.

    The demo's processes compile the same programs again — the model init, the
    SFT steps of agents that share a shape, samplers across DPO rounds and eval —
    and a cached program is the same program, so results do not change."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_dir = jax.config.jax_compilation_cache_dir
    saved_min = jax.config.jax_persistent_cache_min_compile_time_secs
    folder = Path(saved_env[keys[0]] or folder)
    folder.mkdir(parents=True, exist_ok=True)
    # programs that compile in well under a second are cheaper to rebuild than to read
    min_secs = saved_env[keys[1]] or "0.5"
    os.environ.update({keys[0]: str(folder), keys[1]: min_secs})
    cc.set_cache_dir(str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_secs))
    cc.reset_cache()
    try:
        yield folder
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cc.set_cache_dir(saved_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved_min)
        cc.reset_cache()


def orderings(demo: Demo) -> list[tuple[str, str]]:
    """The paper's orderings this demo checks, as (a, b) for "a > b"."""
    pairs = [("two_agent", "cot"), ("cot", "base"), ("summary_corrupted", "base")]
    rounds = demo.round_policies()
    if rounds:
        pairs.append((f"two_agent_dpo{len(rounds)}", "two_agent"))
    return pairs


def run_seeds(preset: str, workdir: str, seeds: list[int], overrides=None) -> list[dict]:
    """The demo once per seed (`<workdir>/seed_<s>/`, same questions, another training
    seed), then each ordering as a mean over seeds with a CI over questions and seeds
    (eval/multiseed.py) in `<workdir>/seeds.{txt,json}`."""
    from insightv_jax.eval.multiseed import format_orderings, ordering, read_correct

    demos = []
    for seed in seeds:
        print(f"\n=== seed {seed} ===", flush=True)
        demo = Demo(load_preset(preset, deep_merge(overrides or {}, {"seed": seed})),
                    Path(workdir) / f"seed_{seed}")  # fmt: skip
        demo.run()
        demos.append(demo)
    per_seed = [read_correct(d.main_eval_dir() / "predictions.jsonl") for d in demos]
    rows = [ordering(per_seed, a, b) for a, b in orderings(demos[0])]
    text = format_orderings(rows)
    out = Path(workdir)
    (out / "seeds.json").write_text(json.dumps({"seeds": seeds, "orderings": rows}, indent=1))
    (out / "seeds.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    return rows


def run_demo(preset: str = "tiny", workdir: str = "workdir/demo", overrides=None,
             seeds: list[int] | None = None):  # fmt: skip
    """`insightv demo`: run (or resume) the demo; returns the eval report (or, with
    several `seeds`, the orderings over them)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped
    if seeds:
        return run_seeds(preset, workdir, seeds, overrides)
    return Demo(load_preset(preset, overrides), workdir).run()
