"""Qwen2.5-VL trained and sampled like the LLaVA family, on the micro preset
(configs/models/tiny-qwen2_5_vl.yaml): the training batch (loader transform +
collate, flat batch-major arrays) gives the logits of the processor-output
path that is exact against transformers; `insightv sft` learns and its run
directory samples with images; a tokenizer whose vision ids are not the
config's is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from insightv_jax import cli
from insightv_jax.config import load_config
from insightv_jax.data import conversation as conv
from insightv_jax.data.loader import Collate
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.data.transforms import ChatTransform
from insightv_jax.errors import DataError
from insightv_jax.models.factory import batch_images, construct

SFT_CONFIG = "configs/sft/tiny-qwen2_5_vl-synthetic.yaml"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """64 synthetic questions with 40-px images and a tokenizer with Qwen's vision tokens."""
    root = tmp_path_factory.mktemp("qwen_suite")
    write_llava(root / "d", 64, seed=0)
    corpus = [t["value"] for r in open_source(root / "d" / "train.json").records
              for t in r["conversations"]]  # fmt: skip
    conv.build_tokenizer(corpus * 2, root / "tok", template="minimal", vocab_size=508,
                         image_span=conv.QWEN_VL_IMAGE)  # fmt: skip
    return root


def test_training_batch_gives_the_processor_path_logits(suite):
    """Rows with an image and a text-only row, padded by `Collate` with the
    transform's `batch_images`: `hidden_states(**batch_inputs(batch))` equals
    `model(**processor outputs)` on every real token."""
    cfg = load_config(SFT_CONFIG).model
    model = construct(cfg, seed=3)
    transform = ChatTransform(suite / "tok", "minimal", cfg, suite / "d", batch_images(cfg))
    records = open_source(suite / "d" / "train.json").records[:3]
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hello?"},
                                              {"from": "gpt", "value": "3"}]}  # fmt: skip
    examples = [transform(r) for r in [records[0], text_only, *records[1:]]]
    assert examples[0]["image_grid_thw"].tolist() == [[1, 8, 8]]  # 16 tokens, one per cell
    batch = Collate((64, 128), images=transform.batch_images)(examples)
    assert batch["pixel_values"].shape[:2] == (4, 64) and batch["positions"].shape[:2] == (4, 3)
    assert (batch["vision_rows"][1] == -1).all()  # the text row takes no image token
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                 **model.batch_inputs(batch))  # fmt: skip
    got = np.asarray(model.logits(hidden))
    with_images = [e for e in examples if "image_grid_thw" in e]
    want = np.asarray(model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        pixel_values=np.concatenate([e["pixel_values"] for e in with_images]),
        image_grid_thw=np.concatenate([e["image_grid_thw"] for e in with_images]),
    ))  # fmt: skip
    real = batch["attention_mask"].astype(bool)
    assert float(np.abs(got - want)[real].max()) <= 1e-5


def test_sft_learns_and_the_run_samples_with_images(suite, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    # no MFU: its matmul benchmark takes seconds
    monkeypatch.setattr("insightv_jax.train.trainer.measure_matmul_peak", lambda *a, **k: 0.0)
    code = cli.main([
        "sft", "--config", SFT_CONFIG, f"train.data={suite / 'd' / 'train.json'}",
        f"train.tokenizer={suite / 'tok'}", f"train.workdir={run}", "train.steps=16",
        "train.global_batch=16", "train.log_every=8", "train.checkpoint_every=0",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2

    from insightv_jax.sample.infer import load_agent
    from insightv_jax.sample.reasoning import encoder_of, generate_encoded
    from insightv_jax.sample.sampler import SamplingParams

    sampler = load_agent(run)
    enc = encoder_of(sampler)
    rec = open_source(suite / "d" / "train.json").records[0]
    prompt = enc.prompt([{"role": "user", "content": rec["conversations"][0]["value"]}],
                        [suite / "d" / rec["image"]])  # fmt: skip
    ids = np.asarray(prompt.ids)
    assert (ids == 8).sum() == 16 and (ids == 7).sum() == 1 and (ids == 9).sum() == 1
    out = generate_encoded(sampler, [prompt, prompt], SamplingParams(max_new_tokens=6))
    assert out[0]["tokens"] and out[0]["tokens"] == out[1]["tokens"]  # greedy, same prompt


def test_a_tokenizer_without_the_configs_vision_ids_is_refused(suite, tmp_path):
    conv.build_tokenizer(["a b c"], tmp_path / "llava_tok", template="minimal", vocab_size=300)
    cfg = load_config(SFT_CONFIG).model
    transform = ChatTransform(tmp_path / "llava_tok", "minimal", cfg, suite / "d")
    with pytest.raises(DataError) as e:
        transform(open_source(suite / "d" / "train.json").records[0])
    assert "<|image_pad|> has id" in str(e.value) and "\n" not in str(e.value)


def test_pair_sides_with_images_of_different_sizes_stack(suite, tmp_path):
    """DPO's two sides are collated apart; their patches are padded alike."""
    from PIL import Image

    from insightv_jax.data.pairs import PairCollate
    from insightv_jax.train.dpo.program import pair_batch

    Image.new("RGB", (120, 40), "white").save(tmp_path / "wide.png")
    cfg = load_config(SFT_CONFIG).model
    transform = ChatTransform(suite / "tok", "minimal", cfg, suite / "d", batch_images(cfg))
    rec = open_source(suite / "d" / "train.json").records[0]
    wide = {**rec, "image": str(tmp_path / "wide.png")}
    sides = {"chosen": transform(rec), "rejected": transform(wide), "scores": np.zeros(2)}
    assert len(sides["rejected"]["pixel_values"]) == 3 * len(sides["chosen"]["pixel_values"])
    batch = pair_batch(PairCollate((64, 128), images=transform.batch_images)([sides]))
    assert batch["pixel_values"].shape[:3] == (1, 2, 256)  # 64 and 192 patches, one bucket
    assert batch["positions"].shape[:3] == (1, 2, 3)
