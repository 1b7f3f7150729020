"""Prompts as token ids (and image arrays) for generation.

With one of our chat templates (llama3, chatml, minimal — detected from the
tokenizer's special tokens) prompts are rendered by `data.conversation`, token
for token as in training. Any other tokenizer falls back to its own Hugging
Face chat template. `<image>` placeholders expand to as many image tokens as
the model consumes for each image's size (Qwen-VL: between its vision start
and end tokens).

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
from insightv_jax.errors import DataError
from insightv_jax.vision_grid import num_image_tokens


@dataclasses.dataclass
class EncodedPrompt:
    """A prompt's ids and images: LLaVA's `pixel_values` (I, tiles, 3, H, W)
    with `image_sizes` (I, 2), or Qwen-VL's `pixel_values` (patches, C*T*p*p)
    with `image_grid_thw` (I, 3)."""

    ids: list[int]
    pixel_values: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None


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

    def prompt(self, messages: list[dict], images=(), name: str = "prompt") -> EncodedPrompt:
        """A generation prompt: the messages, then the assistant header."""
        pv, sizes, counts = self.image_inputs(list(images), name)
        placeholders = sum(str(m.get("content", "")).count(conv.IMAGE_TOKEN) for m in messages)
        if placeholders != len(counts):
            raise DataError(f"{name}: {placeholders} <image> placeholders but {len(counts)} images")
        if self.template is not None:
            ids = conv.render_prompt(messages, self.tokenizer, self.template, counts,
                                     self.image_span)  # fmt: skip
        else:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = self._expand(text, counts)
        if self.model_cfg is not None and self.model_cfg.is_qwen_vl:
            return EncodedPrompt(ids, pv, image_grid_thw=sizes)
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

            rows = [e for e in encoded if e.image_grid_thw is not None]
            if not rows:
                return {}
            return {
                "vision": VisionPrompt(
                    self.model_cfg,
                    pixel_values=np.concatenate([e.pixel_values for e in rows]),
                    image_grid_thw=np.concatenate([e.image_grid_thw for e in rows]),
                )
            }
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
