"""`insightv bench rl`: one GRPO round of ours, timed by part, and the same round
run by Tunix's GRPO learner as the peer (launch/peers/tunix_grpo_round.py, in a
virtualenv of its own: `make tunix-peer`).

The round (both sides): the toy decoder of `insightv rl-toy` (Llama-style, vocab
16, width 64, 2 layers, 4 heads, 2 KV heads; fp32, one device), 16 prompts of
BOS + 7 random tokens (Tunix's sampler puts BOS in front of the peer's 7), G = 8 responses each (128 rows), up to 8 new tokens at temperature
1, top-p 1, stop at EOS; reward 1 when a response's first token equals its
prompt's last; group advantages; the old policy's log-probs from the training
forward; one update (μ = 1) of all 128 rows, Adam at lr 1e-3, β = 0.

Parts: `rollout` (prefill once per prompt, decode G rows per prompt), `logprob`
(the old policy's pass) and `update` (the step). Tokens/s: rollout = generated
tokens / rollout time; update = prompt + response tokens of the batch /
(log-prob + update time). Times are medians over the timed rounds, after two
warm-up rounds that compile. Our generated tokens count the EOS, Tunix's do not.
With μ = 1 Tunix takes the old log-probs from the update's own forward (stop-
gradient); ours are a separate pass (`logprob`), as μ > 1 needs.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
PEER = ROOT / "launch" / "peers" / "tunix_grpo_round.py"
PEER_PYTHON = ROOT / ".venv-tunix" / "bin" / "python"
PROMPTS, GROUP, PROMPT_LEN, MAX_NEW = 16, 8, 8, 8  # PROMPT_LEN counts the BOS


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *row] for row in rng.integers(3, 16, size=(PROMPTS, PROMPT_LEN - 1)).tolist()]


def our_round(rounds: int = 10, warmup: int = 2) -> dict:
    """Median seconds of each part over `rounds` rounds after `warmup` rounds."""
    import jax
    from flax import nnx

    from insightv_jax.models.factory import init_model
    from insightv_jax.parallel import single_device_mesh
    from insightv_jax.train.rl.losses import group_advantages
    from insightv_jax.train.rl.program import RLProgram
    from insightv_jax.train.rl.toy import response_batch, sample, toy_config
    from insightv_jax.train.trainer import build_program, global_batch

    B = PROMPTS * GROUP
    toy = toy_config("runs/bench-rl", [  # nothing is written there"train.lr=1e-3", f"train.global_batch={B}",
                                      "rl.minibatches=1", f"rl.max_response_tokens={MAX_NEW}"])  # fmt: skip
    cfg, rl = toy.run, toy.run.rl
    mesh = single_device_mesh()
    program = build_program(cfg.model, cfg, mesh, 1000, lambda *a: RLProgram(*a, rl=rl))
    model = init_model(cfg.model, mesh, 0)
    state = program.init_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    prompts = _prompts()
    seq_len = PROMPT_LEN + MAX_NEW + 1
    times: dict[str, list[float]] = {"rollout": [], "logprob": [], "update": []}
    generated, batch_tokens = [], []
    for r in range(warmup + rounds):
        t0 = time.perf_counter()
        resp = sample(program.model(state), prompts, GROUP, rl.temperature, 1.0, MAX_NEW, r)
        t1 = time.perf_counter()
        rewards = np.asarray([float(bool(x) and x[0] == prompts[j // GROUP][-1])
                              for j, x in enumerate(resp)], np.float32)  # fmt: skip
        rows = [p for p in prompts for _ in range(GROUP)]
        batch = response_batch(rows, resp, np.ones(B, bool), seq_len)
        batch["old_logps"] = program.token_logps(program.full_params(state), batch)
        batch["advantages"] = np.asarray(group_advantages(rewards, GROUP, scale=True, eps=1e-6))
        t2 = time.perf_counter()
        state, m = program(state, global_batch(batch, program))
        jax.block_until_ready(m["loss"])
        t3 = time.perf_counter()
        if r >= warmup:  # the first rounds compile
            for k, v in (("rollout", t1 - t0), ("logprob", t2 - t1), ("update", t3 - t2)):
                times[k].append(v)
            generated.append(sum(len(x) for x in resp))
            batch_tokens.append(int(batch["attention_mask"].sum()))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "round_s": float(np.median(np.sum([times[k] for k in times], axis=0))),
        "rollout_s": med["rollout"],
        "logprob_s": med["logprob"],
        "update_s": med["update"],
        "rollout_tokens_per_s": float(np.sum(generated) / np.sum(times["rollout"])),
        "update_tokens_per_s": float(
            np.sum(batch_tokens) / (np.sum(times["logprob"]) + np.sum(times["update"]))
        ),
        "generated_tokens": float(np.median(generated)),
        "rounds_timed": rounds,
    }


def tunix_round(rounds: int = 10, timeout: float = 900) -> dict:
    """The peer's JSON line, or {"error": why} when it cannot run here."""
    if not PEER_PYTHON.exists():
        return {"error": f"{PEER_PYTHON} not found: `make tunix-peer` builds it"}
    cmd = [str(PEER_PYTHON), str(PEER), "--rounds", str(rounds), "--prompts", str(PROMPTS),
           "--group", str(GROUP), "--max-new", str(MAX_NEW)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the Tunix round did not finish in {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def bench_rl(rounds: int = 10) -> dict:
    """Our round's parts and tokens/s; Tunix's round time and the ratio."""
    ours = our_round(rounds)
    peer = tunix_round(rounds)
    out = {f"ours_{k}": v for k, v in ours.items()}
    out.update({f"tunix_{k}": v for k, v in peer.items() if k != "peer"})
    if peer.get("round_s"):
        out["speedup_vs_tunix_round"] = peer["round_s"] / ours["round_s"]
    return out
