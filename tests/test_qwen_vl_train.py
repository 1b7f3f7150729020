"""Qwen2.5-VL trained and sampled like the LLaVA family, on the micro preset
(configs/models/tiny-qwen2_5_vl.yaml): the training batch (loader transform +
collate, flat batch-major arrays) of image, video and text records gives the
logits of the processor-output path that is exact against transformers, and
M-RoPE ids equal to transformers' `get_rope_index`; `insightv sft` learns from
a mix of image and video records and its run directory samples with images;
bad video records and a tokenizer whose vision ids are not the config's are
refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from hf_models import hf_rope_index
from PIL import Image, ImageOps

from insightv_jax import cli
from insightv_jax.checkpoint import load_model
from insightv_jax.config import load_config
from insightv_jax.data import conversation as conv
from insightv_jax.data.loader import Collate, Loader
from insightv_jax.data.sources import LlavaJsonSource, open_source
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.data.transforms import ChatTransform
from insightv_jax.data.validate import check_record
from insightv_jax.errors import DataError
from insightv_jax.models.factory import batch_images
from insightv_jax.models.mrope import mm_token_types

SFT_CONFIG = "configs/sft/tiny-qwen2_5_vl-synthetic.yaml"
VIDEO_PAD, START, END = 10, 7, 9  # the micro preset's ids


def as_video(rec: dict, folder, rate: dict) -> dict:
    """`rec` asked about a 3-frame video instead of its image: the image, its
    mirror image, the image again (`rate`: fps or seconds_per_frame)."""
    frames = []
    with Image.open(folder / rec["image"]) as img:
        for k, frame in enumerate((img, ImageOps.mirror(img), img)):
            frames.append(f"frames/{rec['id']}-{k}.png")
            frame.save(folder / frames[-1])
    turns = [{**t, "value": t["value"].replace("<image>", "<video>")} for t in rec["conversations"]]
    out = {k: v for k, v in rec.items() if k != "image"}
    return {**out, "video": {"frames": frames, **rate}, "conversations": turns}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """64 synthetic questions with 40-px images (train.json); the same with
    every other question about a 3-frame video of its image (mixed.json); a
    tokenizer with Qwen's vision tokens."""
    root = tmp_path_factory.mktemp("qwen_suite")
    write_llava(root / "d", 64, seed=0)
    records = open_source(root / "d" / "train.json").records
    corpus = [t["value"] for r in records for t in r["conversations"]]
    conv.build_tokenizer(corpus * 2, root / "tok", template="minimal", vocab_size=508,
                         image_span=conv.QWEN_VL_IMAGE)  # fmt: skip
    (root / "d" / "frames").mkdir()
    rates = ({"fps": 4.0}, {"seconds_per_frame": 0.75})  # 0.5 and 1.5 seconds per grid step
    mixed = [as_video(r, root / "d", rates[i // 2 % 2]) if i % 2 else r
             for i, r in enumerate(records)]  # fmt: skip
    (root / "d" / "mixed.json").write_text(json.dumps(mixed))
    return root


@pytest.fixture(scope="module")
def run(suite, tmp_path_factory):
    """`insightv sft` of the micro preset on mixed.json: 16 steps, one
    sequence bucket (so one compiled step), its run directory."""
    run = tmp_path_factory.mktemp("qwen_sft") / "run"
    code = cli.main([
        "sft", "--config", SFT_CONFIG, f"train.data={suite / 'd' / 'mixed.json'}",
        f"train.tokenizer={suite / 'tok'}", f"train.workdir={run}", "train.steps=16",
        "train.global_batch=16", "train.log_every=8", "train.checkpoint_every=0",
        "data.buckets=[128]",
    ])  # fmt: skip
    assert code == 0
    return run


@nnx.jit
def _batch_logits(model, batch: dict):
    """The training steps' forward: `hidden_states(**batch_inputs(batch))`."""
    inputs = model.batch_inputs(batch)
    return model.logits(model.hidden_states(batch["input_ids"], batch["attention_mask"], **inputs))


def _gather(examples: list[dict], grid: str, *keys: str) -> dict:
    having = [e for e in examples if grid in e]
    return {k: np.concatenate([e[k] for e in having]) for k in (grid, *keys)}


def test_training_batch_gives_the_processor_path_logits(suite, run):
    """Rows with an image, text only, a 3-frame video (with its text turn),
    and a video then an image, padded by `Collate` with the transform's
    `batch_images`: the video renders as start, 32 video placeholders, end;
    the M-RoPE ids (video time steps included) equal transformers'
    `get_rope_index`; for the trained model, `hidden_states(**batch_inputs(batch))`
    equals `model(**processor outputs)` on every real token."""
    model, cfg, _, _ = load_model(run)
    transform = ChatTransform(suite / "tok", "minimal", cfg, suite / "d", batch_images(cfg))
    mixed = open_source(suite / "d" / "mixed.json").records
    image, video = mixed[0], mixed[3]  # video: seconds_per_frame 0.75
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hello?"},
                                              {"from": "gpt", "value": "3"}]}  # fmt: skip
    question = video["conversations"][0]["value"].replace("<video>", "<video> then <image>")
    both = {**video, "image": image["image"],
            "conversations": [{"from": "human", "value": question}, video["conversations"][1]]}  # fmt: skip
    examples = [transform(r) for r in [image, text_only, video, both]]
    assert examples[0]["image_grid_thw"].tolist() == [[1, 8, 8]]  # 16 tokens, one per cell
    # 3 frames padded to 2 temporal patches of 8x8; 2 x 0.75 s per temporal patch
    assert examples[2]["video_grid_thw"].tolist() == [[2, 8, 8]]
    assert examples[2]["second_per_grid_ts"].tolist() == [1.5]
    ids = examples[2]["input_ids"].tolist()
    at = ids.index(START)
    assert ids[at : at + 34] == [START] + [VIDEO_PAD] * 32 + [END] and ids.count(VIDEO_PAD) == 32
    assert check_record(video, suite / "d", transform.limits(128)) is None
    assert transform.length(video) == len(ids)
    batch = Collate((64, 128), images=transform.batch_images)(examples)
    assert batch["pixel_values"].shape[:2] == (4, 256) and batch["positions"].shape[:2] == (4, 3)
    assert (batch["vision_rows"][1] == -1).all()  # the text row takes no image token
    images = _gather(examples, "image_grid_thw", "pixel_values")
    videos = _gather(examples, "video_grid_thw", "pixel_values_videos", "second_per_grid_ts")
    types = mm_token_types(batch["input_ids"], cfg.qwen_vl.image_token_id, VIDEO_PAD)
    want_positions, _ = hf_rope_index(
        "qwen2_5_vl", types, cfg.qwen_vision.tokens_per_second,
        image_grid_thw=images["image_grid_thw"], video_grid_thw=videos["video_grid_thw"],
        second_per_grid_ts=videos["second_per_grid_ts"], attention_mask=batch["attention_mask"],
    )  # fmt: skip
    np.testing.assert_array_equal(batch["positions"], want_positions.transpose(1, 0, 2))
    times = batch["positions"][2, 0][batch["input_ids"][2] == VIDEO_PAD]
    assert sorted(set(times - times.min())) == [0, 6]  # 4 tokens/s x 1.5 s per temporal patch
    got = np.asarray(_batch_logits(model, batch))
    want = np.asarray(model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **images, **videos
    ))  # fmt: skip
    real = batch["attention_mask"].astype(bool)
    assert float(np.abs(got - want)[real].max()) <= 1e-5


def test_sft_learns_and_the_run_samples_with_images(suite, run):
    """SFT on a mix of image and video records lowers the loss; the run
    directory samples with an image, and with a video: the video prompt's ids
    are the training rendering's prefix, and in a batch beside the image
    prompt each row decodes the tokens it decodes alone."""
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

    video = open_source(suite / "d" / "mixed.json").records[3]  # seconds_per_frame 0.75
    where = {**video["video"], "frames": [suite / "d" / f for f in video["video"]["frames"]]}
    asked = enc.prompt([{"role": "user", "content": video["conversations"][0]["value"]}],
                       videos=[where])  # fmt: skip
    assert asked.video_grid_thw.tolist() == [[2, 8, 8]] and asked.second_per_grid_ts.tolist() == [
        1.5
    ]
    transform = ChatTransform(suite / "tok", "minimal", enc.model_cfg, suite / "d",
                              batch_images(enc.model_cfg))  # fmt: skip
    trained = transform(video)["input_ids"].tolist()
    assert asked.ids == trained[: len(asked.ids)] and asked.ids.count(VIDEO_PAD) == 32
    alone = [generate_encoded(sampler, [p], SamplingParams(max_new_tokens=6))[0]["tokens"]
             for p in (asked, prompt)]  # fmt: skip
    both = generate_encoded(sampler, [asked, prompt], SamplingParams(max_new_tokens=6))
    assert [o["tokens"] for o in both] == alone
    with pytest.raises(DataError, match="needs one of fps or seconds_per_frame"):
        enc.prompt([{"role": "user", "content": "<video>"}], videos=[{"frames": where["frames"]}])


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


def test_bad_video_records_are_named_skipped_and_counted(suite, tmp_path):
    """A missing frame, placeholders that do not match the videos, frames of
    two sizes, no rate: each a one-line reason; the loader skips and counts
    them (or fails naming the first); a LLaVA model refuses any video."""
    cfg = load_config(SFT_CONFIG).model
    transform = ChatTransform(suite / "tok", "minimal", cfg, suite / "d", batch_images(cfg))
    good = open_source(suite / "d" / "mixed.json").records[1]
    frames = good["video"]["frames"]
    Image.new("RGB", (40, 32)).save(suite / "d" / "frames" / "small.png")
    ask = good["conversations"]

    def variant(rid, video=None, question=None):
        turns = [{**ask[0], "value": question or ask[0]["value"]}, ask[1]]
        return {"id": rid, "video": {**good["video"], **(video or {})}, "conversations": turns}

    bad = {
        "missing": variant("missing", {"frames": [*frames[:2], "frames/gone.png"]}),
        "two_tags": variant("two_tags", question=ask[0]["value"] + " <video>"),
        "as_image": variant("as_image", question=ask[0]["value"].replace("<video>", "<image>")),
        "sizes": variant("sizes", {"frames": [frames[0], "frames/small.png"]}),
        "no_rate": {**variant("no_rate"), "video": {"frames": frames}},
    }
    reasons = {
        rid: check_record(rec, suite / "d", transform.limits(128)) for rid, rec in bad.items()
    }
    assert reasons == {
        "missing": "video 0 frame frames/gone.png not found",
        "two_tags": "2 <video> tag(s) but 1 video(s)",
        "as_image": "1 <image> tag(s) but 0 image(s)",
        "sizes": "video 0: frames of different sizes (40x32, 40x40)",
        "no_rate": "video 0: needs one of fps or seconds_per_frame",
    }
    path = tmp_path / "videos.json"
    path.write_text(json.dumps([good, *bad.values()]))
    source = LlavaJsonSource(path, root=suite / "d")

    def load(rule):
        return Loader(source, transform, batch_size=1, buckets=(64, 128), on_bad_record=rule,
                      limits=transform.limits(128))  # fmt: skip

    loader = load("skip")
    assert loader.counts["used"] == 1 and loader.counts["skipped"] == 5
    assert next(loader)["positions"].shape == (1, 3, 64)
    with pytest.raises(DataError) as e:
        load("fail")
    msg = "bad record missing: video 0 frame frames/gone.png not found (on_bad_record=fail)"
    assert str(e.value) == msg

    llava = load_config("configs/sft/tiny-synthetic.yaml").model
    conv.build_tokenizer(["a b c"], tmp_path / "llava_tok", template="minimal", vocab_size=300)
    to_llava = ChatTransform(tmp_path / "llava_tok", "minimal", llava, suite / "d")
    with pytest.raises(DataError) as e:
        to_llava(good)
    assert str(e.value) == (f"record {good['id']}: has a video, but model kind 'llava' takes no "
                            "videos (only Qwen-VL models do)")  # fmt: skip
    assert check_record(good, suite / "d", to_llava.limits(128)) == (
        "has a video, but the model takes no videos (only Qwen-VL models do)"
    )
