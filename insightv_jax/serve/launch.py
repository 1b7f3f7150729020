"""`insightv serve`: checkpoints -> agents -> schedulers -> a running server.

The model names: `--name` (default: the checkpoint folder's name) for the
agent of `--model`, and with `--summary` also `two-agent` (the `--model` agent
reasons, the `--summary` agent answers, in the prompts each was trained with,
as `insightv infer`). The same checkpoint given twice is loaded once and
shares one batch.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

from insightv_jax.errors import InsightVError
from insightv_jax.serve.api import Server, started_line
from insightv_jax.serve.models import AgentModel, TwoAgentModel
from insightv_jax.serve.protocol import Limits
from insightv_jax.serve.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The server's shape and limits (the CLI's flags)."""

    slots: int = 8  # decode rows per agent
    context: int = 2048  # cache slots per row: prompt + reply (capped by the model's)
    chunk: int = 16  # tokens decoded between joins
    reason_max_tokens: int = 256  # the two-agent chain
    limits: Limits = Limits()


def agent_name(path: str | Path) -> str:
    """A checkpoint's default model name: its folder's name."""
    return Path(path).resolve().name


def build_server(model: str | Path, summary: str | Path | None = None, *,
                 name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 settings: ServeSettings = ServeSettings(), image_root=None,
                 api_key: str | None = None, quiet: bool = False, samplers=None) -> Server:  # fmt: skip
    """A server for the checkpoint(s), listening (not yet serving). `samplers`
    maps a checkpoint path to an already loaded `Sampler` (tests, benchmarks)."""
    from insightv_jax.checkpoint import agent_prompts
    from insightv_jax.sample.infer import load_agent

    samplers = dict(samplers or {})
    if settings.limits.max_n > settings.slots:
        settings = dataclasses.replace(
            settings, limits=dataclasses.replace(settings.limits, max_n=settings.slots)
        )

    def agent(path, agent_label: str) -> AgentModel:
        key = str(Path(path).resolve())
        if key not in built:
            sampler = samplers.get(str(path)) or samplers.get(key) or load_agent(path)
            sched = Scheduler(sampler, slots=settings.slots, context=settings.context,
                              chunk=settings.chunk, max_queue=settings.limits.max_queue,
                              name=agent_label)  # fmt: skip
            built[key] = AgentModel(agent_label, sched, settings.limits.max_tokens)
        return built[key]

    built: dict[str, AgentModel] = {}
    main = agent(model, name or agent_name(model))
    models = {main.name: main}
    if summary is not None:
        answerer = agent(summary, agent_name(summary) + "-summary")
        prompts = agent_prompts(None, model, summary)
        two = TwoAgentModel(main, answerer, prompts, settings.reason_max_tokens)
        if two.name in models:
            raise InsightVError(f"--name {two.name} is taken by the two-agent system")
        models[two.name] = two
    schedulers = [m.scheduler for m in built.values()]
    try:
        return Server(models, schedulers, host, port, settings.limits, image_root, api_key, quiet)
    except OSError as e:
        for s in schedulers:
            s.close()
        raise InsightVError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def run_server(server: Server) -> None:
    """Serve until SIGTERM / SIGINT, then shut down cleanly (see api.py)."""

    def stop(signum, _frame):
        name = signal.Signals(signum).name
        if stopping:  # a second signal: the user will not wait
            print(f"{name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        stopping.append(signum)
        print(f"{name}: finishing running requests, refusing queued ones (again: exit now)",
              file=sys.stderr, flush=True)  # fmt: skip
        server.begin_shutdown()

    stopping: list[int] = []

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(started_line(server), flush=True)
        server.serve_forever()
    finally:
        server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped", flush=True)
