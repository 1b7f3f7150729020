"""One on-policy update of the reasoning agent on a round's judged samples (the GRPO
family, `rl.algorithm`): what `insightv rl` does where `insightv iterate` runs DPO.

The round's samples (`train/rollouts.py`: G chains per question from the current
policy, the summary agent's answer from each, the judge's verdict) become
  records     one conversation per chain, worded as SFT words the reasoning agent
              (the reasoning prompt, the chain inside <thoughts>) — the tokens the
              policy is trained on, so the log-probs below are of exactly them
  rewards     1 when the judge accepts the summary agent's answer from the chain,
              else 0; + `rl.format_weight` when the chain has at least two steps;
              + `rl.score_weight` × the scorer's path score / 100 on right chains;
              with `rl.overlong=soft`, + DAPO's length penalty (`overlong_penalty`);
              with `rl.overlong=filter`, chains cut off at `rl.max_response_tokens`
              leave the update
  advantages  per question (`group_advantages`); with `rl.dynamic_sampling` a group
              whose rewards are all equal (no signal) is dropped, and the round's
              later draws (`draw` > 0 on a sample: fresh questions the round drew to
              refill the batch, train/iterate.py) fill it back up to as many groups
              as its first draw had; groups with signal beyond that are surplus
then the old policy's per-token log-probs are recomputed by the training forward
(`RLProgram.token_logps`, logits / `rl.temperature`), and the policy takes
μ = `rl.epochs` × `rl.minibatches` updates. The result is a model directory at
`RD/policy/` (`update.json`, written last, marks it finished) and the trained model
itself, on the update's mesh, for the next round's sampler; an interrupted update
reruns from the round's start policy with the same records, so its result is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from insightv_jax.config import RunConfig
from insightv_jax.train.rl.losses import group_advantages, overlong_penalty
from insightv_jax.train.rollouts import chain_conversations


def chain_steps(chain: str) -> int:
    """The number of non-empty lines (steps) of a chain."""
    return sum(1 for line in str(chain).splitlines() if line.strip())


def rewards_of(samples: list[dict], rl) -> np.ndarray:
    """Each sample's reward (see the module docstring); with `rl.overlong=soft`, plus
    DAPO's length penalty on the chain's token count."""
    out = []
    for s in samples:
        r = 1.0 if s["correct"] else 0.0
        r += rl.format_weight * (chain_steps(s["chain"]) >= 2)
        if s["correct"] and s.get("score") is not None:
            r += rl.score_weight * float(s["score"]) / 100.0
        out.append(r)
    out = np.asarray(out, np.float32)
    if rl.overlong == "soft":
        lengths = np.asarray([s.get("tokens") or 0 for s in samples])
        out += np.asarray(overlong_penalty(lengths, rl.max_response_tokens, rl.overlong_buffer))
    return out


def truncated(samples: list[dict], rl) -> np.ndarray:
    """Which samples ran into `rl.max_response_tokens` (cut off, not finished)."""
    return np.asarray([(s.get("tokens") or 0) >= rl.max_response_tokens for s in samples])


def update_seed(cfg: RunConfig, t: int) -> int:
    """The seed of round t's update (the control's reward permutations)."""
    return cfg.seed * 1_000_003 + t


def round_rewards(samples: list[dict], rl, seed: int, agent: str = "reason"):
    """(each sample's reward, the rewards the advantages use). The reward is
    `rewards_of` for the reasoning agent, the judge's verdict (1/0) for the summary
    agent; the two are the same array except in the control (`rl.shuffle_rewards`),
    which permutes each draw's rewards among that draw's samples, seeded by `seed`
    and the draw (a sample's `draw`, 0 when absent), so a draw's rewards stay as they
    were when later draws join the round."""
    if agent == "summary":
        true = np.asarray([float(s["correct"]) for s in samples], np.float32)
    else:
        true = rewards_of(samples, rl)
    if not rl.shuffle_rewards:
        return true, true
    used = true.copy()
    draws = np.asarray([s.get("draw", 0) for s in samples])
    for k in np.unique(draws):
        rows = np.flatnonzero(draws == k)
        rng = np.random.default_rng(seed if k == 0 else (seed, int(k)))
        used[rows] = rng.permutation(true[rows])
    return true, used


def has_signal(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Per group of `group_size` contiguous rewards: whether they are not all equal
    (a group with equal rewards has advantage 0 everywhere: no signal)."""
    groups = np.asarray(rewards).reshape(-1, group_size)
    return ~np.all(groups == groups[:, :1], axis=1)


def rl_records(items, samples, prompts, rl, seed: int = 0, agent: str = "reason"):
    """(the update's records (conversation + `advantages`), the round's reward stats).
    `agent` "reason": the samples are chains (`chain_conversations`, `rewards_of`);
    "summary": answers from given chains (train/rl/summary.py; reward = the verdict).
    `rl.shuffle_rewards` (the control) permutes the rewards first (`round_rewards`).
    With `rl.dynamic_sampling`, groups without signal are dropped and the groups with
    signal, in draw order, fill at most as many groups as the round's first draw
    (`draw` 0) has; the stats count the draws and the groups dropped and left over."""
    from insightv_jax.train.rl.summary import answer_conversations

    G = rl.group_size
    if len(samples) % G:
        raise ValueError(f"{len(samples)} samples do not split into groups of {G}")
    if agent == "summary":
        convs = answer_conversations(items, samples, prompts)
    else:
        convs = chain_conversations(items, samples, prompts)
    true, rewards = round_rewards(samples, rl, seed, agent)
    adv = np.asarray(group_advantages(rewards, G, scale=rl.algorithm != "dr_grpo", eps=rl.adv_eps))
    signal = has_signal(rewards, G)
    draws = np.asarray([s.get("draw", 0) for s in samples[::G]])
    used = np.ones(len(signal), bool)
    if rl.dynamic_sampling:  # DAPO: the batch is the first draw's size, of groups with signal
        used = signal & (np.cumsum(signal) <= int((draws == 0).sum()))
    keep = np.repeat(used, G)
    if rl.overlong == "filter":  # a cut-off chain leaves the loss (its group keeps the rest)
        keep &= ~truncated(samples, rl)
    records = [
        {**c, "advantages": np.float32(a), "sampler_logprob": float(s.get("logprob") or 0.0)}
        for c, a, s, k in zip(convs, adv, samples, keep)
        if k
    ]
    stats = {
        "reward_mean": float(true.mean()),  # the true rewards of every draw (control too)
        "reward_std": float(true.std()),
        "draws": int(draws.max()) + 1,
        "groups": len(signal),
        "groups_without_signal": int((~signal).sum()),
        "groups_dropped": int((~signal).sum()) if rl.dynamic_sampling else 0,
        "groups_surplus": int((signal & ~used).sum()),
        "response_length_tokens": float(np.mean([s.get("tokens") or 0 for s in samples])),
    }
    if agent == "reason":  # a reward won by chains that only state an answer shows here
        stats["multi_step_share"] = float(np.mean([chain_steps(s["chain"]) >= 2 for s in samples]))
    return records, stats


def _examples(records, data) -> tuple[list[dict], list[dict]]:
    """(the records that fit the largest bucket, their tokenised examples); a chain too
    long for `data.buckets` leaves the update (counted), it never fails the round."""
    kept, examples = [], []
    for r in records:
        e = data.transform(r)
        if len(e["input_ids"]) <= max(data.buckets):
            kept.append(r)
            examples.append({**e, "advantages": r["advantages"]})
    return kept, examples


def _batches(examples, data, size: int):
    """Fixed-size batches, all at the longest example's bucket (one compiled step);
    the last is padded with copies whose advantage is 0."""
    from insightv_jax.data.loader import Collate

    collate = Collate(
        data.buckets, data.pad_id, images=getattr(data.transform, "batch_images", None)
    )
    longest = max(len(e["input_ids"]) for e in examples)
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        pad = [{**chunk[-1], "advantages": np.float32(0.0)}] * (size - len(chunk))
        yield collate(chunk + pad, min_length=longest)


def rl_update(cfg: RunConfig, rd: Path, policy: str, items, samples, root: Path, print_fn,
              agent: str = "reason"):  # fmt: skip
    """The update of `policy` (the `agent`, "reason" or "summary") on the round's
    samples; returns (policy out, metrics, the trained model). The model is the
    update's own, on its mesh (`cfg.mesh`), so the next round's sampler can read
    its weights without a trip through disk; None when there was no update or it
    had finished before (its result is then read from `RD/policy/`)."""
    import jax

    from insightv_jax.checkpoint import aux_dirs, save_model_dir
    from insightv_jax.data.prompts import write_prompts
    from insightv_jax.parallel import run_mesh
    from insightv_jax.train import model_config_for_run
    from insightv_jax.train.dpo.data import PairData, full_params_of
    from insightv_jax.train.rl.program import RLProgram
    from insightv_jax.train.trainer import build_program

    rl = cfg.rl
    out, done = rd / "policy", rd / "update.json"
    if done.exists():  # written after the policy: a finished update
        return str(out), json.loads(done.read_text()), None
    seed = update_seed(cfg, int(rd.name.rsplit("_", 1)[-1]))  # the round's number
    if agent == "summary":  # answers: their temperature; Dr. GRPO's constant is their limit
        rl = dataclasses.replace(rl, max_response_tokens=cfg.dpo.summary_max_tokens,
                                 temperature=rl.answer_temperature)  # fmt: skip
        cfg = dataclasses.replace(cfg, rl=rl)
    records, stats = rl_records(items, samples, cfg.pipeline.prompts, rl, seed, agent)
    if not records:
        print_fn(f"{rd.name}: no group with a reward signal; no update this round")
        return policy, stats, None
    tok, proc = aux_dirs(policy)
    model_cfg = model_config_for_run(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, init=policy)), print_fn)  # fmt: skip
    data = PairData.for_checkpoint(cfg, model_cfg, tok, root)
    n = len(records)
    records, examples = _examples(records, data)
    stats["too_long"] = n - len(records)
    if not records:
        print_fn(f"{rd.name}: every chain is longer than data.buckets; no update this round")
        return policy, stats, None
    mb = -(-len(records) // rl.minibatches)
    total = rl.epochs * rl.minibatches
    train = dataclasses.replace(cfg.train, global_batch=mb, steps=total)
    run_cfg = dataclasses.replace(cfg, model=model_cfg, train=train)
    mesh = run_mesh(cfg.mesh)
    program = build_program(model_cfg, run_cfg, mesh, total,
                            functools.partial(RLProgram, rl=rl))  # fmt: skip
    params = full_params_of(policy, mesh)
    batches = list(_batches(examples, data, mb))
    size = rl.logprob_batch
    for b in batches:  # the old policy's per-token log-probs, from the training forward
        b["old_logps"] = np.concatenate([
            program.token_logps(params, {k: v[i : i + size] for k, v in b.items()})
            for i in range(0, mb, size)])  # fmt: skip
    if rl.beta > 0:  # the KL's reference: the round's start policy (= old) or train.init
        start = cfg.train.init if agent == "reason" else (cfg.dpo.summary or cfg.train.init)
        ref = params if rl.reference == "round_start" else full_params_of(start, mesh)
        for b in batches:
            b["ref_logps"] = b["old_logps"] if ref is params else np.concatenate([
                program.token_logps(ref, {k: v[i : i + size] for k, v in b.items()})
                for i in range(0, mb, size)])  # fmt: skip
    # how far the sampler's own log-probs (raw logits of the decode path, on the tokens
    # it drew) are from the trainer's on the re-tokenised chain, per token
    trainer = np.concatenate([b["old_logps"].sum(axis=1) for b in batches])[: len(records)]
    tokens = np.concatenate([(b["old_logps"] != 0).sum(axis=1) for b in batches])[: len(records)]
    sampler = np.asarray([r["sampler_logprob"] for r in records])
    stats["sampler_logp_gap"] = float(np.mean(np.abs(trainer - sampler) / np.maximum(tokens, 1)))
    what = "chains" if agent == "reason" else "summary answers"
    print_fn(f"{rd.name}: {rl.algorithm} on {len(records)} {what}: {total} updates of {mb}")
    state = program.init_state(params)
    rows = []
    for _ in range(rl.epochs):
        for b in batches:
            state, metrics = program(state, b)
            rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    model = program.model(state)
    # overwrite: a policy written by an update killed before update.json is redone
    save_model_dir(model, model_cfg, out, tokenizer_dir=tok, processor_dir=proc, overwrite=True)
    write_prompts(out, cfg.pipeline.prompts)  # the wording it was trained and sampled with
    metrics = {**stats, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
               "first_ratio_mean": rows[0].get("ratio_mean"),
               "first_clip_fraction": rows[0].get("clip_fraction"), "step": len(rows),
               "total": total}  # fmt: skip
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    tmp.replace(done)
    return str(out), metrics, model
