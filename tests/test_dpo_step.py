"""DPO step on a toy decoder: the gradient moves log-probs the right way,
precomputed == on-the-fly reference log-probs, sharded == single device."""

import functools
import json

import jax
import numpy as np
from flax import nnx

from insightv_jax.config import MeshConfig
from insightv_jax.models.factory import init_model
from insightv_jax.parallel import make_mesh
from insightv_jax.train.dpo import (
    DPOProgram,
    PairData,
    WithRefLogps,
    chain_token_logps,
    heldout_rewards,
    precompute_ref_logps,
)
from insightv_jax.train.toy_data import toy_run_config
from insightv_jax.train.trainer import build_program, global_batch


class IntTransform:
    """Records whose turns are space-separated token ids (prompt unsupervised)."""

    def __call__(self, rec):
        ids, labels = [], []
        for turn in rec["conversations"]:
            toks = [int(x) for x in turn["value"].split()]
            ids += toks
            labels += toks if turn["from"] == "gpt" else [-100] * len(toks)
        return {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)}


def toy_pairs(n, vocab=64, seed=0):
    """Pair records: a prompt, a chosen continuation (an arithmetic run) and a
    rejected one (random tokens) of different lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(1, vocab, int(rng.integers(2, 5)))
        start, stride = rng.integers(1, vocab, 2)
        chosen = (start + stride * np.arange(int(rng.integers(4, 9)))) % (vocab - 1) + 1
        rejected = rng.integers(1, vocab, int(rng.integers(4, 9)))
        out.append({
            "id": f"p{i}", "prompt": [{"from": "human", "value": " ".join(map(str, prompt))}],
            "chosen": " ".join(map(str, chosen)), "rejected": " ".join(map(str, rejected)),
            "answer": "", "chosen_score": 90.0, "rejected_score": 1.0, "round": 0,
        })  # fmt: skip
    return out


def setup(tmp_path, mesh, *overrides, seed=0):
    cfg = toy_run_config(
        str(tmp_path), "train.schedule=constant", "train.warmup_fraction=0", *overrides
    )
    program = build_program(
        cfg.model, cfg, mesh, 100, program_cls=functools.partial(DPOProgram, dpo=cfg.dpo)
    )
    params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, mesh, seed), nnx.Param))
    return cfg, program, params


DATA = PairData(IntTransform(), (16,), 0, root=None)


def test_gradient_raises_chosen_lowers_rejected(tmp_path, eight_devices):
    mesh = make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    _, program, params = setup(tmp_path, mesh, "dpo.gamma=0.0", "train.lr=1e-3")
    records = precompute_ref_logps(program, params, toy_pairs(8), DATA, 8)
    (_, batch), = DATA.batches(records, 8)  # fmt: skip
    before = program.logprobs(params, batch)["sum"]
    ref = jax.tree.map(lambda x: x.copy(), params)  # init_state donates params
    state = program.init_state(params)
    state, m = program(state, global_batch(batch, program))
    assert abs(float(m["pref_loss"]) - np.log(2)) < 1e-5  # policy == reference at step 0
    after = program.logprobs(program.full_params(state), batch)["sum"]
    assert np.all(after[:, 0] > before[:, 0]) and np.all(after[:, 1] < before[:, 1])
    # held-out reward accuracy: ties at the start (policy == reference) count as wrong,
    # after the step every pair's implicit reward margin is positive
    pairs = toy_pairs(8)
    assert heldout_rewards(program, ref, ref, pairs, DATA, 8, 0.1)["reward_accuracy"] == 0
    held = heldout_rewards(program, program.full_params(state), ref, pairs, DATA, 8, 0.1)
    assert held["pairs"] == 8 and held["reward_accuracy"] == 1.0 and held["mean_margin"] > 0


def test_precomputed_equals_on_the_fly(tmp_path, eight_devices):
    mesh = make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    _, program, params = setup(tmp_path, mesh, "train.lr=1e-3")
    ref = nnx.to_pure_dict(nnx.state(init_model(program_model(tmp_path), mesh, 7), nnx.Param))
    records = toy_pairs(24, seed=3)
    pre = precompute_ref_logps(program, ref, records, DATA, 8)
    pre = [json.loads(json.dumps(r)) for r in pre]  # through the pair file's JSON
    a = [b for _, b in DATA.batches(pre, 8)]
    b = list(WithRefLogps(iter([x for _, x in DATA.batches(records, 8)]), program, ref))
    losses = {}
    for name, batches in (("pre", a), ("fly", b)):
        state = program.init_state(jax.tree.map(lambda x: x.copy(), params))
        out = []
        for batch in batches:
            state, m = program(state, global_batch(batch, program))
            out.append(float(m["loss"]))
        losses[name] = np.array(out)
    assert losses["pre"][0] > 0.8  # a different reference: not the ln 2 of policy == ref
    np.testing.assert_allclose(losses["pre"], losses["fly"], atol=1e-5)


def program_model(tmp_path):
    return toy_run_config(str(tmp_path)).model


def test_sharded_equals_single_device(tmp_path, eight_devices):
    records = toy_pairs(80, seed=5)
    results = {}
    for name, mesh, mb in (
        ("single", make_mesh(MeshConfig(1, 1, 1), eight_devices[:1]), 1),
        ("sharded", make_mesh(MeshConfig(2, 2, 2)), 2),
    ):
        _, program, params = setup(tmp_path, mesh, f"train.micro_batches={mb}", "train.lr=3e-3")
        pre = precompute_ref_logps(program, params, records, DATA, 8)
        state = program.init_state(params)
        rows = []
        for _, batch in DATA.batches(pre, 8):
            state, m = program(state, global_batch(batch, program))
            rows.append([float(m[k]) for k in ("loss", "reward_accuracy", "logp_chosen")])
        results[name] = np.array(rows)
    assert len(results["single"]) == 10
    s, m = results["single"], results["sharded"]
    np.testing.assert_allclose(m[:, [0, 2]], s[:, [0, 2]], rtol=1e-4)
    # step 0 has policy == reference: every reward is ~0 and its sign is rounding noise
    np.testing.assert_allclose(m[1:, 1], s[1:, 1])
    assert results["single"][-1, 0] < results["single"][0, 0]  # it learns


def test_token_logprobs_and_sequence_batches(tmp_path, eight_devices):
    """The per-token pass sums to the sequence pass; single sequences packed two a
    row (`PairData.sequence_batches`, the KL probe's chains) score like pair sides."""
    mesh = make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    _, program, params = setup(tmp_path, mesh)
    records = toy_pairs(6, seed=2)
    (_, batch), = DATA.batches(records, 8)  # fmt: skip
    sums = program.logprobs(params, batch)["sum"]
    tok = program.token_logprobs(params, batch)
    np.testing.assert_allclose((tok["logp"] * tok["scored"]).sum(-1), sums, rtol=1e-5)
    assert np.array_equal(tok["scored"].sum(-1), program.logprobs(params, batch)["tokens"])
    convs = [{"id": f"{r['id']}-{s}", "conversations": [*r["prompt"], {"from": "gpt", "value": r[s]}]}
             for r in records for s in ("chosen", "rejected")][:11]  # fmt: skip
    per_chain = chain_token_logps(program, params, convs, DATA, 4)  # batches of 8 chains, odd last
    assert len(per_chain) == 11
    np.testing.assert_allclose([c.sum() for c in per_chain], sums[:6].reshape(-1)[:11], rtol=1e-5)
