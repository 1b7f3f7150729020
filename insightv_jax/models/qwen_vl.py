"""Qwen2-VL and Qwen2.5-VL: the vision tower (`models.qwen_vision`) feeding the
Qwen2 decoder with multimodal rotary positions (`models.mrope`).

A prompt marks each image or video as `vision_start`, one placeholder token
per merged 2x2 unit, `vision_end`. The processor packs a batch's items in
order; the k-th image placeholder of the batch (row-major over (B, T))
takes the k-th image token, the k-th video placeholder the k-th video token
(Hugging Face's `masked_scatter`). So each row owns the next items whose
tokens its placeholders number, and `pack_vision` regroups them by row: one
packed sequence per sample (its images, then its videos), all padded to one
length, so that images travel -- and shard -- with their samples. Images
and videos share one tower call: attention never crosses a frame, so
packing them together changes nothing.

Everything that depends on image sizes or prompt layout is computed on the
host by `pack_vision` and `rope_positions` (NumPy): the tower's layout, the
placeholder -> token index, the M-RoPE ids. Each sample's patches are padded
to a bucket (`patch_bucket`), so one compiled program serves every batch
whose samples fit it. `QwenVL.__call__` takes the Hugging Face processor's outputs as
keyword arguments and does both halves.

Cached decoding (`sample.Sampler`) takes a `VisionPrompt`: the processor's
vision outputs, laid out against each padded chunk of prompt ids by its
`pack`, which also gives the chunk's M-RoPE ids. The KV cache carries each
row's `rope_deltas`, so generated tokens continue after the prompt's largest
id (`Decoder.forward_cached`).

Shapes: B batch, T tokens, D the decoder's width, L patches per sample
(padded), M = L / 4 merged tokens per sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.models.cache import KVCache
from insightv_jax.models.decoder import Decoder, packed_inputs
from insightv_jax.models.mrope import get_rope_index, mm_token_types
from insightv_jax.models.qwen_vision import (
    QwenVisionTower,
    VisionLayout,
    merged_tokens,
    num_patches,
    pad_patches,
    vision_layout,
)
from insightv_jax.parallel import constrain_sharding

# ------------------------------------------------------------------ host side


class PackedVision(NamedTuple):
    """The images and videos of a batch as the device consumes them, one row
    per sample (a pytree of arrays; `pack_vision` builds it).

    `pixel_values` (B, L, C*T*p*p): each sample's images' then videos'
    patches, zero-padded to L. `layout`: each sample's `VisionLayout`,
    stacked (B, ...). `rows` (B, T) int32: the row of the sample's tower
    output whose token replaces each input token's embedding, -1 where the
    text embedding stays."""

    pixel_values: np.ndarray | jax.Array
    layout: VisionLayout
    rows: np.ndarray | jax.Array


def patch_bucket(n: int) -> int:
    """Padded patch count for `n` patches: the next power of two (at least
    64) up to 1024, then the next multiple of 1024 -- few compiled sizes for
    small images, at most ~1k wasted patches for large ones. Every bucket is a
    multiple of the 2x2 merge unit."""
    if n <= 1024:
        return max(64, 1 << max(0, n - 1).bit_length())
    return -(-n // 1024) * 1024


def _items_per_sample(hits: np.ndarray, tokens: np.ndarray, name: str) -> np.ndarray:
    """(B + 1,) item boundaries: sample b owns items [bounds[b], bounds[b+1]).
    Items go to samples in order (Hugging Face's `masked_scatter` over the
    batch), so each sample's placeholders must add up to whole items."""
    need = hits.sum(axis=1)
    if int(need.sum()) != int(tokens.sum()):
        raise ValueError(
            f"{int(need.sum())} {name} placeholder tokens in input_ids, but the {name}s "
            f"given have {int(tokens.sum())} merged tokens"
        )
    item_ends = np.concatenate([[0], np.cumsum(tokens)])
    sample_ends = np.concatenate([[0], np.cumsum(need)])
    bounds = np.searchsorted(item_ends, sample_ends)
    split = item_ends[np.minimum(bounds, len(item_ends) - 1)] != sample_ends
    if split.any():
        b = int(np.argmax(split)) - 1
        raise ValueError(
            f"row {b}: its {name} placeholder tokens end inside a {name} (each row's "
            f"placeholders must number its {name}s' merged tokens)"
        )
    return bounds


def pack_vision(
    cfg: ModelConfig,
    input_ids,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    num_slots: int | None = None,
) -> PackedVision | None:
    """Host side of the vision input: the batch's images (`pixel_values`
    (patches, C*T*p*p) with `image_grid_thw` (n, 3), as the processor packs
    them) and videos (likewise), split by sample, each sample's packed and
    padded to `num_slots` patches (default: `patch_bucket` of the largest
    sample) and laid out, with each placeholder's tower row. None when there
    are neither.

    Placeholders and items must agree (ValueError otherwise): the image
    placeholders of each row number its images' merged tokens, the video
    placeholders its videos'."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {ids.shape}")
    vcfg, tok = cfg.qwen_vision, cfg.qwen_vl
    merge = vcfg.spatial_merge_size
    B = ids.shape[0]
    rows = np.full(ids.shape, -1, np.int64)
    next_row = np.zeros(B, np.int64)  # each sample's next tower output row
    sample_pixels: list[list[np.ndarray]] = [[] for _ in range(B)]
    sample_grids: list[list[np.ndarray]] = [[] for _ in range(B)]
    items = (
        ("image", tok.image_token_id, pixel_values, image_grid_thw),
        ("video", tok.video_token_id, pixel_values_videos, video_grid_thw),
    )
    for name, token_id, px, grid in items:
        if (px is None) != (grid is None):
            raise ValueError(f"{name}s need both pixel values and a grid_thw (one is missing)")
        grid = np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid, np.int64)
        grid = grid.reshape(-1, 3)
        tokens = merged_tokens(grid, merge)
        hits = ids == token_id
        bounds = _items_per_sample(hits, tokens, name)
        # Sample-local tower rows: this kind's placeholders count from next_row.
        local = np.cumsum(hits, axis=1) - 1 + next_row[:, None]
        rows = np.where(hits, local, rows)
        next_row += hits.sum(axis=1)
        if px is None:
            continue
        px = np.asarray(px, np.float32)
        if px.ndim != 2 or px.shape != (num_patches(grid), vcfg.patch_dim):
            raise ValueError(
                f"{name} pixel values of shape {px.shape} do not fit grid_thw "
                f"(expects ({num_patches(grid)}, {vcfg.patch_dim}))"
            )
        patch_ends = np.concatenate([[0], np.cumsum(grid.prod(axis=1))])
        for b in range(B):
            lo, hi = bounds[b], bounds[b + 1]
            sample_pixels[b].append(px[patch_ends[lo] : patch_ends[hi]])
            sample_grids[b].append(grid[lo:hi])
    if pixel_values is None and pixel_values_videos is None:
        return None
    grids = [np.concatenate(g) for g in sample_grids]
    slots = patch_bucket(max(num_patches(g) for g in grids)) if num_slots is None else num_slots
    layouts = [vision_layout(g, vcfg, slots) for g in grids]
    return PackedVision(
        pixel_values=np.stack([pad_patches(np.concatenate(p), slots) for p in sample_pixels]),
        layout=VisionLayout(*(np.stack(field) for field in zip(*layouts))),
        rows=rows.astype(np.int32),
    )


def rope_positions(
    cfg: ModelConfig,
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    mm_token_type_ids=None,
) -> np.ndarray | None:
    """M-RoPE position ids (3, B, T) of a batch (`mrope.get_rope_index`), or
    None -- positions 0..T-1, padding included -- when it has no images or
    videos, as Hugging Face's uncached forward does. `mm_token_type_ids`
    default to the placeholder ids' types."""
    if image_grid_thw is None and video_grid_thw is None:
        return None
    if mm_token_type_ids is None:
        tok = cfg.qwen_vl
        mm_token_type_ids = mm_token_types(input_ids, tok.image_token_id, tok.video_token_id)
    vcfg = cfg.qwen_vision
    positions, _ = get_rope_index(
        mm_token_type_ids,
        spatial_merge_size=vcfg.spatial_merge_size,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        attention_mask=attention_mask,
        tokens_per_second=vcfg.tokens_per_second if cfg.kind == "qwen2_5_vl" else None,
        second_per_grid_ts=second_per_grid_ts,
    )
    return positions.astype(np.int32)


# Training batches carry the vision input flat and batch-major: a dict of
# arrays, each split over the data axes by its first dimension like the token
# rows (the loader, the micro-batch split and DPO's pair layout treat every
# key alike). `positions` are the M-RoPE ids as (B, 3, T).
VISION_KEYS = (
    "pixel_values", "vision_order", "vision_positions", "vision_full_segments",
    "vision_window_segments", "vision_restore", "vision_rows",
)  # fmt: skip
BATCH_KEYS = (*VISION_KEYS, "positions")


def batch_arrays(
    cfg: ModelConfig,
    input_ids,
    attention_mask,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    num_slots: int | None = None,
) -> dict[str, np.ndarray]:
    """The `BATCH_KEYS` arrays of a padded batch of token rows and the
    processor's outputs for its images and videos (in row order); {} when
    there are none (text rows take positions 0..T-1)."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    vision = pack_vision(
        cfg, np.where(mask > 0, ids, -1), pixel_values, image_grid_thw,
        pixel_values_videos, video_grid_thw, num_slots,
    )  # fmt: skip
    if vision is None:
        return {}
    positions = rope_positions(cfg, ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
    lay = vision.layout
    return {
        "pixel_values": vision.pixel_values,
        "vision_order": lay.order,
        "vision_positions": lay.positions,
        "vision_full_segments": lay.full_segments,
        "vision_window_segments": lay.window_segments,
        "vision_restore": lay.restore,
        "vision_rows": vision.rows,
        "positions": np.ascontiguousarray(positions.transpose(1, 0, 2)),
    }


def _gathered(examples: list[dict], grid_key: str, keys: tuple[str, ...]) -> list:
    """Each of `keys` concatenated over the examples that have `grid_key`, in
    order (None each when none has)."""
    having = [e for e in examples if grid_key in e]
    return [np.concatenate([e[k] for e in having]) if having else None for k in keys]


class BatchImages:
    """The image and video arrays of a padded batch of Qwen-VL training
    examples (the training transform's `pixel_values` / `image_grid_thw` and
    `pixel_values_videos` / `video_grid_thw` / `second_per_grid_ts` per
    example): every example's patches and grids in order, laid out per row
    with the M-RoPE ids, video time steps included (`batch_arrays`). The
    loader's `Collate` calls it (picklable)."""

    def __init__(self, model_cfg: ModelConfig, num_slots: int | None = None):
        self.cfg, self.num_slots = model_cfg, num_slots

    def padded_alike(self, examples: list[dict]) -> BatchImages:
        """The same, padding every row to the patch bucket of the largest of
        `examples` (DPO's chosen and rejected sides stack into one array)."""
        patches = [
            len(e.get("pixel_values", ())) + len(e.get("pixel_values_videos", ()))
            for e in examples
            if "image_grid_thw" in e or "video_grid_thw" in e
        ]
        return BatchImages(self.cfg, patch_bucket(max(patches)) if patches else None)

    def record_positions(self, example: dict) -> np.ndarray:
        """One training example's M-RoPE ids (3, L) computed alone, as a
        packed row (`data.packing`) needs them: counted from 0, its images'
        and videos' grids included; three equal 0..L-1 for text."""
        ids = np.asarray(example["input_ids"])[None]
        positions = rope_positions(
            self.cfg, ids, np.ones_like(ids), example.get("image_grid_thw"),
            example.get("video_grid_thw"), example.get("second_per_grid_ts"),
        )  # fmt: skip
        if positions is None:
            return np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), (3, ids.shape[1]))
        return positions[:, 0]

    def __call__(self, examples: list[dict], input_ids, attention_mask) -> dict[str, np.ndarray]:
        pixels, grids = _gathered(examples, "image_grid_thw", ("pixel_values", "image_grid_thw"))
        videos, video_grids, seconds = _gathered(
            examples,
            "video_grid_thw",
            ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
        )
        if grids is None and video_grids is None:
            return {}
        return batch_arrays(
            self.cfg, input_ids, attention_mask, pixels, grids, videos, video_grids, seconds,
            num_slots=self.num_slots,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VisionPrompt:
    """The images and videos of a prompt chunk as the processor gives them
    (its outputs of these names), for `Sampler.extend(vision=...)`: the
    sampler pads the chunk's ids and calls `pack`. `QwenVL.vision_prompt`
    builds one."""

    cfg: ModelConfig
    pixel_values: Any = None
    image_grid_thw: Any = None
    pixel_values_videos: Any = None
    video_grid_thw: Any = None
    second_per_grid_ts: Any = None

    def pack(self, input_ids, attention_mask) -> tuple[PackedVision | None, np.ndarray | None]:
        """(`embed_inputs`' `PackedVision`, M-RoPE ids (3, B, T) counted from
        the chunk's start, as `forward_cached` takes them) for a chunk of ids
        (B, T) whose `attention_mask` marks the real tokens (padding anywhere;
        its ids are never read as placeholders)."""
        mask = np.asarray(attention_mask)
        ids = np.where(mask > 0, np.asarray(input_ids), -1)
        vision = pack_vision(
            self.cfg, ids, self.pixel_values, self.image_grid_thw,
            self.pixel_values_videos, self.video_grid_thw,
        )  # fmt: skip
        positions = rope_positions(
            self.cfg, ids, mask, self.image_grid_thw, self.video_grid_thw, self.second_per_grid_ts
        )
        return vision, positions


# ---------------------------------------------------------------- the model


class QwenVL(nnx.Module):
    """Qwen2-VL / Qwen2.5-VL: `vision` (the tower) + `decoder` (Qwen2 with
    `mrope_section`); no projector (the tower's merger ends in the decoder's
    width).

    `attention_impl` / `vision_attention_impl`: the decoder's and the tower's
    attention implementations (`attention.resolve`)."""

    def __init__(self, cfg: ModelConfig, *, attention_impl: str, vision_attention_impl: str,
                 rngs: nnx.Rngs):  # fmt: skip
        cfg.validate()
        self.cfg = cfg
        self.vision = QwenVisionTower(cfg.qwen_vision, attention_impl=vision_attention_impl,
                                      rngs=rngs)  # fmt: skip
        self.decoder = Decoder(cfg.decoder, attention_impl=attention_impl, rngs=rngs)

    @property
    def decoder_config(self) -> DecoderConfig:
        return self.cfg.decoder

    def embed_inputs(
        self, input_ids, pixel_values: PackedVision | None = None, image_sizes=None
    ) -> jax.Array:
        """Token embeddings (B, T, D) with the tower's tokens written over the
        placeholders. `pixel_values`: the batch's `PackedVision` (the
        `CausalLM` slot for images); `image_sizes` is LLaVA's and must be None."""
        if image_sizes is not None:
            raise ValueError("Qwen-VL takes no image_sizes (the grids are in PackedVision)")
        embeds = self.decoder.embed_tokens(jnp.asarray(input_ids))
        if pixel_values is None:
            return embeds
        vision = pixel_values
        tokens = self.vision(jnp.asarray(vision.pixel_values), vision.layout)  # (B, M, D)
        rows = jnp.asarray(vision.rows)
        index = jnp.clip(rows, 0, tokens.shape[1] - 1)[..., None]
        picked = jnp.take_along_axis(tokens, index, axis=1)
        merged = jnp.where(rows[..., None] >= 0, picked.astype(embeds.dtype), embeds)
        return constrain_sharding(merged, "act_batch", "act_length", "act_embed")

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        pixel_values=None,
        image_sizes=None,
        segment_ids=None,
    ) -> jax.Array:
        """Final-normed hidden states (B, T, D); `positions` (3, B, T) M-RoPE
        ids (`rope_positions`), (B, T), or None (0..T-1); `pixel_values` a
        `PackedVision` or None (see `embed_inputs`)."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        return self.decoder.hidden_from_embeds(embeds, attention_mask, positions, segment_ids)

    @staticmethod
    def batch_inputs(batch: dict) -> dict:
        """`hidden_states`' keyword arguments from a training batch
        (`batch_arrays`' keys): the `PackedVision` and the M-RoPE ids back in
        the (3, B, T) order, and a packed batch's `segment_ids`; {} for an
        unpacked batch without images."""
        packed = packed_inputs(batch)  # per-record positions (and segments)
        if "vision_rows" not in batch:
            return packed
        layout = VisionLayout(
            batch["vision_order"], batch["vision_positions"], batch["vision_full_segments"],
            batch["vision_window_segments"], batch["vision_restore"],
        )  # fmt: skip
        return {
            "positions": jnp.moveaxis(jnp.asarray(batch["positions"]), 1, 0),
            "pixel_values": PackedVision(batch["pixel_values"], layout, batch["vision_rows"]),
            **packed,
        }

    def forward_cached(
        self, inputs_embeds, cache: KVCache, attention_mask=None, positions=None
    ) -> tuple[jax.Array, KVCache]:
        """New tokens against a KV cache (`Decoder.forward_cached`): `positions`
        the chunk's M-RoPE ids (3, B, T) counted from each row's next position
        (`VisionPrompt.pack`), or None for text, which continues after the
        row's largest id (the cache's `rope_deltas`)."""
        return self.decoder.forward_cached(inputs_embeds, cache, attention_mask, positions)

    def vision_prompt(
        self,
        *,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
    ) -> VisionPrompt:
        """The processor's vision outputs (by name) as a `VisionPrompt` for
        `Sampler.extend` / `Sampler.generate`."""
        return VisionPrompt(
            self.cfg, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
            second_per_grid_ts,
        )  # fmt: skip

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.decoder.logits(hidden)

    def output_head(self) -> jax.Array:
        return self.decoder.output_head()

    def __call__(
        self,
        *,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        mm_token_type_ids=None,
    ) -> jax.Array:
        """fp32 logits (B, T, V) of the Hugging Face processor's outputs, given
        by name (`model(**inputs)`; NumPy or anything `np.asarray` takes).

        The host packs the vision input and computes the M-RoPE ids; the
        forward runs jitted, compiled once per (B, T, patch bucket).
        `mm_token_type_ids` default to the types of the placeholder ids."""
        ids = np.asarray(input_ids)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        vision = pack_vision(
            self.cfg, ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        positions = rope_positions(
            self.cfg, ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
            None if mm_token_type_ids is None else np.asarray(mm_token_type_ids),
        )  # fmt: skip
        return _forward_logits(self, ids, mask, positions, vision)


@nnx.jit
def _forward_logits(model, input_ids, attention_mask, positions, vision):
    return model.logits(model.hidden_states(input_ids, attention_mask, positions, vision))
