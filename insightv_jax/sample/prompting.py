"""Prompts as token ids (and image arrays) for generation.

With one of our chat templates (llama3, chatml, minimal — detected from the
tokenizer's special tokens) prompts are rendered by `data.conversation`, token
for token as in training. Any other tokenizer falls back to its own Hugging
Face chat template. `<image>` placeholders expand to as many image tokens as
the model consumes for each image's size (Qwen-VL: between its vision start
and end tokens); for a Qwen-VL model `<video>` placeholders expand likewise to
each video's tokens (videos given as the SFT records' `video` entries: frames
and `fps` or `seconds_per_frame`).

A batch of encoded prompts gives its images to `Sampler.extend` / `generate`
as keyword arguments (`PromptEncoder.images`): LLaVA's per-sample
`pixel_values` / `image_sizes`, or Qwen-VL's `vision` (a `VisionPrompt`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from insightv_jax.data import conversation as conv
from insightv_jax.data.conversation import detect_template
from insightv_jax.data.images import pack_samples
from insightv_jax.data.validate import video_fps
from insightv_jax.errors import DataError
from insightv_jax.vision_grid import num_image_tokens


@dataclasses.dataclass
class EncodedPrompt:
    """A prompt's ids and images: LLaVA's `pixel_values` (I, tiles, 3, H, W)
    with `image_sizes` (I, 2), or Qwen-VL's `pixel_values` (patches, C*T*p*p)
    with `image_grid_thw` (I, 3) and its videos' `pixel_values_videos`,
    `video_grid_thw` (V, 3) and `second_per_grid_ts` (V,)."""

    ids: list[int]
    pixel_values: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    second_per_grid_ts: np.ndarray | None = None


class PromptEncoder:
    """Turns chat messages (+ images) into generation prompts for one model."""

    def __init__(self, tokenizer, template: str | None = None, processor=None, model_cfg=None):
        self.tokenizer = tokenizer
        self.template = template or detect_template(tokenizer)
        self.processor = processor
        self.model_cfg = model_cfg if getattr(model_cfg, "takes_images", False) else None
        self.image_span = conv.image_span_for(model_cfg)
        conv.check_image_span(tokenizer, self.model_cfg)

    def _enc(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def image_inputs(self, images, name: str = "prompt"):
        """(pixel_values, image_sizes or Qwen-VL's image_grid_thw, tokens per
        image); see `EncodedPrompt`."""
        if not images:
            return None, None, []
        if self.model_cfg is None or self.processor is None:
            raise DataError(f"{name}: this model is text-only and cannot take images")
        if self.model_cfg.is_qwen_vl:
            out = self.processor(list(images), [f"{name} image {k}" for k in range(len(images))])
            merge = self.processor.merge_size**2
            counts = [int(g.prod()) // merge for g in out["image_grid_thw"]]
            return out["pixel_values"], out["image_grid_thw"], counts
        named = [(im, f"{name} image {k}") for k, im in enumerate(images)]
        pv, sizes = pack_samples([named], self.processor, self.model_cfg)
        counts = [
            num_image_tokens(tuple(int(x) for x in s), self.model_cfg)
            for s in sizes[0][: len(images)]
        ]
        return pv[0], sizes[0], counts

    def video_inputs(self, videos, name: str = "prompt") -> tuple[dict, list[int]]:
        """(the processor's video arrays, tokens per video) for `videos`, each a
        `{"frames": [files], "fps" | "seconds_per_frame": x}` entry."""
        if not videos:
            return {}, []
        if self.model_cfg is None or not self.model_cfg.is_qwen_vl or self.processor is None:
            raise DataError(f"{name}: this model takes no videos (only Qwen-VL models do)")
        conv.check_image_span(self.tokenizer, self.model_cfg, videos=True)
        parts = []
        for k, v in enumerate(videos):
            where = f"{name} video {k}"
            if not isinstance(v, dict) or not v.get("frames"):
                raise DataError(f"{where}: give {{'frames': [...], 'fps': x}}")
            if ("fps" in v) == ("seconds_per_frame" in v):
                raise DataError(f"{where}: needs one of fps or seconds_per_frame")
            parts.append(self.processor.video(v["frames"], video_fps(v), where))
        out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        merge = self.processor.merge_size**2
        return out, [int(g.prod()) // merge for g in out["video_grid_thw"]]

    def prompt(self, messages: list[dict], images=(), name: str = "prompt",
               videos=()) -> EncodedPrompt:  # fmt: skip
        """A generation prompt: the messages, then the assistant header. Each
        `<image>` takes the next of `images`, each `<video>` (Qwen-VL) the
        next of `videos`."""
        pv, sizes, counts = self.image_inputs(list(images), name)
        video_arrays, video_counts = self.video_inputs(list(videos), name)
        marked = [conv.placeholder_count(str(m.get("content", "")), self.image_span)
                  for m in messages]  # fmt: skip
        if sum(m[0] for m in marked) != len(counts):
            raise DataError(f"{name}: {sum(m[0] for m in marked)} <image> placeholders but "
                            f"{len(counts)} images")  # fmt: skip
        if self.template is not None:
            ids = conv.render_prompt(messages, self.tokenizer, self.template, counts,
                                     self.image_span, video_counts)  # fmt: skip
        else:
            if video_counts:
                raise DataError(f"{name}: videos need one of our chat templates")
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = self._expand(text, counts)
        if self.model_cfg is not None and self.model_cfg.is_qwen_vl:
            return EncodedPrompt(ids, pv, image_grid_thw=sizes, **video_arrays)
        return EncodedPrompt(ids, pv, sizes)

    def _expand(self, text: str, counts: list[int]) -> list[int]:
        parts = text.split(conv.IMAGE_TOKEN)
        ids = self._enc(parts[0])
        for part, n in zip(parts[1:], counts):
            ids += conv.span_ids(self.tokenizer, self.image_span, n) + self._enc(part)
        return ids

    def images(self, encoded: list[EncodedPrompt]) -> dict:
        """The images of a batch of prompts (rows in order) as keyword
        arguments of `Sampler.extend` / `Sampler.generate`; {} for none."""
        if self.model_cfg is not None and self.model_cfg.is_qwen_vl:
            from insightv_jax.models.qwen_vl import VisionPrompt

            def joined(key):  # rows in order, as the placeholders of the batch's ids
                parts = [getattr(e, key) for e in encoded if getattr(e, key) is not None]
                return np.concatenate(parts) if parts else None

            arrays = {key: joined(key) for key in ("pixel_values", "image_grid_thw",
                      "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}  # fmt: skip
            if arrays["image_grid_thw"] is None and arrays["video_grid_thw"] is None:
                return {}
            return {"vision": VisionPrompt(self.model_cfg, **arrays)}
        pv, sizes = stack_prompts(encoded)
        return {} if pv is None else {"pixel_values": pv, "image_sizes": sizes}

    def glue(self, user_text: str) -> list[int]:
        """Tokens between the end of an assistant turn's content and the start
        of the next assistant turn, around one user message (progressive
        generation appends exactly these to the cache)."""
        if self.template is not None:
            t = conv.get_template(self.template)
            end = self._enc(t.eos) + self._enc(t.turn_suffix)
            return (
                end
                + self._enc(t.turn_prefix["user"])
                + self._enc(user_text)
                + end
                + self._enc(t.turn_prefix["assistant"])
            )
        marker = "\u2063ASSISTANT\u2063"
        text = self.tokenizer.apply_chat_template(
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": marker},
                {"role": "user", "content": user_text},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        return self._enc(text[text.index(marker) + len(marker) :])

    def end_of_turn(self) -> list[int]:
        """Token ids that end an assistant turn (stop tokens for free-text answers)."""
        if self.template is not None:
            return self._enc(conv.get_template(self.template).eos)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [eos] if eos is not None else []


def stack_prompts(prompts: list[EncodedPrompt]):
    """Batch image arrays (B, I, tiles, 3, H, W) / (B, I, 2); zeros for rows
    without images; (None, None) when no row has one."""
    with_images = [p for p in prompts if p.pixel_values is not None]
    if not with_images:
        return None, None
    ref = with_images[0]
    pv = np.zeros((len(prompts), *ref.pixel_values.shape), np.float32)
    sizes = np.zeros((len(prompts), *ref.image_sizes.shape), np.int32)
    for b, p in enumerate(prompts):
        if p.pixel_values is not None:
            pv[b], sizes[b] = p.pixel_values, p.image_sizes
    return pv, sizes
