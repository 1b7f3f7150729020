"""The `pipeline:` section: data generation (`insightv generate | assess | build`)."""

import dataclasses
from typing import Literal

from insightv_jax.config.base import ConfigError
from insightv_jax.data.prompts import Prompts

SUMMARY_MIX_KEYS = ("high", "mid", "low", "wrong", "general", "agent", "slip")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Data generation (`insightv generate | assess | build`, docs/method.md).

    Each role (generator, judge, scorer) names its backend; `openai` reads the
    API key from the environment variable `api_key_env` (never from a config).
    With `step_schema` the `openai` generator asks the server to constrain its
    replies: each step request carries `response_format` json_schema
    `sample.constrain.STEP_JSON_SCHEMA`, the final-answer request
    `FINAL_JSON_SCHEMA`. Off by default, since a server that cannot enforce a
    schema may refuse the request; `insightv serve` enforces both by constrained
    decoding, so every step parses even from an untrained model.
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
    step_schema: bool = False  # send the step / final-answer JSON schemas as response_format
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
