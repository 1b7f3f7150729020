"""`insightv rl-toy`: a verifiable task where on-policy RL must help, end to end.

Two-digit addition by a tiny decoder trained from scratch, small enough for a CPU:

  task     "a+b=" -> the digits of a + b, then end of sequence (a, b in 10..99). The
           8100 questions are split once by a fixed permutation: `test` (the first
           1000), `val` (the next 1000) and `train` (the rest).
  start    SFT on train answers, stopped at the first check where the held-out
           (val) greedy accuracy reaches `start_accuracy`: a policy that is often
           wrong greedily while its samples are often right (pass@G well above
           pass@1), the regime where RL with a verifiable reward has something
           to sharpen. Written once to WORKDIR/start/ (a model directory).
  RL       `steps` rollout batches; each samples `rl.group_size` answers to
           `questions` train questions from the CURRENT policy (one shared prefill
           per question; a random key per (step, question, sample), so a resumed run
           draws the same answers), rewards 1 for the exact sum else 0, group
           advantages, the old policy's log-probs from the training forward, then
           μ = rl.epochs × rl.minibatches updates (`RLProgram`). WORKDIR/rl/.
  control  the same run with each step's rewards permuted across its samples
           (`rl.shuffle_rewards`): as many updates on the same kind of samples, no
           information in the rewards. WORKDIR/control/.
  report   greedy accuracy on val and test for the start, RL and control policies
           with paired 95% intervals of the differences, and pass@G of the start.

Each run checkpoints every `save_every` steps (orbax, the whole train state);
rerunning the command continues from the newest checkpoint and ends with the
parameters of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from insightv_jax.config import RunConfig, load_config
from insightv_jax.errors import InsightVError
from insightv_jax.jsonl import append_jsonl

# ---------------------------------------------------------------- the task

PAD, BOS, EOS = 0, 1, 2
DIGIT0, PLUS, EQUALS = 3, 13, 14  # "0".."9" are ids 3..12
ANSWER_MAX = 4  # up to three digits, then EOS
SEQ_LEN = 16  # question + answer, right-padded to one compiled shape

# the toy decoder: Llama-style, ~70k parameters (`insightv bench rl` times the same one)
TOY_DECODER = [
    "model.decoder.vocab_size=16",
    "model.decoder.hidden_size=64",
    "model.decoder.intermediate_size=128",
    "model.decoder.num_layers=2",
    "model.decoder.num_heads=4",
    "model.decoder.num_kv_heads=2",
    "model.decoder.rope_theta=10000",
    "model.decoder.max_position_embeddings=64",
]


def _digits(n: int) -> list[int]:
    return [DIGIT0 + int(c) for c in str(n)]


def question_tokens(a: int, b: int) -> list[int]:
    """The prompt's token ids: BOS a + b =."""
    return [BOS, *_digits(a), PLUS, *_digits(b), EQUALS]


def answer_tokens(a: int, b: int) -> list[int]:
    """The target: the digits of a + b, then EOS."""
    return [*_digits(a + b), EOS]


def is_correct(a: int, b: int, response: list[int]) -> bool:
    """The verifiable reward: the response is exactly the sum's digits then EOS."""
    return list(response) == answer_tokens(a, b)


def splits() -> dict[str, np.ndarray]:
    """{"test", "val", "train"}: (n, 2) int arrays of (a, b), fixed for every run."""
    pairs = np.array([(a, b) for a in range(10, 100) for b in range(10, 100)], np.int64)
    order = np.random.default_rng(20251206).permutation(len(pairs))
    return {"test": pairs[order[:1000]], "val": pairs[order[1000:2000]],
            "train": pairs[order[2000:]]}  # fmt: skip


def prompts_of(pairs: np.ndarray) -> list[list[int]]:
    """The prompts of (a, b) pairs."""
    return [question_tokens(a, b) for a, b in pairs]


def sft_batch(pairs: np.ndarray) -> dict[str, np.ndarray]:
    """Question + answer rows, right-padded to SEQ_LEN; labels on the answer only."""
    from insightv_jax.train.losses import IGNORE

    n = len(pairs)
    ids = np.full((n, SEQ_LEN), PAD, np.int32)
    labels = np.full((n, SEQ_LEN), IGNORE, np.int32)
    mask = np.zeros((n, SEQ_LEN), np.int32)
    for i, (a, b) in enumerate(pairs):
        q, t = question_tokens(a, b), answer_tokens(a, b)
        ids[i, : len(q) + len(t)] = q + t
        labels[i, len(q) : len(q) + len(t)] = t
        mask[i, : len(q) + len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_batch(prompts: list[list[int]], responses: list[list[int]], scored: np.ndarray,
                   seq_len: int = SEQ_LEN) -> dict:  # fmt: skip
    """The RL batch rows: prompt + sampled response, right-padded to `seq_len`, labels
    on the response's tokens where `scored` (a row not scored has none: it adds
    nothing to the step)."""
    from insightv_jax.train.losses import IGNORE

    n = len(responses)
    ids = np.full((n, seq_len), PAD, np.int32)
    labels = np.full((n, seq_len), IGNORE, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, (q, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(q) + len(r)] = q + list(r)
        mask[i, : len(q) + len(r)] = 1
        if scored[i]:
            labels[i, len(q) : len(q) + len(r)] = r
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """What `insightv rl-toy` runs; the run config (`run`) holds the model, the
    optimiser (`train:`) and the RL loss (`rl:`)."""

    workdir: str
    run: RunConfig
    steps: int = 200  # rollout batches of the RL and control runs
    questions: int = 32  # train questions per rollout batch (× rl.group_size answers)
    start_accuracy: float = 0.3  # SFT stops once val greedy accuracy reaches this
    sft_lr: float = 3e-3
    sft_batch: int = 64
    sft_max_steps: int = 4000
    sft_check_every: int = 25
    eval_every: int = 10  # val greedy accuracy in the RL log every k steps (0 = never)
    save_every: int = 10
    seed: int = 0
    val_limit: int = 1000  # held-out questions used (the first k of each split)
    pass_chunk: int = 125  # questions per sampling batch of the start's pass@G (its draws)


def toy_config(workdir: str, overrides=(), **fields) -> ToyConfig:
    """A ToyConfig whose run config is the toy decoder's plus `overrides` (k=v)."""
    base = TOY_DECODER + [
        "train.schedule=constant", "train.warmup_fraction=0", "train.lr=3e-4",
        "train.clip_norm=1.0", "train.loss_chunk=16", "train.log_every=1000000",
        "rl.group_size=8", "rl.temperature=1.0", "rl.max_response_tokens=4", "rl.minibatches=4",
        f"train.workdir={workdir}",
    ]  # fmt: skip
    cfg = load_config(None, base + list(overrides))
    if cfg.rl.max_response_tokens < ANSWER_MAX:
        raise InsightVError(f"rl.max_response_tokens={cfg.rl.max_response_tokens}: "
                            f"the toy's answers need {ANSWER_MAX}")  # fmt: skip
    toy = ToyConfig(workdir=workdir, run=cfg, **fields)
    for name in ("steps", "questions", "sft_batch", "sft_max_steps", "sft_check_every",
                 "save_every", "val_limit", "pass_chunk"):  # fmt: skip
        if getattr(toy, name) < 1:
            raise InsightVError(f"rl-toy: {name}={getattr(toy, name)} must be >= 1")
    if not 0.0 < toy.start_accuracy <= 1.0:
        raise InsightVError(f"rl-toy: start_accuracy={toy.start_accuracy} must be in (0, 1]")
    if toy.questions * cfg.rl.group_size % cfg.rl.minibatches:
        raise InsightVError(
            f"{toy.questions} questions × rl.group_size={cfg.rl.group_size} do not split into "
            f"rl.minibatches={cfg.rl.minibatches}"
        )
    return toy


# ---------------------------------------------------------------- decoding


def sample(model, prompts: list[list[int]], n: int, temperature: float, top_p: float,
           max_new: int, seed: int, ids: np.ndarray | None = None) -> list[list[int]]:  # fmt: skip
    """`n` responses per prompt (rows q·n … q·n + n − 1 answer prompt q) from one
    shared prefill, stopping at EOS; temperature 0 is greedy. With `ids` (one int
    per prompt) row (q, k) draws with the key of (seed, ids[q]·n + k), whatever else
    is in the batch."""
    from insightv_jax.sample.sampler import Sampler, SamplingParams, row_keys

    sampler = Sampler(model, pad_id=PAD)
    state = sampler.start(len(prompts), max(map(len, prompts)) + max_new, seed)
    state = sampler.extend(state, prompts).repeat_rows(n)
    if ids is not None:
        rows = (np.asarray(ids, np.int64)[:, None] * n + np.arange(n)[None]).reshape(-1)
        state = state.replace(rng=row_keys(seed, rows % (1 << 32)))
    params = SamplingParams(temperature, top_p=top_p, max_new_tokens=max_new,
                            stop_token_ids=(EOS,), seed=seed)  # fmt: skip
    _, out = sampler.decode(state, params)
    return [r["tokens"] for r in sampler.unpack(out, params)]


def greedy_correct(model, pairs: np.ndarray, batch: int = 500) -> np.ndarray:
    """Per question: is the greedy answer exactly right (bool array); batches of at
    most `batch` questions, the last padded (one compiled shape)."""
    batch = max(1, min(batch, len(pairs)))
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
        res = sample(model, prompts_of(pad), 1, 0.0, 1.0, ANSWER_MAX, 0)[: len(chunk)]
        out += [is_correct(a, b, r) for (a, b), r in zip(chunk, res)]
    return np.asarray(out, bool)


def pass_at(model, pairs: np.ndarray, n: int, temperature: float, seed: int = 0,
            chunk_size: int = 125) -> dict:  # fmt: skip
    """Sampled accuracy: pass@1 (mean over samples) and pass@n (any of n right), the
    questions sampled `chunk_size` at a time (the draws depend on it)."""
    ok = []
    for i in range(0, len(pairs), chunk_size):
        chunk = pairs[i : i + chunk_size]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - len(chunk), 0)])
        res = sample(model, prompts_of(pad), n, temperature, 1.0, ANSWER_MAX, seed + i)
        rows = np.asarray([is_correct(*pad[j // n], r) for j, r in enumerate(res)])
        ok.append(rows.reshape(-1, n)[: len(chunk)])
    ok = np.concatenate(ok)
    return {"pass@1": float(ok.mean()), f"pass@{n}": float(ok.any(axis=1).mean())}


# ---------------------------------------------------------------- 1. the SFT start


def sft_start(toy: ToyConfig, print_fn=print) -> Path:
    """WORKDIR/start: the toy decoder SFT'd until val greedy accuracy reaches
    `start_accuracy` (written once; a rerun reuses it)."""
    from flax import nnx

    from insightv_jax.checkpoint import save_model_dir
    from insightv_jax.models.factory import init_model
    from insightv_jax.parallel import single_device_mesh
    from insightv_jax.train.trainer import build_program, global_batch

    out = Path(toy.workdir) / "start"
    if (out / "params").exists():
        return out
    cfg = dataclasses.replace(toy.run, train=dataclasses.replace(
        toy.run.train, lr=toy.sft_lr, global_batch=toy.sft_batch))  # fmt: skip
    mesh = single_device_mesh()
    program = build_program(cfg.model, cfg, mesh, toy.sft_max_steps)
    model = init_model(cfg.model, mesh, toy.seed)
    state = program.init_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    data, val = splits(), splits()["val"][: toy.val_limit]
    rng = np.random.default_rng((toy.seed, 1))
    acc, t0 = 0.0, time.perf_counter()
    for step in range(1, toy.sft_max_steps + 1):
        pick = data["train"][rng.integers(0, len(data["train"]), toy.sft_batch)]
        state, m = program(state, global_batch(sft_batch(pick), program))
        if step % toy.sft_check_every == 0:
            acc = float(greedy_correct(program.model(state), val).mean())
            print_fn(f"start: SFT step {step}: loss {float(m['loss']):.3f}, "
                     f"val greedy {acc:.3f}")  # fmt: skip
            if acc >= toy.start_accuracy:
                break
    else:
        raise InsightVError(f"start: val greedy accuracy {acc:.3f} after {toy.sft_max_steps} "
                            f"SFT steps, below start_accuracy={toy.start_accuracy}")  # fmt: skip
    save_model_dir(program.model(state), cfg.model, out)
    (out / "start.json").write_text(
        json.dumps({"sft_steps": step, "val_greedy": acc, "seconds": time.perf_counter() - t0})
        + "\n"
    )
    return out


# ---------------------------------------------------------------- 2. RL (or the control)


def _rollout(toy: ToyConfig, model, data: np.ndarray, step: int, shuffle: bool):
    """One rollout batch of step `step`: (the (a, b) pair of each row, the responses,
    the rewards the update uses, which rows are scored, stats of the true rewards).
    With rl.dynamic_sampling, groups whose rewards are all equal are dropped and more
    questions are drawn (up to rl.refill_draws more draws) to refill the batch; rows
    still missing stay unscored."""
    from insightv_jax.train.rl.losses import overlong_penalty

    rl = toy.run.rl
    G, Q = rl.group_size, toy.questions
    kept_pairs, kept_resp, kept_r, true_r = [], [], [], []
    drawn = dropped = 0
    draws = 1 + rl.refill_draws  # the key ids of a step's draws must not meet the next step's
    for draw in range(draws if rl.dynamic_sampling else 1):
        rng = np.random.default_rng((toy.seed, 2, step, draw))
        idx = rng.integers(0, len(data), Q)
        pairs = data[idx]
        resp = sample(model, prompts_of(pairs), G, rl.temperature, rl.top_p, rl.max_response_tokens,
                      toy.seed, ids=(step * draws + draw) * len(data) + idx)  # fmt: skip
        r = np.asarray([is_correct(*pairs[j // G], x) for j, x in enumerate(resp)], np.float32)
        if rl.overlong == "soft":  # DAPO's length penalty, part of the reward
            r += np.asarray(overlong_penalty([len(x) for x in resp], rl.max_response_tokens,
                                             rl.overlong_buffer))  # fmt: skip
        true_r.append(r)
        if shuffle:  # the control: the same rewards, no longer attached to their samples
            r = np.random.default_rng((toy.seed, 3, step, draw)).permutation(r)
        drawn += Q
        groups = r.reshape(Q, G)
        signal = (
            ~np.all(groups == groups[:, :1], axis=1) if rl.dynamic_sampling else np.ones(Q, bool)
        )
        dropped += int((~signal).sum())
        for q in np.flatnonzero(signal):
            kept_pairs.append(np.repeat(pairs[q : q + 1], G, 0))
            kept_resp += resp[q * G : (q + 1) * G]
            kept_r.append(groups[q])
        if len(kept_r) >= Q:
            break
    kept = min(len(kept_r), Q)
    scored = np.zeros(Q * G, bool)
    scored[: kept * G] = True
    while len(kept_r) < Q:  # unscored filler rows: the batch keeps its compiled shape
        kept_pairs.append(np.repeat(pairs[:1], G, 0))
        kept_resp += resp[:G]
        kept_r.append(np.zeros(G, np.float32))
    pairs_rows = np.concatenate(kept_pairs[:Q])
    rewards = np.concatenate(kept_r[:Q])
    true = np.concatenate(true_r)
    lengths = [len(x) for x in kept_resp[: Q * G]]
    stats = {"reward_mean": float(true.mean()), "reward_std": float(true.std()),
             "groups_dropped": dropped, "groups_drawn": drawn,
             "response_length": float(np.mean(lengths))}  # fmt: skip
    return pairs_rows, kept_resp[: Q * G], rewards, scored, stats


_PROGRAMS: dict = {}  # RL programs built in this process, by configuration


def _manager(run_dir: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def rl_run(toy: ToyConfig, start: Path, name: str, shuffle: bool, print_fn=print) -> Path:
    """WORKDIR/<name>/: `toy.steps` RL steps from the start policy (resumable);
    returns the run directory once `final/` (the last policy) is written."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from insightv_jax.checkpoint import load_model, save_model_dir
    from insightv_jax.parallel import run_mesh
    from insightv_jax.train.rl.losses import group_advantages
    from insightv_jax.train.rl.program import RLProgram
    from insightv_jax.train.trainer import build_program, global_batch

    run_dir = Path(toy.workdir) / name
    if (run_dir / "final" / "params").exists():
        return run_dir
    rl = toy.run.rl
    mesh = run_mesh(toy.run.mesh)  # a mesh smaller than the host: its first devices
    start_model, model_cfg = load_model(start, mesh)[:2]
    updates = toy.steps * rl.updates_per_batch
    cfg = toy.run
    B = toy.questions * rl.group_size
    mb = B // rl.minibatches
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=mb))
    # the RL run and its control share one program (and its compiled steps)
    key = repr((model_cfg, cfg.train, rl, mesh.shape, [d.id for d in mesh.devices.flat], updates))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = build_program(model_cfg, cfg, mesh, updates,
                                       lambda *a: RLProgram(*a, rl=rl))  # fmt: skip
    program = _PROGRAMS[key]
    manager = _manager(run_dir)
    done = manager.latest_step()
    start_params = nnx.to_pure_dict(nnx.state(start_model, nnx.Param))
    if done is None:
        state = program.init_state(start_params)
        done = 0
        if (run_dir / "log.jsonl").exists():  # a run killed before its first checkpoint
            (run_dir / "log.jsonl").unlink()
    else:
        state = manager.restore(done, args=ocp.args.StandardRestore(program.abstract_state))
        print_fn(f"{name}: resumed from {run_dir / 'checkpoints' / str(done)}")
        _truncate_log(run_dir / "log.jsonl", done)
    # the KL's reference (rl.beta > 0): the step's own old policy (rl.reference=round_start)
    # or the start policy (rl.reference=init)
    ref = None
    if rl.beta > 0 and rl.reference == "init":  # its own buffers: the step donates the state's
        ref = nnx.to_pure_dict(nnx.state(load_model(start, mesh)[0], nnx.Param))
    data, val = splits()["train"], splits()["val"][: toy.val_limit]
    t_start = time.perf_counter()
    for step in range(done, toy.steps):
        t0 = time.perf_counter()
        pairs, resp, rewards, scored, stats = _rollout(
            toy, program.model(state), data, step, shuffle
        )
        t1 = time.perf_counter()
        adv = np.asarray(group_advantages(rewards, rl.group_size,
                                          scale=rl.algorithm != "dr_grpo", eps=rl.adv_eps))  # fmt: skip
        truncated = np.asarray([len(r) and r[-1] != EOS for r in resp])
        if rl.overlong == "filter":
            scored &= ~truncated
        batch = response_batch(prompts_of(pairs), resp, scored)
        params = program.full_params(state)
        batch["old_logps"] = program.token_logps(params, batch)
        if rl.beta > 0:
            batch["ref_logps"] = (batch["old_logps"] if ref is None
                                  else program.token_logps(ref, batch))  # fmt: skip
        batch["advantages"] = adv.astype(np.float32)
        rows = []
        order_rng = np.random.default_rng((toy.seed, 4, step))
        for _ in range(rl.epochs):
            order = order_rng.permutation(B)
            for k in range(rl.minibatches):
                pick = order[k * mb : (k + 1) * mb]
                state, m = program(state, global_batch({k2: v[pick] for k2, v in batch.items()},
                                                       program))  # fmt: skip
                rows.append({k2: float(v) for k2, v in jax.device_get(m).items()})
        t2 = time.perf_counter()
        row = {"step": step + 1, **stats,
               **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
               "first_ratio_mean": rows[0]["ratio_mean"],
               "first_clip_fraction": rows[0]["clip_fraction"],
               "rollout_s": t1 - t0, "update_s": t2 - t1}  # fmt: skip
        if toy.eval_every and (step + 1) % toy.eval_every == 0:
            row["val_greedy"] = float(greedy_correct(program.model(state), val).mean())
        append_jsonl(run_dir / "log.jsonl", row)
        print_fn(f"{name} step {step + 1}/{toy.steps}: reward {stats['reward_mean']:.3f}, "
                 f"entropy {row['entropy']:.3f}"
                 + (f", val greedy {row['val_greedy']:.3f}" if "val_greedy" in row else ""))  # fmt: skip
        if (step + 1) % toy.save_every == 0 or step + 1 == toy.steps:
            manager.save(step + 1, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    manager.close()
    save_model_dir(program.model(state), model_cfg, run_dir / "final", overwrite=True)
    print_fn(f"{name}: {toy.steps} steps in {time.perf_counter() - t_start:.0f} s")
    return run_dir


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log rows of steps ≤ `step` (those after the checkpoint are redone)."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r.strip()]
        keep = [r for r in rows if json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in keep))


# ---------------------------------------------------------------- 3. the report


def report(toy: ToyConfig, names=("rl", "control"), print_fn=print) -> dict:
    """Greedy accuracies of the start and each run's final policy on val and test,
    paired 95% intervals of the differences, pass@G of the start (val); written to
    WORKDIR/report.json."""
    from insightv_jax.checkpoint import load_model
    from insightv_jax.eval.metrics import paired_ci

    root = Path(toy.workdir)
    data = splits()
    held = {s: data[s][: toy.val_limit] for s in ("val", "test")}
    policies = {"start": root / "start", **{n: root / n / "final" for n in names}}
    correct = {}
    for name, path in policies.items():
        if not (path / "params").exists():
            continue
        model = load_model(path)[0]
        correct[name] = {s: greedy_correct(model, p) for s, p in held.items()}
    G = toy.run.rl.group_size
    start_model = load_model(root / "start")[0]
    out = {"accuracy": {n: {s: float(c.mean()) for s, c in v.items()} for n, v in correct.items()},
           "start_sampled_val": pass_at(start_model, held["val"], G, toy.run.rl.temperature,
                                        chunk_size=toy.pass_chunk),
           "differences": {}}  # fmt: skip
    for a, b in (("rl", "start"), ("control", "start"), ("rl", "control")):
        if a in correct and b in correct:
            out["differences"][f"{a}-{b}"] = {
                s: list(paired_ci(correct[a][s], correct[b][s])) for s in held
            }
    (root / "report.json").write_text(json.dumps(out, indent=1) + "\n")
    print_fn(format_report(out))
    return out


def format_report(rep: dict) -> str:
    """The report as a small text table."""
    lines = ["policy     val greedy   test greedy"]
    for n, acc in rep["accuracy"].items():
        lines.append(f"{n:<10} {100 * acc['val']:9.1f}   {100 * acc['test']:10.1f}")
    s = rep["start_sampled_val"]
    lines.append("start, sampled (val): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in s.items()))
    for k, d in rep["differences"].items():
        lines.append(f"{k:<16} " + "   ".join(
            f"{s} {100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]" for s, v in d.items()))  # fmt: skip
    return "\n".join(lines)


def run_toy(toy: ToyConfig, control: bool = True, print_fn=print) -> dict:
    """start → RL → control (unless `control=False`) → report; every stage resumes."""
    start = sft_start(toy, print_fn)
    rl_run(toy, start, "rl", shuffle=False, print_fn=print_fn)
    if control:
        rl_run(toy, start, "control", shuffle=True, print_fn=print_fn)
    return report(toy, ("rl", "control") if control else ("rl",), print_fn)
