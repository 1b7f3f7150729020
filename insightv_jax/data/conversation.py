"""Chat templates, conversation rendering with assistant-only labels, and a
small BPE tokenizer builder.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`;
`<image>` in a user turn marks an image, and for a Qwen-VL model `<video>` a
video (elsewhere `<video>` is plain text). One template serves SFT, DPO and
generation prompts:

  llama3   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n…<|eot_id|>
           <|start_header_id|>user<|end_header_id|>\\n\\n…<|eot_id|> … (llava_llama_3)
  chatml   <|im_start|>system\\n…<|im_end|>\\n<|im_start|>user\\n…<|im_end|>\\n … (Qwen2)
  minimal  <s><u>…<a>…</s>   (terse markers: the tiny demo stays under ~64 tokens)

Text pieces are tokenized separately (never across a role marker or an image),
so `render` and `render_prompt` agree token for token with each other.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from insightv_jax.errors import DataError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
THINK_TOKENS = ("<thoughts>", "</thoughts>", "<output>", "</output>")
PAD_TOKEN = "<pad>"
IGNORE = -100

LLAVA_LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    bos: str  # "" = none
    eos: str  # ends every turn; supervised after assistant content
    default_system: str | None
    turn_prefix: dict  # role -> text before the content
    turn_suffix: str  # text after the end-of-turn token (not supervised)
    specials: tuple[str, ...]


TEMPLATES = {
    "llama3": Template(
        "llama3",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        default_system=LLAVA_LLAMA3_SYSTEM,
        turn_prefix={
            r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
            for r in ("system", "user", "assistant")
        },
        turn_suffix="",
        specials=("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
    "chatml": Template(
        "chatml",
        bos="",
        eos="<|im_end|>",
        default_system="You are a helpful assistant.",
        turn_prefix={r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
        turn_suffix="\n",
        specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    ),
    "minimal": Template(
        "minimal",
        bos="<s>",
        eos="</s>",
        default_system=None,
        turn_prefix={"system": "<sys>", "user": "<u>", "assistant": "<a>"},
        turn_suffix="",
        specials=("<s>", "</s>", "<sys>", "<u>", "<a>"),
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise DataError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer itself: same ids, no per-call Python wrapping
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """How an image sits in the token stream: `start`, then one `token` per
    image feature the model writes there, then `end` (special tokens; ""
    for none). LLaVA: `<image>` alone; Qwen-VL: `<|vision_start|>`, its
    `<|image_pad|>` placeholders, `<|vision_end|>`."""

    token: str = IMAGE_TOKEN
    start: str = ""
    end: str = ""
    video_token: str = ""  # a video's placeholder between the same start and end, if any

    @property
    def specials(self) -> tuple[str, ...]:
        return tuple(t for t in (self.start, self.token, self.end, self.video_token) if t)


LLAVA_IMAGE = ImageSpan()
QWEN_VL_IMAGE = ImageSpan(
    "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", video_token="<|video_pad|>"
)


def image_span_for(model_cfg) -> ImageSpan:
    """The `ImageSpan` of a model config (LLaVA's for every kind but Qwen-VL)."""
    return QWEN_VL_IMAGE if getattr(model_cfg, "is_qwen_vl", False) else LLAVA_IMAGE


def check_image_span(tokenizer, model_cfg, where: str = "tokenizer", videos: bool = False) -> None:
    """A Qwen-VL model finds its images by token id: the tokenizer's vision
    tokens must have `model.qwen_vl`'s ids (a DataError naming the first that
    differs; nothing to check for other models). `videos`: check the video
    placeholder's id too (when the data has videos)."""
    if not getattr(model_cfg, "is_qwen_vl", False):
        return
    q = model_cfg.qwen_vl
    want = {
        QWEN_VL_IMAGE.token: q.image_token_id,
        QWEN_VL_IMAGE.start: q.vision_start_token_id,
        QWEN_VL_IMAGE.end: q.vision_end_token_id,
    }
    if videos:
        want[QWEN_VL_IMAGE.video_token] = q.video_token_id
    for token, expected in want.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise DataError(
                f"{where}: token {token} has id {got}, but the model's config expects "
                f"{expected} (model.qwen_vl): tokenizer and model do not belong together"
            )


def span_ids(tokenizer, span: ImageSpan, count: int, video: bool = False) -> list[int]:
    """The ids of one image in the token stream: start, `count` image ids, end
    (`video`: a video's, with the span's video placeholder)."""
    if video and not span.video_token:
        raise DataError("this model takes no videos (only Qwen-VL models do)")
    ids = tokenizer.convert_tokens_to_ids
    start = [ids(span.start)] if span.start else []
    end = [ids(span.end)] if span.end else []
    return start + [ids(span.video_token if video else span.token)] * count + end


_SPLIT_IMAGES = re.compile(f"({re.escape(IMAGE_TOKEN)})")
_SPLIT_VISION = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


def placeholder_count(text: str, span: ImageSpan) -> tuple[int, int]:
    """(images, videos) a content string marks for a model of `span` (videos
    only where the span has a video placeholder)."""
    return text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN) if span.video_token else 0


def _content_ids(
    tokenizer, text: str, image_counts: list[int], span: ImageSpan, video_counts: list[int]
) -> list[int]:
    """Tokenize content, expanding each `<image>` (and `<video>`, for a span
    with a video placeholder) into its span (`span_ids`), in text order."""
    parts = (_SPLIT_VISION if span.video_token else _SPLIT_IMAGES).split(text)
    ids = encode_text(tokenizer, parts[0])
    for mark, part in zip(parts[1::2], parts[2::2]):
        video = mark == VIDEO_TOKEN
        counts = video_counts if video else image_counts
        if not counts:
            raise DataError(f"more {mark} placeholders than {'videos' if video else 'images'}")
        ids += span_ids(tokenizer, span, counts.pop(0), video) + encode_text(tokenizer, part)
    return ids


def _turns(conversation, template: Template):
    turns = list(conversation)
    if template.default_system and (not turns or turns[0].get("role") != "system"):
        turns.insert(0, {"role": "system", "content": template.default_system})
    for k, turn in enumerate(turns):
        if turn.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"turn {k}: role {turn.get('role')!r} is not system/user/assistant")
    return turns


def render(
    conversation,
    tokenizer,
    template: str = "llama3",
    num_image_tokens=0,
    *,
    name: str = "sample",
    image_span: ImageSpan = LLAVA_IMAGE,
    num_video_tokens=(),
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels equal the ids on assistant content and its
    end-of-turn token, -100 elsewhere. `num_image_tokens` is an int (every image)
    or a list (per image, in order), each `<image>` becoming its `image_span`;
    `num_video_tokens` lists each video's tokens, in order, each `<video>`
    becoming the span's video placeholders (Qwen-VL); `name` prefixes error
    messages."""
    t = get_template(template)
    turns = _turns(conversation, t)
    marked = [placeholder_count(str(x.get("content", "")), image_span) for x in turns]
    n_images, n_videos = sum(m[0] for m in marked), sum(m[1] for m in marked)
    counts = (
        list(num_image_tokens)
        if isinstance(num_image_tokens, (list, tuple))
        else [int(num_image_tokens)] * n_images
    )
    if len(counts) != n_images:
        raise DataError(f"{name}: {n_images} <image> placeholders but {len(counts)} images")
    video_counts = list(num_video_tokens)
    if video_counts and not image_span.video_token:
        raise DataError(f"{name}: has a video, but this model takes no videos "
                        "(only Qwen-VL models do)")  # fmt: skip
    if len(video_counts) != n_videos:
        raise DataError(f"{name}: {n_videos} <video> placeholders but {len(video_counts)} videos")
    ids = encode_text(tokenizer, t.bos)
    labels = [IGNORE] * len(ids)
    try:
        for turn in turns:
            head = encode_text(tokenizer, t.turn_prefix[turn["role"]])
            content = str(turn.get("content", ""))
            body = _content_ids(tokenizer, content, counts, image_span, video_counts)
            body += encode_text(tokenizer, t.eos)
            tail = encode_text(tokenizer, t.turn_suffix)
            ids += head + body + tail
            supervised = turn["role"] == "assistant"
            labels += [IGNORE] * len(head) + (body if supervised else [IGNORE] * len(body))
            labels += [IGNORE] * len(tail)
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    return ids, labels


def render_prompt(
    conversation,
    tokenizer,
    template: str = "llama3",
    num_image_tokens=0,
    image_span: ImageSpan = LLAVA_IMAGE,
    num_video_tokens=(),
):
    """Ids of a conversation (ending with a user turn) plus the assistant header:
    the generation prompt, token-identical to the prefix `render` produces."""
    ids, _ = render(conversation, tokenizer, template, num_image_tokens, image_span=image_span,
                    num_video_tokens=num_video_tokens)  # fmt: skip
    return ids + encode_text(tokenizer, get_template(template).turn_prefix["assistant"])


# ------------------------------------------------------------- tokenizer


def detect_template(tokenizer) -> str | None:
    """Which of our templates a tokenizer was built for (None: use its own)."""
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab:
        return "chatml"
    if "<u>" in vocab and "<a>" in vocab:
        return "minimal"
    return None


def chat_template_jinja(template: str, image_span: ImageSpan = LLAVA_IMAGE) -> str:
    """A Hugging Face chat template producing the same text as `render`.

    Message content is a plain string (ours: `<image>` marks an image) or a
    list of typed parts, as `pipeline("image-text-to-text")` and OpenAI-style
    chat clients send them: `{"type": "text", "text": ...}` renders its text,
    `{"type": "image"}` (or `"image_url"`) the model's image placeholder, which
    the Hugging Face processor then expands to the image's token count (and
    for Qwen-VL `{"type": "video"}` its video placeholder).
    LLaVA's placeholder is `<image>`; Qwen-VL's is `<|vision_start|><|image_pad|>
    <|vision_end|>` (as in Qwen's own template), and a string's `<image>` is
    rewritten to it (and its `<video>` to the video placeholder), so for either
    model the template's text is `render`'s with each image's (and video's)
    run of placeholder tokens collapsed to one."""
    t = get_template(template)
    placeholder = image_span.start + image_span.token + image_span.end
    video = ""  # Qwen-VL: a typed video part, as Qwen's own template renders it
    text = "c"
    if placeholder != IMAGE_TOKEN:
        text = f"c | replace({IMAGE_TOKEN!r}, {placeholder!r})"
    if image_span.video_token:
        video_placeholder = image_span.start + image_span.video_token + image_span.end
        video = "{% elif part['type'] in ('video', 'video_url') %}" + video_placeholder
        text += f" | replace({VIDEO_TOKEN!r}, {video_placeholder!r})"
    # One line, no whitespace between tags: the template's text is exactly render's.
    content = (
        "{% macro render_content(c) %}"
        "{% if c is string %}{{ " + text + " }}"
        "{% else %}{% for part in c %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}"
        "{% elif part['type'] in ('image', 'image_url') %}" + placeholder + video + "{% endif %}"
        "{% endfor %}{% endif %}"
        "{% endmacro %}"
    )
    system = ""
    if t.default_system:
        system = (
            "{% if messages[0]['role'] != 'system' %}"
            + _jinja_turn("system", repr(t.default_system), t)
            + "{% endif %}"
        )
    return (
        f"{content}{t.bos}{system}"
        "{% for message in messages %}"
        + "".join(
            f"{{% if message['role'] == '{r}' %}}"
            + _jinja_turn(r, "render_content(message['content'])", t)
            + "{% endif %}"
            for r in ("system", "user", "assistant")
        )
        + "{% endfor %}"
        + "{% if add_generation_prompt %}"
        + t.turn_prefix["assistant"]
        + "{% endif %}"
    )


def _jinja_turn(role: str, content_expr: str, t: Template) -> str:
    return t.turn_prefix[role] + "{{ " + content_expr + " }}" + t.eos + t.turn_suffix


def build_tokenizer(
    corpus_lines,
    out_dir: str | Path,
    template: str = "minimal",
    vocab_size: int = 512,
    image_span: ImageSpan = LLAVA_IMAGE,
):
    """Train a byte-level BPE tokenizer on `corpus_lines`, with the template's
    special tokens, `<image>`, `<pad>`, the image span's tokens and the think
    tokens (non-special, so decoding keeps them), plus a chat template; save it
    to `out_dir` and return the `transformers` tokenizer loaded back from there."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = get_template(template)
    specials = [*t.specials, IMAGE_TOKEN, PAD_TOKEN]
    specials += [x for x in image_span.specials if x not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus_lines), trainer=trainer)
    tok.add_tokens([AddedToken(x, special=False, normalized=False) for x in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=t.bos or None,
        eos_token=t.eos,
        pad_token=PAD_TOKEN,
        chat_template=chat_template_jinja(template, image_span),
    )
    fast.add_special_tokens(
        {
            "additional_special_tokens": [
                IMAGE_TOKEN,
                *(x for x in image_span.specials if x != IMAGE_TOKEN),
            ]
        }
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


# what transformers 4 and 5 call the plain fast tokenizer in tokenizer_config.json
_PLAIN_FAST = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(folder: str | Path):
    """The Hugging Face tokenizer saved in `folder`. A plain fast tokenizer
    (what `build_tokenizer` writes) loads directly: `AutoTokenizer` would first
    import torch through transformers' config classes (~3 s a process)."""
    import json

    config = Path(folder) / "tokenizer_config.json"
    if config.is_file() and (Path(folder) / "tokenizer.json").is_file():
        if json.loads(config.read_text()).get("tokenizer_class") in _PLAIN_FAST:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def add_think_tokens(tokenizer) -> list[int]:
    """Add `<thoughts>`, `</thoughts>`, `<output>`, `</output>` as non-special
    tokens (if missing); returns their ids. Grow the model with
    `models.vocab.grow_vocab` when `len(tokenizer)` exceeds its vocabulary."""
    from tokenizers import AddedToken

    missing = [x for x in THINK_TOKENS if x not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(x, special=False, normalized=False) for x in missing])
    return [tokenizer.convert_tokens_to_ids(x) for x in THINK_TOKENS]
