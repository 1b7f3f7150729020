"""Typed, frozen configuration: dataclasses loaded from YAML with `key=value` overrides.

Every section is a frozen dataclass. `from_dict` checks every key and type and
fails with a one-line `ConfigError` that names the offending key, so a typo in a
YAML file or on the command line never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from insightv_jax.data.prompts import Prompts
from insightv_jax.errors import InsightVError


class ConfigError(InsightVError, ValueError):
    """A configuration problem; the message is one line and names the key."""


T = TypeVar("T")

DTYPES = ("float32", "bfloat16", "float16")


def _check_positive(section: Any, name: str, *keys: str) -> None:
    """A ConfigError naming the first of `keys` that is below 1: a zero head count
    or width would otherwise end in a ZeroDivisionError deep in model code."""
    for key in keys:
        if getattr(section, key) < 1:
            raise ConfigError(f"{name}.{key}={getattr(section, key)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1-style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    rope_type: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A Llama-3 / Qwen2 family decoder (the language model of both agents)."""

    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # Llama with attention_bias=True
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and losses stay fp32
    attention: Literal["xla", "blockwise", "splash"] = "xla"
    attention_block_size: int = 512  # query/key block for the blockwise path
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = True  # lax.scan over the layer stack; False unrolls (small models)
    family: Literal["llama", "qwen2"] = "llama"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        _check_positive(
            self, "decoder", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "max_position_embeddings",
        )  # fmt: skip
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"decoder.head_dim={self.head_dim} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"decoder.num_heads={self.num_heads} is not a multiple of "
                f"decoder.num_kv_heads={self.num_kv_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"decoder head_dim={self.resolved_head_dim} must be even (RoPE)")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"decoder.{key}={getattr(self, key)!r} is not one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. One axis may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT image tower: CLIP (class token, pre-layernorm) or SigLIP (neither)."""

    family: Literal["clip", "siglip"] = "clip"
    image_size: int = 40  # tile side in pixels (a remainder after patches is ignored)
    patch_size: int = 10
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 1
    num_heads: int = 4
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: Literal["quick_gelu", "gelu", "gelu_pytorch_tanh"] = "quick_gelu"
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: Literal["xla", "blockwise", "splash"] = "xla"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = True  # as DecoderConfig.scan_layers

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        _check_positive(
            self, "vision", "image_size", "patch_size", "hidden_size", "intermediate_size",
            "num_layers", "num_heads", "num_channels",
        )  # fmt: skip
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"vision.patch_size={self.patch_size} exceeds vision.image_size={self.image_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision.hidden_size={self.hidden_size} is not a multiple of "
                f"vision.num_heads={self.num_heads}"
            )
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"vision.{key}={getattr(self, key)!r} is not one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """How image features reach the decoder (LLaVA-1.5 single view or LLaVA-NeXT anyres).

    `image_grid_pinpoints` are (height, width) canvas sizes in pixels, multiples of
    the tile size (`vision.image_size`); only `kind: llava_next` uses them.
    """

    image_token_id: int = 3
    feature_layer: int = -2  # index into the tower's hidden states (0 = embeddings)
    feature_strategy: Literal["default", "full"] = "default"  # default drops the CLS token
    projector: Literal["mlp2x_gelu"] = "mlp2x_gelu"
    projector_bias: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    images_per_sample: int = 1  # I of the per-sample padded batch layout


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: its kind and its parts (`vision`, `llava` for the VLM kinds)."""

    kind: Literal["causal_lm", "llava", "llava_next"] = "causal_lm"
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    vision: VisionConfig | None = None
    llava: LlavaConfig | None = None

    @property
    def is_vlm(self) -> bool:
        return self.kind in ("llava", "llava_next")

    def validate(self) -> None:
        self.decoder.validate()
        if not self.is_vlm:
            return
        if self.vision is None or self.llava is None:
            raise ConfigError(f"model.kind={self.kind!r} needs model.vision and model.llava")
        self.vision.validate()
        tile = self.vision.image_size
        if self.kind == "llava_next":
            if not self.llava.image_grid_pinpoints:
                raise ConfigError("model.llava.image_grid_pinpoints is empty (llava_next)")
            for h, w in self.llava.image_grid_pinpoints:
                if h % tile or w % tile or h <= 0 or w <= 0:
                    raise ConfigError(
                        f"model.llava.image_grid_pinpoints: {[h, w]} is not a positive "
                        f"multiple of the tile size {tile}"
                    )
            want = "default" if self.vision.family == "clip" else "full"
            if self.llava.feature_strategy != want:
                raise ConfigError(
                    f"model.llava.feature_strategy must be {want!r} for anyres with a "
                    f"{self.vision.family} tower (tile features must form a square grid)"
                )
        if self.llava.images_per_sample < 1:
            raise ConfigError("model.llava.images_per_sample must be >= 1")


TRAINABLE_PARTS = ("vision", "projector", "llm")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Supervised fine-tuning (the `train:` section): optimiser, schedule, batch,
    checkpointing and logging. Defaults follow docs/method.md."""

    lr: float = 1e-5
    warmup_fraction: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = 1
    steps: int = 0  # > 0: train exactly this many steps (overrides epochs)
    global_batch: int = 8  # sequences per optimizer step, over all hosts
    micro_batches: int = 1  # gradient accumulation: global_batch split in this many
    seq_len: int = 2048  # padded sequence length (bucket) used by plan and bench
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    trainable: tuple[str, ...] = ("projector", "llm")
    remat: Literal["none", "full", "dots", "dots_no_batch"] | None = None  # None: model's
    loss_chunk: int = 1024  # tokens (per batch shard) per cross-entropy chunk: bounds fp32 logits
    checkpoint_every: int = 500  # steps; 0 = only the final checkpoint
    keep: int = 3  # checkpoints kept
    log_every: int = 10
    workdir: str = "runs/sft"  # the run directory
    init: str | None = None  # model dir, run dir or HF folder; None = random init (preset)
    data: str | None = None  # training data (read by the data loader); None = toy data
    tokenizer: str | None = None  # tokenizer folder when training a preset from scratch
    resume: bool = True  # continue from the latest checkpoint in workdir if there is one

    def validate(self) -> None:
        for part in self.trainable:
            if part not in TRAINABLE_PARTS:
                raise ConfigError(f"train.trainable: {part!r} is not one of {TRAINABLE_PARTS}")
        if self.global_batch < 1 or self.micro_batches < 1:
            raise ConfigError("train.global_batch and train.micro_batches must be >= 1")
        if self.global_batch % self.micro_batches:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by "
                f"train.micro_batches={self.micro_batches}"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.loss_chunk < 1:
            raise ConfigError("train.loss_chunk must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How the loader reads the training data (`train.data` names the dataset):
    a .json / .jsonl file or a tfds ArrayRecord directory (see data/loader.py)."""

    split: str = "train"  # split of a tfds directory
    image_root: str | None = None  # None: the dataset file's folder
    max_length: int = 2048  # tokens after <image> expansion; longer records are bad
    buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # padded lengths
    shuffle_seed: int = 0
    workers: int = 0  # grain worker processes (0 = in the training process)
    # In-process read threads and records buffered ahead. grain's default (16 threads,
    # 500 records) busy-polls and steals a CPU-only run's cores; an accelerator host
    # with idle cores can raise both.
    read_threads: int = 1
    prefetch: int = 64
    on_bad_record: Literal["skip", "fail"] = "fail"
    # > 0: batches of records of similar length (less padding), sorted within
    # windows of this many global batches after the seeded shuffle; 0 = off
    group_by_length: int = 0

    def validate(self) -> None:
        if self.group_by_length < 0:
            raise ConfigError(f"data.group_by_length={self.group_by_length} must be >= 0")
        if not self.buckets or max(self.buckets) < self.max_length:
            raise ConfigError(
                f"data.buckets={list(self.buckets)} must include a bucket >= "
                f"data.max_length={self.max_length}"
            )
        if self.workers < 0:
            raise ConfigError(f"data.workers={self.workers} must be >= 0")
        if self.read_threads < 0 or self.prefetch < 0:
            raise ConfigError(
                f"data.read_threads={self.read_threads} and data.prefetch={self.prefetch} must be >= 0"
            )


SUMMARY_MIX_KEYS = ("high", "mid", "low", "wrong", "general", "agent", "slip")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Data generation (`insightv generate | assess | build`, docs/method.md).

    Each role (generator, judge, scorer) names its backend; `openai` reads the
    API key from the environment variable `api_key_env` (never from a config).
    """

    data: str | None = None  # queries: LLaVA JSON / JSONL (the synthetic suite's train.json)
    out: str = "runs/pipeline"  # generate/, assess/, build/ are written under it
    generator: Literal["oracle", "openai", "local"] = "oracle"
    judge: Literal["oracle", "openai", "local"] = "oracle"
    scorer: Literal["oracle", "openai", "local"] = "oracle"
    # openai-compatible endpoint (vLLM, SGLang, a hosted API)
    endpoint: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    generator_model: str = "generator"
    judge_model: str = "judge"
    scorer_model: str = "scorer"
    concurrency: int = 8  # requests in flight
    timeout_s: float = 120.0  # per request
    retries: int = 3  # per request, on timeouts, 5xx, 429 and malformed replies
    backoff_s: float = 1.0  # doubled after every retry
    json_retries: int = 3  # invalid step JSON: re-ask this often, then an Error step
    # local backend: checkpoints (model dir, run dir or HF folder) of each role
    generator_checkpoint: str | None = None
    judge_checkpoint: str | None = None
    scorer_checkpoint: str | None = None
    step_tokens: int = 256  # local backend: new tokens per constrained step
    final_tokens: int = 256  # new tokens for the final-answer call
    # sampling (docs/method.md)
    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.05  # set 1.0 for hosted APIs that reject the field
    max_new_tokens: int = 1024
    judge_temperature: float = 0.2
    judge_top_p: float = 0.7
    judge_max_tokens: int = 16
    scorer_temperature: float = 0.2
    scorer_max_tokens: int = 512
    # oracle teacher (synthetic suite)
    error_rate: float = 0.3
    oracle_style: Literal["full", "terse"] = "full"
    oracle_delay_s: float = 0.0  # sleep per chain (a slow teacher, for tests)
    # assessment and datasets
    floor_score: float = 1.0
    high_threshold: float = 80.0  # score >= this: high
    mid_threshold: float = 50.0  # score >= this: mid, else low
    min_gap: float = 10.0  # preference pairs: chosen - rejected >= min_gap
    summary_mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {
            "high": 1.0, "mid": 1.0, "low": 1.0, "wrong": 1.0, "general": 1.0, "agent": 1.0,
            "slip": 0.0,
        }
    )  # fmt: skip
    # the reasoning agent's own chains for the summary set (`insightv agent-chains`,
    # docs/method.md): sampled from `agent_reasoner` on the first `agent_questions` queries
    # (0 = all), `agent_samples` per question; judged by the chain's own final claim,
    # else by `agent_summary`'s greedy answer from it
    agent_reasoner: str | None = None
    agent_summary: str | None = None
    agent_samples: int = 2
    agent_questions: int = 0
    agent_temperature: float = 0.7
    agent_top_p: float = 0.95
    agent_max_tokens: int = 256
    agent_batch: int = 64
    general_data: str | None = None  # general QA (LLaVA JSON); None: the queries answered directly
    batch_size: int = 32  # queries per unit of work (generate, assess)
    shard: int | None = None  # this process's share; None: jax.process_index()
    num_shards: int | None = None  # None: jax.process_count()
    prompts: Prompts = dataclasses.field(default_factory=Prompts)

    def validate(self) -> None:
        if self.num_samples < 1 or self.concurrency < 1 or self.batch_size < 1:
            raise ConfigError("pipeline.num_samples, concurrency and batch_size must be >= 1")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ConfigError(f"pipeline.error_rate={self.error_rate} is not in [0, 1]")
        if not self.mid_threshold <= self.high_threshold:
            raise ConfigError("pipeline.mid_threshold must be <= pipeline.high_threshold")
        unknown = sorted(set(self.summary_mix) - set(SUMMARY_MIX_KEYS))
        if unknown or any(v < 0 for v in self.summary_mix.values()):
            raise ConfigError(
                f"pipeline.summary_mix: keys must be {'/'.join(SUMMARY_MIX_KEYS)} with weights "
                f">= 0 (got {dict(self.summary_mix)})"
            )
        if self.agent_samples < 1 or self.agent_batch < 1 or self.agent_questions < 0:
            raise ConfigError("pipeline.agent_samples and agent_batch must be >= 1, "
                              "agent_questions >= 0")  # fmt: skip
        if (self.shard is None) != (self.num_shards is None):
            raise ConfigError("pipeline.shard and pipeline.num_shards are set together")
        if self.num_shards is not None and not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"pipeline.shard={self.shard} is not in [0, {self.num_shards})")


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

    def resolved(self, decoding: str) -> EvalSampling:
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


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference optimisation of the reasoning agent (`insightv dpo`) and the
    iterative rounds (`insightv iterate`), docs/method.md. The optimiser,
    batch (`train.global_batch` = pairs per step) and run directory come from
    `train:`; `train.init` is the policy to start from (M_1)."""

    beta: float = 0.1
    gamma: float = 1.0  # weight of the token-mean CE on the chosen response
    label_smoothing: float = 0.0  # sigmoid / ref_free losses only
    loss: Literal["sigmoid", "ipo", "ref_free"] = "sigmoid"
    ref_logps: Literal["precomputed", "on_the_fly"] = "precomputed"
    pairs: str | None = None  # `insightv dpo`: the preference-pair JSONL
    eval_pairs: str | None = None  # held-out pairs: reward accuracy after training
    reference: str | None = None  # reference checkpoint; None: train.init (the start policy)
    logprob_batch: int = 8  # pairs per call of the reference log-prob pass
    # iterate: sampling from M_t, judging, scoring, pairs
    questions: str | None = None  # LLaVA JSON / JSONL questions (the synthetic suite's train.json)
    questions_per_round: int = 0  # round t: the t-th block of K of a seeded shuffle; 0 = all
    summary: str | None = None  # the summary agent's checkpoint (fixed over rounds)
    samples_per_question: int = 4
    reason_temperature: float = 0.7
    summary_temperature: float = 0.2
    top_p: float = 0.95
    reason_max_tokens: int = 256
    summary_max_tokens: int = 64
    sample_batch: int = 16  # chains decoded per sampler call
    min_gap: float = 10.0  # chosen_score - rejected_score >= min_gap
    floor_score: float = 1.0  # the score of wrong-answer chains
    rounds: int = 3
    eval_data: str | None = None  # held-out questions: two-agent accuracy after each round
    eval_limit: int = 0  # the first K held-out questions; 0 = all
    # against likelihood displacement (the chosen chain's log-prob falling):
    # DPOP (Pal et al. 2024): -log σ(β(Δ - λ·max(0, log π_ref(c) - log π(c))))
    dpop_lambda: float = 0.0
    # score only the tokens from the first step where chosen and rejected differ
    # (the shared prefix carries no preference)
    truncate_at_divergence: bool = False
    question_seed: int = 0  # the shuffled order rounds draw fresh questions from

    def validate(self) -> None:
        if self.beta <= 0 or self.gamma < 0:
            raise ConfigError(f"dpo: beta={self.beta} must be > 0 and gamma={self.gamma} >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.samples_per_question < 2:
            raise ConfigError("dpo.samples_per_question must be >= 2 (pairs need two chains)")
        if min(self.logprob_batch, self.sample_batch, self.rounds) < 1:
            raise ConfigError("dpo.logprob_batch, dpo.sample_batch and dpo.rounds must be >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The top-level config of a command: model, mesh and the stage sections."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    seed: int = 0

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.pipeline.validate()
        self.eval.validate()
        self.dpo.validate()


# ---------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if not args:
            return dict(value)
        # the values too: a weight given as text would otherwise fail later, in arithmetic
        kt, vt = args
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-6 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain (YAML-safe) nested dict of a config dataclass."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # an unclosed list, a !!python tag: one line, no traceback
            why = _yaml_problem(e)
            raise ConfigError(f"override {dotted}: {raw!r} is not valid YAML ({why})") from None
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line saying what is wrong, and where, in a YAML text."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem:
        return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark else problem
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable or malformed file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section."""
    out = _deep_copy(base)
    for k, v in top.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def read_with_includes(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """A YAML config whose optional `include:` lists files (relative to it) that
    it extends: included files first, this file's keys on top."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle")
    data = read_yaml(path)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, read_with_includes(path.parent / inc, (*_seen, path)))
    return deep_merge(merged, data)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cls: type[T] = RunConfig,
) -> T:
    """Load `cls` from a YAML file (optional) plus `key=value` overrides, validated."""
    data = read_with_includes(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the `config.yaml` of checkpoints and runs)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
