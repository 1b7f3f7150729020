"""`insightv dpo` with `data.packing`: a packed run trains on the unpacked run's
pairs, step by step, so its per-step losses and metrics equal the unpacked
ones; a packed run stopped halfway and resumed (reference log-probs on the fly)
continues exactly; the plan keeps each pair whole in one row and follows the
unpacked loader's order."""

import shutil

import pytest
from fast_init import numpy_model

from insightv_jax.checkpoint import save_model_dir
from insightv_jax.data import conversation as conv
from insightv_jax.data.loader import shard_options
from insightv_jax.data.packing import pair_steps
from insightv_jax.errors import DataError
from insightv_jax.jsonl import read_jsonl, write_jsonl
from insightv_jax.train.dpo import train_dpo
from insightv_jax.train.toy_data import toy_run_config

MICRO = ["model.decoder.vocab_size=320", "model.decoder.num_layers=1"]
METRICS = ("loss", "pref_loss", "chosen_ce", "reward_accuracy", "reward_margin",
           "logp_chosen", "logp_rejected", "kl_proxy")  # fmt: skip


def chain(*steps: str) -> str:
    return "<thoughts>\n" + "\n".join(steps) + "\n</thoughts>"


def pair(i: int) -> dict:
    """Two chains that share their first step (pairs of 85-89 tokens, sides ~46)."""
    n = i % 5
    return {
        "id": f"q{i}", "prompt": [{"from": "human", "value": f"how many red squares in grid {i}?"}],
        "chosen": chain("count the red squares", f"there are {n} red squares", f"answer {n}"),
        "rejected": chain("count the red squares", "there are 7 blue circles", "answer 7"),
        "answer": str(n), "chosen_score": 90.0, "rejected_score": 1.0, "round": 1,
    }  # fmt: skip


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A one-layer text decoder with a byte-level BPE tokenizer, and 12 pairs."""
    root = tmp_path_factory.mktemp("dpopack")
    pairs = [pair(i) for i in range(12)]
    corpus = [t for p in pairs for t in (p["prompt"][0]["value"], p["chosen"], p["rejected"])]
    conv.build_tokenizer(corpus, root / "tok", template="minimal", vocab_size=300)
    cfg = toy_run_config(str(root), *MICRO).model
    model = save_model_dir(numpy_model(cfg), cfg, root / "m0", tokenizer_dir=root / "tok")
    write_jsonl(root / "pairs.jsonl", pairs)
    return root, model


def run(micro, workdir, *overrides):
    """A DPO run on the 12 pairs, 4 a step (buckets 64 and 192: unpacked, a step
    is (4, 2, 64); packed, rows of 192 hold two pairs); its lines and metric rows."""
    root, model = micro
    cfg = toy_run_config(
        str(workdir), *MICRO, f"train.init={model}", "train.global_batch=4", "train.steps=0",
        "train.epochs=2", "train.lr=1e-2", "train.schedule=constant", "train.warmup_fraction=0",
        "train.checkpoint_every=3", "train.log_every=1", "train.loss_chunk=64",
        "data.buckets=[64,192]", "data.max_length=192", "dpo.gamma=0.3",
        "dpo.truncate_at_divergence=true", "dpo.logprob_batch=12", "mesh.fsdp=2", "mesh.tensor=4",
        *overrides,
    )  # fmt: skip
    lines = []
    train_dpo(cfg, root / "pairs.jsonl", root, lines.append)
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if "reward_accuracy" in r]
    return lines, rows


def assert_same_steps(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in METRICS:
            if k == "reward_accuracy" and g["step"] == 1:
                continue  # the policy is the reference: margins are 0 up to rounding
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (g["step"], k)


def test_packed_dpo_run_equals_the_unpacked_run_and_resumes(micro, tmp_path):
    _, unpacked = run(micro, tmp_path / "unpacked")
    lines, packed = run(micro, tmp_path / "packed", "data.packing=true")
    assert "packed: 4 pairs a step in 2 rows of 192 tokens, up to 2 pairs a row" in " ".join(lines)
    assert "DPO on 12 pairs: 2 epochs = 6 steps of 4 pairs" in lines
    assert len(packed) == 6 and packed[0]["loss"] != packed[-1]["loss"]  # the policy moved
    # the same pairs each step: the packed step's tokens are the unpacked step's
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in unpacked]
    assert_same_steps(packed, unpacked)
    # the packed run as if killed after step 3 (its checkpoint there holds the loader's
    # state), resumed; reference log-probs on the fly, from the packed batches themselves
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "packed", resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    write_jsonl(resumed / "metrics.jsonl", [r for r in packed if r["step"] <= 3])
    lines, rows = run(micro, resumed, "data.packing=true", "dpo.ref_logps=on_the_fly")
    assert any(x.startswith(f"resumed from {resumed / 'checkpoints' / '3'}") for x in lines)
    assert len(rows) == 6  # steps 4-6 need the loader's state: from step 1 they would differ
    assert_same_steps(rows, packed)


def test_pair_steps_keep_pairs_whole_and_the_unpacked_order():
    """Each step packs the unpacked loader's pairs for that step (grain's seeded
    shuffle, a fresh one per pass), each pair in one row within capacity; rows
    a step are the most any step needs, rounded up; slots the fullest row's."""
    import grain

    lengths = [30, 70, 10, 55, 40, 25, 60, 15, 35]
    plan, rows, slots = pair_steps(lengths, 100, 4, steps=5, seed=3, row_multiple=4)
    order = grain.MapDataset.range(9).seed(3).shuffle().repeat(None)
    for s, step in enumerate(plan):
        want = sorted(int(order[4 * s + k]) for k in range(4))
        assert sorted(i for row in step for i in row) == want
        assert all(sum(lengths[i] for i in row) <= 100 for row in step)
    assert rows % 4 == 0 and rows >= max(map(len, plan)) and rows < 8
    assert slots == max(len(row) for step in plan for row in step) > 1
    with pytest.raises(DataError, match="do not fit"):
        pair_steps([30, 120], 100, 2, steps=1, seed=0)


def test_hosts_read_strided_rows_of_each_packed_step():
    from insightv_jax.data.packing import PackedPairSteps

    plan = [[[0, 1], [2]], [[3]]]
    src = list("abcd")
    hosts = [PackedPairSteps(src, plan, 2, shard_options(i, 2)) for i in range(2)]
    assert [h[0] for h in hosts] == [[["a", "b"]], [["c"]]]
    assert [h[1] for h in hosts] == [[["d"]], [[]]]  # an empty row pads the step
    with pytest.raises(DataError, match="split over 2 hosts"):
        PackedPairSteps(src, plan, 3, shard_options(0, 2))
    assert [len(h) for h in hosts] == [2, 2]


class WordTransform:
    """Counts a side's tokens as its words (the prompt's and the response's)."""

    def length(self, rec):
        return sum(len(t["value"].split()) for t in rec["conversations"])


def test_a_pair_longer_than_a_packed_row_is_a_bad_record(tmp_path):
    """Under packing a pair's two sides together must fit one row: `check_pair`
    plus that (each side alone fits `limits`)."""
    from insightv_jax.data.pairs import FitsPackedRow, PairTransform
    from insightv_jax.data.validate import Limits

    p, limits = pair(0), Limits(max_length=1000)
    n = PairTransform(WordTransform()).packed_length(p)
    assert n == 2 * (7 + 13)  # prompt and chain words, both sides
    assert FitsPackedRow(PairTransform(WordTransform()), n)(p, tmp_path, limits) is None
    short = FitsPackedRow(PairTransform(WordTransform()), n - 1)
    assert short(p, tmp_path, limits) == (
        f"chosen + rejected = {n} tokens, more than a packed row of {n - 1} "
        "(the largest of data.buckets)"
    )
    same = {**p, "rejected": p["chosen"]}  # check_pair's own reasons come first
    assert short(same, tmp_path, limits) == "chosen and rejected are identical"
