"""The training transform: a LLaVA record -> one example of the batch format.

It renders the conversation with the model's chat template
(`data.conversation.render`: labels only on assistant content), expands each
`<image>` to the number of image tokens the model consumes for that image's
size, and preprocesses images exactly like the Hugging Face processor. It is
picklable (grain workers): the tokenizer and processor load lazily from paths.

Qwen-VL examples carry their images as the processor packs them
(`pixel_values` (patches, C*T*p*p), `image_grid_thw` (n, 3)), and a record's
videos (`data.validate`'s `video` field: frames and a rate) likewise
(`pixel_values_videos`, `video_grid_thw` (v, 3), `second_per_grid_ts` (v,)),
each `<video>` rendered as `<|vision_start|>`, one `<|video_pad|>` per merged
token of the video, `<|vision_end|>`; the transform's
`batch_images` (`models.qwen_vl.BatchImages`, given by whoever builds the
transform: `models.factory.batch_images`) lays a batch of them out for the
model once the token rows are padded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from insightv_jax.config import ModelConfig
from insightv_jax.data import conversation as conv
from insightv_jax.data.images import ImageProcessor, pack_samples
from insightv_jax.data.qwen_images import QwenImageProcessor
from insightv_jax.data.validate import Limits, load_image_size, record_videos, video_fps
from insightv_jax.errors import DataError
from insightv_jax.vision_grid import num_image_tokens

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA `{from, value}` turns -> chat `{role, content}` messages."""
    out = []
    for turn in conversations:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise DataError(f"turn role {turn.get('from')!r} is not human/gpt/system")
        out.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
    return out


def record_images(rec: dict) -> list:
    img = rec.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


class ChatTransform:
    """`record -> {input_ids, labels[, images]}`: LLaVA images as
    `pixel_values` (I, tiles, 3, H, W) and `image_sizes` (I, 2); Qwen-VL's as
    `pixel_values` (patches, C*T*p*p) and `image_grid_thw` (n, 3), its videos
    as `pixel_values_videos`, `video_grid_thw` (v, 3), `second_per_grid_ts` (v,)."""

    def __init__(
        self,
        tokenizer_dir: str | Path,
        template: str,
        model_cfg: ModelConfig,
        root: str | Path,
        batch_images=None,
    ):
        self.tokenizer_dir = str(tokenizer_dir)
        self.template = template
        self.cfg = model_cfg
        self.root = Path(root)
        self._tok = self._proc = None
        self._image_tokens: dict[tuple[int, int], int] = {}
        self._videos_checked = False  # the tokenizer's video id, checked on the first video
        self.image_span = conv.image_span_for(model_cfg)
        # the batch side of the images (Collate's `images`): Qwen-VL lays them
        # out per row; None stacks LLaVA's per-sample arrays
        self.batch_images = batch_images

    def __getstate__(self):
        return {**self.__dict__, "_tok": None, "_proc": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            tok = conv.load_tokenizer(self.tokenizer_dir)
            conv.check_image_span(tok, self.cfg, self.tokenizer_dir)
            self._tok = tok
        return self._tok

    @property
    def processor(self):
        if self._proc is None:
            if self.cfg.is_qwen_vl:
                self._proc = QwenImageProcessor.for_model(self.cfg)
            else:
                self._proc = ImageProcessor.for_model(self.cfg)
        return self._proc

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Image features an image of `size` (height, width) becomes (the
        placeholders between a Qwen-VL image's start and end tokens)."""
        size = tuple(int(x) for x in size)
        if size not in self._image_tokens:  # validation asks for every record
            if self.cfg.is_qwen_vl:
                self._image_tokens[size] = self.processor.num_tokens(*size)
            else:
                self._image_tokens[size] = num_image_tokens(size, self.cfg)
        return self._image_tokens[size]

    def video_tokens(self, frames: int, size: tuple[int, int]) -> int:
        """Video features (placeholders) a video of `frames` frames of `size`
        (height, width) becomes; Qwen-VL models only."""
        return self.processor.num_video_tokens(int(frames), *(int(x) for x in size))

    def _render(self, rec: dict, counts: list[int], video_counts=()):
        return conv.render(
            to_messages(rec["conversations"]), self.tokenizer, self.template, counts,
            name=f"record {rec.get('id')}", image_span=self.image_span,
            num_video_tokens=video_counts,
        )  # fmt: skip

    def _videos(self, videos: list, name: str) -> dict[str, np.ndarray]:
        """The processor's arrays for a record's videos, concatenated in order."""
        if not self.cfg.is_qwen_vl:
            raise DataError(f"{name}: has a video, but model kind {self.cfg.kind!r} takes no "
                            "videos (only Qwen-VL models do)")  # fmt: skip
        if not self._videos_checked:
            conv.check_image_span(self.tokenizer, self.cfg, self.tokenizer_dir, videos=True)
            self._videos_checked = True
        parts = [
            self.processor.video(
                [self.root / f for f in v["frames"]], video_fps(v), f"{name} video {k}"
            )
            for k, v in enumerate(videos)
        ]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def __call__(self, rec: dict) -> dict[str, np.ndarray]:
        name = f"record {rec.get('id')}"
        images = record_images(rec)
        out: dict[str, np.ndarray] = {}
        counts: list[int] = []
        video_counts: list[int] = []
        if videos := record_videos(rec):
            out.update(self._videos(videos, name))
            merge = self.processor.merge_size**2
            video_counts = [int(g.prod()) // merge for g in out["video_grid_thw"]]
        named = [
            (self.root / p if isinstance(p, str) else p, f"{name} image {k}")
            for k, p in enumerate(images)
        ]
        if self.cfg.is_vlm:
            pv, sizes = pack_samples([named], self.processor, self.cfg)
            out["pixel_values"], out["image_sizes"] = pv[0], sizes[0]
            counts = [self.image_tokens(s) for s in sizes[0][: len(images)]]
        elif self.cfg.is_qwen_vl:
            if images:
                out.update(self.processor([p for p, _ in named], [n for _, n in named]))
                merge = self.processor.merge_size**2
                counts = [int(g.prod()) // merge for g in out["image_grid_thw"]]
        elif images:
            raise DataError(f"{name}: has an image but the model is text-only")
        ids, labels = self._render(rec, counts, video_counts)
        out["input_ids"] = np.asarray(ids, np.int32)
        out["labels"] = np.asarray(labels, np.int32)
        return out

    def length(self, rec: dict) -> int:
        """The token count `__call__` gives `rec` (image sizes as validation
        measured them): what length-grouped batching sorts by."""
        counts = []
        if self.cfg.takes_images:
            for p in record_images(rec):
                is_path = isinstance(p, (str, Path))
                size = load_image_size(self.root / p) if is_path else np.asarray(p).shape[:2]
                counts.append(self.image_tokens(size))
        video_counts = [
            self.video_tokens(len(v["frames"]), load_image_size(self.root / v["frames"][0]))
            for v in record_videos(rec)
        ]
        ids, _ = self._render(rec, counts, video_counts)
        return len(ids)

    def limits(self, max_length: int) -> Limits:
        """Validation limits that count tokens exactly as this transform does."""
        tok = self.tokenizer

        @functools.lru_cache(maxsize=1 << 16)  # datasets repeat questions and answers
        def count_tokens(text: str) -> int:
            return len(conv.encode_text(tok, text))

        def count_conversation(conversation: list[dict], image_counts, video_counts=()) -> int:
            ids, _ = conv.render(to_messages(conversation), tok, self.template,
                                 list(image_counts), image_span=self.image_span,
                                 num_video_tokens=list(video_counts))  # fmt: skip
            return len(ids)

        return Limits(
            max_length=max_length,
            image_tokens=self.image_tokens if self.cfg.takes_images else 0,
            count_tokens=count_tokens,
            turn_overhead=4,
            count_conversation=count_conversation,
            video_tokens=self.video_tokens if self.cfg.is_qwen_vl else None,
        )
