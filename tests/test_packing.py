"""Sequence packing: text records keep apart in a packed row; packed rows give
the unpacked loss and gradients (Qwen2.5-VL with images, M-RoPE and text
records); the packer's plan, determinism and exact resume; the
packing-efficiency figure; configs that cannot pack. Packed preference pairs
(a text decoder's DPO run): tests/test_dpo_packing.py."""

import json

import jax
import numpy as np
import pytest
from fast_init import numpy_params

from insightv_jax.config import (
    MeshConfig,
    ModelConfig,
    RunConfig,
    load_config,
)
from insightv_jax.config.base import ConfigError
from insightv_jax.data.loader import Collate, Loader, shard_options
from insightv_jax.data.packing import (
    PackCollate,
    first_fit,
    long_tailed_lengths,
    packing_efficiency,
)
from insightv_jax.models.qwen_vl import BatchImages
from insightv_jax.parallel import make_mesh
from insightv_jax.train.losses import IGNORE
from insightv_jax.train.steps import SFTProgram
from insightv_jax.train.trainer import build_program, global_batch

VOCAB = 97  # the text records' token ids


def _text_example(rng, n: int, vocab: int) -> dict:
    """n tokens; labels on a random suffix (the 'answer'), IGNORE before it."""
    ids = rng.integers(10, vocab, n).astype(np.int32)
    labels = np.where(np.arange(n) >= rng.integers(1, n), ids, IGNORE).astype(np.int32)
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model_cfg: ModelConfig, batch: dict):
    """The SFT step's loss (`SFTProgram`: summed token cross-entropy of the
    shifted labels over the batch's label-token count), that count and the
    gradients, one device, for a random model (NumPy-drawn: no init compiles)."""
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    program = build_program(model_cfg, RunConfig(model=model_cfg), mesh, 1, SFTProgram)
    params = numpy_params(model_cfg, seed=1)
    with jax.set_mesh(mesh):
        state = program.init_state(params)
        batch = global_batch(batch, program)
        grads, metrics = program.grads_fn(batch)(state, batch)
    return float(metrics["loss"]), int(metrics["tokens"]), grads


def _assert_same(packed, unpacked):
    (lp, cp, gp), (lu, cu, gu) = packed, unpacked
    assert cp == cu  # the same label tokens: the normalisation is the same
    assert abs(lp - lu) <= 1e-5
    worst = max(
        jax.tree.leaves(
            jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), gp, gu)
        )
    )
    assert worst <= 1e-5


def test_packed_text_rows_keep_records_apart():
    """Nine records packed into three rows of 64 (first-fit): each record's
    tokens in order, its first label blank (no target crosses a record
    boundary), its positions from 0, padding as segment 0. The packed loss and
    gradients equal the unpacked ones: the Qwen2.5-VL test below (text records
    among its rows) and tests/test_dpo_packing.py (a text decoder's packed DPO
    run, step by step)."""
    rng = np.random.default_rng(0)
    examples = [_text_example(rng, int(n), VOCAB) for n in rng.integers(6, 30, 9)]
    rows = first_fit([len(e["input_ids"]) for e in examples], range(9), 64, window=4)
    assert len(rows) < 9
    packed = PackCollate(None, 64).collate([[examples[i] for i in row] for row in rows])
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, 1):
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            n = len(ids)
            np.testing.assert_array_equal(packed["input_ids"][r, at : at + n], ids)
            np.testing.assert_array_equal(packed["segment_ids"][r, at : at + n], k)
            np.testing.assert_array_equal(packed["positions"][r, at : at + n], np.arange(n))
            want = np.concatenate([[IGNORE], labels[1:]])  # the record's own labels
            np.testing.assert_array_equal(packed["labels"][r, at : at + n], want)
            at += n
        assert (packed["segment_ids"][r, at:] == 0).all()


def test_packed_qwen_vl_rows_with_images_give_the_unpacked_loss_and_gradients():
    """The micro Qwen2.5-VL: records with an image (M-RoPE ids per record, its
    image laid out in its row) and text records, packed two rows of 128 vs one
    per row: same loss and gradients to 1e-5 in fp32."""
    # one decoder layer: every layer takes the same M-RoPE ids and segments
    cfg = load_config("configs/models/tiny-qwen2_5_vl.yaml", ["model.decoder.num_layers=1"]).model
    tok, vcfg = cfg.qwen_vl, cfg.qwen_vision
    rng = np.random.default_rng(2)

    def with_image(n_text: int) -> dict:
        e = _text_example(rng, n_text, 500)
        span = [tok.vision_start_token_id] + [tok.image_token_id] * 16 + [tok.vision_end_token_id]
        ids = np.concatenate([[5, 6], span, e["input_ids"]]).astype(np.int32)
        labels = np.concatenate([[IGNORE] * (len(span) + 2), e["labels"]]).astype(np.int32)
        grid = np.asarray([[1, 8, 8]], np.int64)  # 64 patches, 16 merged tokens
        pixels = rng.normal(size=(64, vcfg.patch_dim)).astype(np.float32)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_grid_thw": grid}

    examples = [with_image(12), _text_example(rng, 20, 500), with_image(30),
                with_image(7), _text_example(rng, 9, 500)]  # fmt: skip
    images = BatchImages(cfg)
    rows = first_fit([len(e["input_ids"]) for e in examples], range(5), 128, window=2)
    assert len(rows) == 2
    packed = PackCollate(None, 128, images=images).collate([[examples[i] for i in r] for r in rows])
    unpacked = Collate((64, 128), images=images)(examples)
    assert packed["positions"].shape == (2, 3, 128)
    # each record's M-RoPE ids are its own (as unpacked), shifted to its place in the row
    for row, records in zip(packed["positions"], rows):
        at = 0
        for i in records:
            n = len(examples[i]["input_ids"])
            np.testing.assert_array_equal(row[:, at : at + n], images.record_positions(examples[i]))
            at += n
    _assert_same(_loss_and_grads(cfg, packed), _loss_and_grads(cfg, unpacked))


def test_first_fit_places_every_record_once_within_capacity_and_window():
    lengths = long_tailed_lengths(300, 4096, seed=1)
    rows = first_fit(lengths, range(300), 4096, window=4)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 4096 for r in rows)
    assert rows == first_fit(lengths, range(300), 4096, window=4)  # deterministic
    # a record goes to an earlier row only while that row is one of the last 4 open
    assert first_fit([5, 5, 3, 2], range(4), 8, window=1) == [[0], [1, 2], [3]]
    assert first_fit([5, 5, 3, 2], range(4), 8, window=2) == [[0, 2], [1, 3]]


class _Words:
    """Record -> {input_ids, labels}: its ids, labels on the second half;
    `length` exact (what the loader plans packing with)."""

    def __call__(self, rec):
        ids = np.asarray(rec["ids"], np.int32)
        labels = np.where(np.arange(len(ids)) >= len(ids) // 2, ids, IGNORE).astype(np.int32)
        return {"input_ids": ids, "labels": labels}

    def length(self, rec) -> int:
        return len(rec["ids"])


def _source(n: int = 60):
    rng = np.random.default_rng(4)
    return [{"id": f"r-{i}", "ids": rng.integers(1, 50, rng.integers(3, 40)).tolist()}
            for i in range(n)]  # fmt: skip


def _loader(**kw):
    kw = {"batch_size": 2, **kw}
    return Loader(_source(), _Words(), buckets=(32, 64), seed=5, packing=True,
                  packing_window=3, check=lambda rec, root, limits: None, **kw)  # fmt: skip


def test_packed_loader_is_deterministic_and_resumes_exactly():
    """Packed batches (2 rows of 64): every record at most once per epoch, in
    rows within 64 tokens; a second loader with the same seed gives the same
    batches, and one resumed from a (JSON) state the rest exactly."""
    first = _loader(num_epochs=1)
    batches = list(first)
    assert batches and all(b["input_ids"].shape == (2, 64) for b in batches)
    ids = [tuple(b["input_ids"][r, b["segment_ids"][r] == s])
           for b in batches for r in range(2) for s in range(1, b["segment_ids"][r].max() + 1)]  # fmt: skip
    records = {tuple(r["ids"]) for r in _source()}
    assert set(ids) <= records and len(ids) == len(set(ids)) > 2 * len(batches)
    again = list(_loader(num_epochs=1))
    assert all(all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(batches, again))
    it = _loader(num_epochs=2)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(4)]
    resumed = _loader(num_epochs=2)
    resumed.set_state(state)
    assert np.array_equal(head[0]["input_ids"], batches[0]["input_ids"])
    for want in rest:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_hosts_read_disjoint_rows_of_the_same_packed_global_batches():
    """Two hosts of 2 rows each read, step by step, the rows of the one-host
    loader's 4-row global batch (strided), all padded alike to 64."""
    whole = list(_loader(num_epochs=1, batch_size=4))
    hosts = [list(_loader(num_epochs=1, shard=shard_options(i, 2))) for i in range(2)]
    assert len(whole) == len(hosts[0]) == len(hosts[1]) > 0
    for w, h0, h1 in zip(whole, *hosts):
        np.testing.assert_array_equal(w["input_ids"][0::2], h0["input_ids"])
        np.testing.assert_array_equal(w["segment_ids"][1::2], h1["segment_ids"])


def test_packing_raises_the_token_fraction_of_a_long_tailed_set():
    lengths = long_tailed_lengths(2000, 12288, seed=0)
    assert lengths.max() <= 12288 and np.median(lengths) < 2000
    fig = packing_efficiency(lengths, (1024, 2048, 4096, 8192, 12288), batch_size=8)
    assert fig["packed_fraction"] > 0.9 > fig["unpacked_fraction"]
    assert fig["packed_rows"] * fig["row_length"] >= fig["tokens"]


def test_configs_that_cannot_pack_are_refused():
    with pytest.raises(ConfigError, match="data.packing"):
        load_config("configs/models/tiny.yaml", ["data.packing=true"]).validate()
    with pytest.raises(ConfigError, match="pick one"):
        load_config(None, ["data.packing=true", "data.group_by_length=4"]).validate()
