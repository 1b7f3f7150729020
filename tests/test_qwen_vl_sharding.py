"""Qwen2.5-VL on 8 fake devices: the micro model (configs/models/tiny-qwen2_5_vl.yaml)
sharded over data, fsdp and tensor gives the single-device logits and SFT loss for
a batch of rows with images of different sizes laid out by `batch_arrays`; and
the `__call__` forward compiles once per (batch, tokens, patch bucket), whatever
the images' grids inside the bucket."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from insightv_jax.config import MeshConfig, load_config
from insightv_jax.models import qwen_vl
from insightv_jax.models.factory import construct
from insightv_jax.parallel import make_mesh, state_shardings
from insightv_jax.train.losses import IGNORE
from insightv_jax.train.plan import compile_step, qwen_patch_budget, step_report
from insightv_jax.train.steps import batch_sharding

CONFIG = "configs/models/tiny-qwen2_5_vl.yaml"
START, IMAGE, END = 7, 8, 9  # the micro model's vision_start, image_pad, vision_end
PATCH_DIM = 3 * 2 * 5 * 5  # channels x temporal patch x 5x5-px patches


def _inputs(rows: list[list[tuple[int, int, int]]], T: int, seed: int = 0) -> dict:
    """Processor-style inputs: each row some text, then per image of grid
    (t, h, w) patches `vision_start`, h*w/4 placeholders, `vision_end`, more
    text; rows left-padded to T; the images' patches packed in row order."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for b, grids in enumerate(rows):
        row = rng.randint(11, 500, 3).tolist()
        for g in grids:
            row += (
                [START]
                + [IMAGE] * (int(np.prod(g)) // 4)
                + [END]
                + rng.randint(11, 500, 2).tolist()
            )
        ids[b, T - len(row) :], mask[b, T - len(row) :] = row, 1
    grids = [g for r in rows for g in r]
    n = sum(int(np.prod(g)) for g in grids)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=rng.randn(n, PATCH_DIM).astype(np.float32),
        image_grid_thw=np.array(grids, np.int64),
    )


# Eight rows (one per device on 8-way batch meshes): a large image, two small
# ones, none, tall and wide ones -- unequal images per row, windows cut at the edges.
ROWS = [
    [(1, 8, 8)], [(1, 4, 4), (1, 4, 8)], [], [(1, 8, 4)],
    [(1, 4, 4)], [(1, 6, 8)], [(1, 4, 4), (1, 4, 4)], [(1, 8, 6)],
]  # fmt: skip


def _train_batch(cfg, inputs: dict, num_slots: int | None = None) -> dict:
    """The SFT batch of `inputs`: token rows, labels, `batch_arrays`' keys
    (`num_slots` patches per row; default: the rows' bucket)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = np.where((mask > 0) & (ids != IMAGE), ids, IGNORE).astype(np.int32)
    arrays = qwen_vl.batch_arrays(
        cfg, ids, mask, inputs["pixel_values"], inputs["image_grid_thw"], num_slots=num_slots
    )
    return dict(input_ids=ids, attention_mask=mask, labels=labels, **arrays)


def _shard(batch: dict, mesh) -> dict:
    return {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in batch.items()}


def _placed(model, mesh):
    """(graphdef, the model's state split over `mesh` by its logical axes):
    the same parameters, as a checkpoint restored onto the mesh has them.
    Copied through the host: the step donates its state, and a device_put
    from device 0 may share that device's buffers with the original."""
    graphdef, state = nnx.split(model)
    host = jax.tree.map(np.asarray, state)
    return graphdef, jax.device_put(host, state_shardings(state, mesh))


def _mean_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """The SFT loss by hand: mean next-token cross-entropy over supervised labels."""
    targets = np.concatenate([labels[:, 1:], np.full_like(labels[:, :1], IGNORE)], axis=1)
    keep = targets != IGNORE
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return float(-(picked * keep).sum() / keep.sum())


def _random_model(cfg):
    """The micro model with host-drawn random parameters (weights ~ N(0, 0.1),
    norm scales ~ 1 + N(0, 0.1)): no init program to compile."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: construct(cfg)))
    rng = np.random.RandomState(0)

    def draw(path, a):
        base = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.1 * rng.randn(*a.shape), a.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.fixture(scope="module")
def reference():
    """The run config, the single-device model, the processor-style inputs,
    their SFT batch and their logits from the model's `__call__`."""
    cfg = load_config(CONFIG)
    model = _random_model(cfg.model)
    inputs = _inputs(ROWS, T=32)
    logits = np.asarray(model(**inputs))
    return SimpleNamespace(
        cfg=cfg, model=model, inputs=inputs, batch=_train_batch(cfg.model, inputs), logits=logits
    )


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_forward_equals_single_device(shape, reference, eight_devices):
    """The training path (`batch_arrays` -> `batch_inputs`), sharded."""
    batch, want = reference.batch, reference.logits
    mesh = make_mesh(MeshConfig(*shape))
    graphdef, state = _placed(reference.model, mesh)
    # really split: the tower's q projection (blocks, D, N, H) over fsdp (D) and tensor (N)
    q = state["vision"]["blocks"]["attn"]["q_proj"][...]
    assert q.sharding.shard_shape(q.shape) == (2, 64 // shape[1], 4 // shape[2], 16)

    @jax.jit
    def logits(state, batch):
        m = nnx.merge(graphdef, state)
        hidden = m.hidden_states(
            batch["input_ids"], batch["attention_mask"], **m.batch_inputs(batch)
        )
        return m.logits(hidden)

    with jax.set_mesh(mesh):
        sharded = _shard(batch, mesh)
        pixels = sharded["pixel_values"]  # each device holds its rows' images
        assert pixels.sharding.shard_shape(pixels.shape)[0] == 8 // (shape[0] * shape[1])
        got = np.asarray(logits(state, sharded))
    real = batch["attention_mask"].astype(bool)  # padded queries are undefined
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_planned_sft_step_runs_sharded(reference, eight_devices):
    """`insightv plan`'s step for the micro model on (data 2, fsdp 2, tensor 2)
    in two micro-batches: the report counts the tower frozen and its memory,
    and the compiled step, run on the reference rows laid out at the planned
    patch budget (128 patches a row, where their own bucket is 64), gives the
    single-device logits' mean cross-entropy as its loss."""
    run = load_config(
        CONFIG,
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.global_batch=8",
         "train.micro_batches=2", "train.seq_len=32", "data.max_length=32", "data.buckets=[32]"],
    )  # fmt: skip
    program, abstract, compiled, seconds = compile_step(run)
    report = step_report(run, program, abstract, compiled, seconds)
    assert report["vision_patches"] == qwen_patch_budget(run.model, 32) == 128
    # train.trainable [projector, llm]: the decoder and the 2x2 merger (Qwen-VL's projector)
    # train, the rest of the tower not
    merger = 64 + 256 * 256 + 256 + 256 * 128 + 128
    assert (report["trainable_params"], report["frozen_params"]) == (
        460_160 + merger,
        191_680 - merger,
    )
    xla, hand = report["xla_per_device"], report["hand_per_device"]
    assert xla["arguments"] >= hand["params"] + hand["optimizer"] > 0 and hand["vision_block"] > 0

    batch = _train_batch(run.model, reference.inputs, num_slots=128)
    _, state = _placed(reference.model, program.mesh)
    new_state, metrics = compiled(
        program.init_state(nnx.to_pure_dict(state)), _shard(batch, program.mesh)
    )
    want = _mean_ce(reference.logits, batch["labels"])
    assert np.isfinite(want) and want > 1.0
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    assert int(new_state["step"]) == 1 and bool(metrics["finite"])


def test_forward_compiles_once_per_patch_bucket(reference, monkeypatch):
    """Three batches of two rows, 48 tokens, with different image grids (one
    or two images a row, 16 to 64 patches a row: all in the 64-patch bucket)
    trace and compile the forward once; a 128-patch image, once more. (No
    other test runs the micro model on 2 rows of 48 tokens, so nothing of
    these shapes is cached before.)"""
    cfg, model = reference.cfg.model, reference.model
    traces, compiles = [], []
    hidden_states = qwen_vl.QwenVL.hidden_states

    def traced(self, *args, **kwargs):  # Python runs only while jit traces
        traces.append(1)
        return hidden_states(self, *args, **kwargs)

    def compiled(event, seconds, fun_name="", **_):  # XLA compiles (or cache loads)
        if event == "/jax/core/compile/backend_compile_duration" and "forward_logits" in fun_name:
            compiles.append(fun_name)

    monkeypatch.setattr(qwen_vl.QwenVL, "hidden_states", traced)
    jax.monitoring.register_event_duration_secs_listener(compiled)
    try:
        for rows in (
            [[(1, 8, 8)], [(1, 4, 8)]],
            [[(1, 6, 8)], [(1, 4, 4), (1, 4, 4)]],
            [[(1, 4, 4)], [(1, 8, 6)]],
        ):
            inputs = _inputs(rows, T=48)
            packed = qwen_vl.pack_vision(
                cfg, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"]
            )
            assert packed.pixel_values.shape[1] == 64
            assert np.isfinite(np.asarray(model(**inputs))).all()
        assert (len(traces), len(compiles)) == (1, 1)
        model(**_inputs([[(1, 8, 16)], [(1, 4, 4)]], T=48))  # 128 patches: the next bucket
        assert (len(traces), len(compiles)) == (2, 2)
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
