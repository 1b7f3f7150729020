"""The `eval:` section: benchmarks, systems, decoding and the report."""

import dataclasses
from typing import Literal

from insightv_jax.config.base import ConfigError


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark file of an evaluation (see eval/readers.py for the layouts)."""

    path: str = ""
    name: str | None = None  # default: the file's stem
    layout: Literal["auto", "tsv", "json", "jsonl", "parquet", "synthetic"] = "auto"
    kind: Literal["auto", "mc", "yesno", "numeric", "open", "chartqa"] = "auto"
    split: str = "test"  # the synthetic suite's split
    image_root: str | None = None  # relative image paths; default: the file's folder
    instruction: str | None = None  # after the question; None: the kind's default wording


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """A system under evaluation: `direct` / `cot` use `model`; `two_agent` uses
    `reason` + `summary` (each a model dir, run dir or HF folder); `given_chain`
    uses `summary` on the chains in `chains` (JSONL of {"id", "chain"})."""

    name: str = ""
    mode: Literal["direct", "cot", "two_agent", "given_chain"] = "direct"
    model: str | None = None
    reason: str | None = None
    summary: str | None = None
    chains: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalSampling:
    """Decoding for benchmarks: the token budgets of each system, and the
    temperatures that `eval.decoding: custom` uses. `reference` decoding (the
    authors' two-model inference script) samples every model at
    `reference_temperature` / `reference_top_p`; `greedy` decodes every model greedily."""

    direct_temperature: float = 0.0
    cot_temperature: float = 0.0
    reason_temperature: float = 0.7
    summary_temperature: float = 0.2
    top_p: float = 0.95
    direct_max_tokens: int = 32
    cot_max_tokens: int = 320
    reason_max_tokens: int = 256
    summary_max_tokens: int = 64
    reference_temperature: float = 0.2
    reference_top_p: float = 0.95

    def resolved(self, decoding: str) -> "EvalSampling":
        """The sampling settings of one decoding rule (`reference`, `greedy` or `custom`):
        every system under the same rule, so CoT and two agents decode alike."""
        if decoding == "custom":
            return self
        t = self.reference_temperature if decoding == "reference" else 0.0
        p = self.reference_top_p if decoding == "reference" else 1.0
        return dataclasses.replace(
            self, direct_temperature=t, cot_temperature=t, reason_temperature=t,
            summary_temperature=t, top_p=p,
        )  # fmt: skip


DECODINGS = ("reference", "greedy")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`insightv eval`: benchmarks x systems, paired comparisons, the report."""

    benchmarks: tuple[BenchmarkConfig, ...] = ()
    systems: tuple[SystemConfig, ...] = ()
    compare: tuple[tuple[str, str], ...] = ()  # (a, b): paired 95% CI of acc(a) - acc(b)
    sampling: EvalSampling = dataclasses.field(default_factory=EvalSampling)
    # reference: every model at temperature 0.2, top-p 0.95 (the authors' inference
    # script); greedy: every model greedy; both: one report for each (in <out>/reference
    # and <out>/greedy); custom: the per-system temperatures of `sampling`
    decoding: Literal["reference", "greedy", "both", "custom"] = "reference"
    paired_method: Literal["bootstrap", "mcnemar"] = "bootstrap"
    bootstrap: int = 2000  # resamples of the paired bootstrap
    batch_size: int = 8
    limit: int = 0  # questions per benchmark (the first ones); 0 = all
    seed: int = 0  # sampling and the multiple-choice fallback guesses
    out: str = "runs/eval"  # report.json, report.txt, report.png, predictions.jsonl

    def validate(self) -> None:
        names = [s.name for s in self.systems]
        if len(set(names)) != len(names) or "" in names:
            raise ConfigError(f"eval.systems: names must be non-empty and unique (got {names})")
        for s in self.systems:
            need = {"two_agent": ("reason", "summary"), "given_chain": ("summary", "chains")}
            need = need.get(s.mode, ("model",))
            for key in need:
                if not getattr(s, key):
                    raise ConfigError(f"eval.systems[{s.name}]: mode {s.mode} needs {key}")
        for a, b in self.compare:
            for n in (a, b):
                if n not in names:
                    raise ConfigError(f"eval.compare: {n!r} is not a system ({names})")
        for bench in self.benchmarks:
            if not bench.path:
                raise ConfigError("eval.benchmarks: every benchmark needs a path")
        if self.batch_size < 1 or self.limit < 0 or self.bootstrap < 100:
            raise ConfigError("eval: batch_size >= 1, limit >= 0 and bootstrap >= 100")
