"""Chat templates, assistant-only labels, the BPE tokenizer builder and think tokens."""

import numpy as np
import pytest

from insightv_jax.data.conversation import (
    IGNORE,
    IMAGE_TOKEN,
    QWEN_VL_IMAGE,
    THINK_TOKENS,
    add_think_tokens,
    build_tokenizer,
    render,
    render_prompt,
)
from insightv_jax.errors import DataError

CORPUS = [
    "how many red squares are there ? answer 2",
    "blue circles 1 ; red squares 2 ; 1 plus 2 ; answer 3",
    "is the number of green triangles larger than blue squares ? yes no",
] * 20

CONV = [
    {"role": "user", "content": f"{IMAGE_TOKEN}how many red squares ?"},
    {"role": "assistant", "content": "<thoughts>red squares 2</thoughts><output>answer 2</output>"},
]

# CONV as chat clients and `pipeline("image-text-to-text")` send it: typed parts
TYPED = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "how many red squares ?"}],
    },
    CONV[1],
]


@pytest.fixture(scope="module", params=["minimal", "llama3", "chatml"])
def tok(request, tmp_path_factory):
    return request.param, build_tokenizer(
        CORPUS, tmp_path_factory.mktemp(request.param), request.param, 300
    )


def test_labels_cover_only_assistant_turns(tok):
    template, tokenizer = tok
    ids, labels = render(CONV, tokenizer, template, num_image_tokens=16)
    assert len(ids) == len(labels)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 16
    supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    text = tokenizer.decode(supervised)
    assert text == CONV[1]["content"] + tokenizer.eos_token
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    # The same text as the HF chat template (with the typed parts pipelines send
    # too), the same ids once its <image> is expanded, and the prompt is a prefix
    # of the render.
    expanded = tokenizer.decode(ids).replace(IMAGE_TOKEN * 16, IMAGE_TOKEN)
    for conversation in (CONV, TYPED):
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert rendered == expanded
    again = rendered.replace(IMAGE_TOKEN, IMAGE_TOKEN * 16)
    assert tokenizer(again, add_special_tokens=False)["input_ids"] == ids
    prompt = render_prompt(CONV[:1], tokenizer, template, 16)
    assert ids[: len(prompt)] == prompt
    if template == "minimal":
        assert len(ids) <= 64
        assert image_id == 5  # configs/models/tiny.yaml relies on it


@pytest.mark.parametrize("template", ["minimal", "chatml"])
def test_qwen_vl_template_renders_the_vision_span(template, tmp_path):
    """With Qwen-VL's image span, an image (typed part or `<image>` in a
    string) renders as Qwen's `<|vision_start|><|image_pad|><|vision_end|>`,
    which its processor expands to the image's count of `<|image_pad|>`: then
    the ids are render's."""
    tokenizer = build_tokenizer(CORPUS, tmp_path, template, 300, image_span=QWEN_VL_IMAGE)
    ids, _ = render(CONV, tokenizer, template, 16, image_span=QWEN_VL_IMAGE)
    pad = QWEN_VL_IMAGE.token
    for conversation in (CONV, TYPED):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
        again = tokenizer(text.replace(pad, pad * 16), add_special_tokens=False)["input_ids"]
        assert again == ids
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(video, tokenize=False)
    assert "<|vision_start|><|video_pad|><|vision_end|>hi" in text  # as Qwen's own template
    # a string's `<video>` (a training record's) renders as its span too: render's
    # ids with the video's 32 placeholders collapsed to one; LLaVA's span keeps it text
    clip = [{"role": "user", "content": "<video>\nwhat moves?"},
            {"role": "assistant", "content": "a cat"}]  # fmt: skip
    ids, _ = render(clip, tokenizer, template, image_span=QWEN_VL_IMAGE, num_video_tokens=[32])
    vpad = QWEN_VL_IMAGE.video_token
    assert ids.count(tokenizer.convert_tokens_to_ids(vpad)) == 32
    text = tokenizer.apply_chat_template(clip, tokenize=False)
    assert tokenizer(text.replace(vpad, vpad * 32), add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(DataError, match="1 <video> placeholders but 0 videos"):
        render(clip, tokenizer, template, image_span=QWEN_VL_IMAGE)
    as_text, _ = render(clip, tokenizer, template)
    assert tokenizer.convert_tokens_to_ids(vpad) not in as_text


def test_think_tokens_survive_decoding(tok):
    _, tokenizer = tok
    ids = add_think_tokens(tokenizer)
    assert len(set(ids)) == 4 and all(isinstance(i, int) for i in ids)
    text = "<thoughts>a</thoughts><output>b</output>"
    enc = tokenizer.encode(text, add_special_tokens=False)
    assert set(ids) <= set(enc)
    assert tokenizer.decode(enc, skip_special_tokens=True) == text


def test_image_count_mismatch_names_the_sample(tok):
    template, tokenizer = tok
    with pytest.raises(DataError, match="sample 7: 1 <image> placeholders but 2 images"):
        render(CONV, tokenizer, template, [16, 16], name="sample 7")


def test_grow_vocab_mean_rows():
    from flax import nnx

    from insightv_jax.config import DecoderConfig, ModelConfig
    from insightv_jax.models.factory import construct
    from insightv_jax.models.vocab import grow_vocab

    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=50,
            hidden_size=16,
            num_heads=2,
            num_kv_heads=2,
            num_layers=1,
            intermediate_size=32,
        )
    )
    model = construct(cfg)
    grown, gcfg = grow_vocab(model, cfg, 50 + len(THINK_TOKENS))
    assert gcfg.decoder.vocab_size == 54
    emb = np.asarray(grown.embed[...])
    np.testing.assert_allclose(
        emb[50:], np.repeat(emb[:50].mean(0, keepdims=True), 4, 0), atol=1e-6
    )
    np.testing.assert_array_equal(emb[:50], np.asarray(model.embed[...]))
    ids = np.array([[1, 2, 51]])
    assert np.asarray(nnx.jit(lambda m, x: m(x))(grown, ids)).shape == (1, 3, 54)


def test_load_tokenizer_matches_auto_tokenizer(tmp_path):
    """The direct load of a built tokenizer (no AutoTokenizer) is the same
    tokenizer: same class family, ids, specials and chat template."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from insightv_jax.data.conversation import load_tokenizer

    build_tokenizer(CORPUS, tmp_path, "minimal", 300)
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(ours, PreTrainedTokenizerFast)
    text = f"{IMAGE_TOKEN}how many red squares ? answer 2"
    assert ours.encode(text) == auto.encode(text)
    assert ours.all_special_ids == auto.all_special_ids and ours.pad_token_id == auto.pad_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs, tokenize=False) == auto.apply_chat_template(
        msgs, tokenize=False
    )
