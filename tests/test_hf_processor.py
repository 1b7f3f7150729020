"""An exported agent used as transformers users use it: a micro LLaVA agent
trained with `insightv sft` and exported with `insightv convert jax2hf` loads
with `AutoProcessor` and `LlavaForConditionalGeneration`; transformers' greedy
`generate` on the processor's inputs (a chat with a typed image part) gives
our sampler's tokens; `pipeline("image-text-to-text")` answers a chat message.

A Qwen-VL export is checked through its parts: transformers' combined
`Qwen2VLProcessor` / `Qwen2_5_VLProcessor` (what `AutoProcessor` builds) needs
torchvision for its video processor, which these machines cannot install, so
`Qwen2VLImageProcessorPil`, the tokenizer and its chat template stand in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from insightv_jax import cli
from insightv_jax.data import conversation as conv
from insightv_jax.data.sources import open_source

NEW_TOKENS = 8


def _messages(question: str, typed: bool) -> list[dict]:
    """One user turn with the image first: ours (`<image>` in a string) or
    typed parts, as pipelines and chat clients send it."""
    if not typed:
        return [{"role": "user", "content": conv.IMAGE_TOKEN + "\n" + question}]
    parts = [{"type": "image"}, {"type": "text", "text": "\n" + question}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def agent(micro_llava_agent, tmp_path_factory):
    """(run dir, its HF export, three (question, image path) test rows): the
    session's trained micro LLaVA agent (conftest), exported."""
    root, run = micro_llava_agent
    export = tmp_path_factory.mktemp("agent") / "hf"
    assert cli.main(["convert", "jax2hf", "--src", str(run), "--out", str(export)]) == 0
    records = open_source(root / "d" / "train.json").records
    return run, export, [(r["question"], root / "d" / r["image"]) for r in records[:3]]


def test_export_writes_what_auto_processor_reads(agent):
    _, export, _ = agent
    proc = json.loads((export / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaProcessor"
    # 40-px images, 10-px patches, CLIP's CLS token counted and dropped: 16 tokens
    assert proc["patch_size"] == 10 and proc["num_additional_image_tokens"] == 1
    assert proc["vision_feature_select_strategy"] == "default" and proc["image_token"] == "<image>"
    assert proc["image_processor"] == json.loads((export / "preprocessor_config.json").read_text())
    tok = conv.load_tokenizer(export)
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("</s>")  # minimal's end of turn
    assert "render_content" in (export / "chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def ours(agent):
    """Our sampler's greedy answers to the test rows (prompts and results)."""
    from insightv_jax.sample.infer import load_agent
    from insightv_jax.sample.reasoning import encoder_of, generate_encoded
    from insightv_jax.sample.sampler import SamplingParams

    run, _, rows = agent
    sampler = load_agent(run)
    enc = encoder_of(sampler)
    prompts = [enc.prompt(_messages(q, typed=False), [img]) for q, img in rows]
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    return prompts, generate_encoded(sampler, prompts, params)


def test_generate_through_auto_processor_equals_our_sampler(agent, ours):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, export, rows = agent
    processor = AutoProcessor.from_pretrained(export)
    model = LlavaForConditionalGeneration.from_pretrained(export).eval()
    for (question, image), prompt, mine in zip(rows, *ours):
        text = processor.apply_chat_template(
            _messages(question, typed=True), add_generation_prompt=True
        )
        inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt.ids  # the same prompt, token for token
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        # generate stops at generation_config's eos (our end of turn) and keeps it, as we do
        assert mine["finish_reason"] == "stop"
        assert out[0, len(prompt.ids) :].tolist() == mine["tokens"], question


def test_pipeline_answers_typed_chat_messages(agent, ours):
    from transformers import pipeline

    _, export, rows = agent
    pipe = pipeline("image-text-to-text", model=str(export))
    got = []
    for question, image in rows:
        parts = [{"type": "image", "image": Image.open(image)},
                 {"type": "text", "text": "\n" + question}]  # fmt: skip
        out = pipe(text=[{"role": "user", "content": parts}], max_new_tokens=NEW_TOKENS,
                   return_full_text=False)  # fmt: skip
        got.append(out[0]["generated_text"])
    assert got == [r["text"] for r in ours[1]] and any(got)


def test_qwen_vl_export_parts(tmp_path):
    """The files a micro Qwen2.5-VL export gets around its weights
    (`hf.processor.write_processor_files`, which `export_hf` runs: see
    test_qwen_vl_export for the weights), with one of our tokenizers: the image
    processor loads as `Qwen2VLImageProcessorPil`, and the chat template on a
    typed image part, with `<|image_pad|>` expanded to the image's token count
    as `Qwen2_5_VLProcessor` expands it, gives our prompt's ids. The combined
    processor needs torchvision: see the module docstring."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from insightv_jax.config import load_config
    from insightv_jax.data.qwen_images import QwenImageProcessor
    from insightv_jax.hf.processor import write_processor_files
    from insightv_jax.sample.prompting import PromptEncoder

    cfg = load_config("configs/models/tiny-qwen2_5_vl.yaml").model
    out = tmp_path / "hf"
    question = "how many red squares ?"
    tok = conv.build_tokenizer([question] * 20, out, "minimal", 300,
                               image_span=conv.QWEN_VL_IMAGE)  # fmt: skip
    write_processor_files(out, cfg, tok)
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["processor_class"] == "Qwen2_5_VLProcessor"
    assert proc["image_processor"]["patch_size"] == 5 and proc["image_processor"]["merge_size"] == 2
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("</s>")

    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 60, 3), np.uint8))
    images = AutoImageProcessor.from_pretrained(out)
    assert type(images) is Qwen2VLImageProcessorPil
    grid = images([image], return_tensors="np")["image_grid_thw"][0]
    theirs = AutoTokenizer.from_pretrained(out)
    text = theirs.apply_chat_template(_messages(question, typed=True), add_generation_prompt=True,
                                      tokenize=False)  # fmt: skip
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    pads = "<|image_pad|>" * (int(np.prod(grid)) // 4)  # one per 2x2 merge unit
    ids = theirs(text.replace("<|image_pad|>", pads))["input_ids"]
    encoder = PromptEncoder(tok, processor=QwenImageProcessor.for_model(cfg), model_cfg=cfg)
    assert ids == encoder.prompt(_messages(question, typed=False), [image]).ids
