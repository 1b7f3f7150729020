"""The vision-language model: LLaVA-1.5 (single view) and LLaVA-NeXT (anyres).

vision tower -> feature layer (CLS dropped or kept) -> `mlp2x_gelu` projector
-> per-image feature sequence (anyres: base view, unpadded tile grid with an
`image_newline` per row) -> written into the token embeddings at the positions
of the image-token id -> the decoder.

Two batch layouts:
  per-sample (training, `hidden_states`): pixel_values (B, I, tiles, 3, H, W),
    image_sizes (B, I, 2) (height, width; 0,0 = empty slot). Sample b's image
    tokens are filled by its slots 0..I-1 in order.
  Hugging Face processor layout (`__call__`, parity): LLaVA-NeXT pixel_values
    (images, tiles, 3, H, W) and image_sizes (images, 2); LLaVA (images, 3, H, W);
    the images of the whole batch in `<image>` order. `to_sample_layout`
    converts on the host and checks token counts.
Everything inside jit has static shapes (see `anyres.feature_index`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insightv_jax import vision_grid
from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.errors import DataError
from insightv_jax.models import anyres
from insightv_jax.models.cache import KVCache
from insightv_jax.models.decoder import Decoder, packed_inputs
from insightv_jax.models.linear import dense, param, zeros
from insightv_jax.models.vision import VisionTower
from insightv_jax.parallel import constrain_sharding


class Projector(nnx.Module):
    """`mlp2x_gelu`: Linear -> GELU (erf) -> Linear, vision width -> text width."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        Dv, D = cfg.vision.hidden_size, cfg.decoder.hidden_size
        pd = jnp.dtype(cfg.decoder.param_dtype)
        self.dtype = jnp.dtype(cfg.decoder.dtype)
        self.use_bias = cfg.llava.projector_bias
        self.linear_1 = param(rngs, (Dv, D), ("vision_embed", "mlp"), pd)
        self.linear_2 = param(rngs, (D, D), ("mlp", "embed"), pd)
        if self.use_bias:
            self.bias_1 = zeros((D,), ("mlp",), pd)
            self.bias_2 = zeros((D,), ("embed",), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = dense(x.astype(dt), self.linear_1[...].astype(dt))
        if self.use_bias:
            h = h + self.bias_1[...].astype(dt)
        h = jax.nn.gelu(h, approximate=False)
        y = dense(h, self.linear_2[...].astype(dt))
        return y + self.bias_2[...].astype(dt) if self.use_bias else y


def merge_image_features(embeds, input_ids, features, counts, image_token_id: int):
    """Write image features into the embeddings at the image-token positions.

    embeds (B, T, D); features (B, I, F, D) with counts (B, I) valid rows per
    slot; the k-th image token of sample b takes the k-th valid feature of
    slots 0..I-1 concatenated.
    """
    B, n_img, F, D = features.shape
    is_image = input_ids == image_token_id
    rank = jnp.cumsum(is_image, axis=1) - 1  # (B, T)
    ends = jnp.cumsum(counts, axis=1)  # (B, I)
    slot = jnp.sum(rank[..., None] >= ends[:, None, :], axis=-1)
    slot = jnp.clip(slot, 0, n_img - 1)
    start = jnp.take_along_axis(ends - counts, slot, axis=1)
    row = jnp.clip(rank - start, 0, F - 1)
    flat = features.reshape(B, n_img * F, D)
    gathered = jnp.take_along_axis(flat, (slot * F + row)[..., None], axis=1, mode="clip")
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class LlavaModel(nnx.Module):
    """Vision tower + projector (+ image_newline for anyres) + decoder.

    `attention_impl` / `vision_attention_impl`: the decoder's and the vision
    tower's attention implementations (see `attention.resolve`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        attention_impl: str,
        vision_attention_impl: str,
        rngs: nnx.Rngs,
    ):
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, attention_impl=vision_attention_impl, rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.decoder = Decoder(cfg.decoder, attention_impl=attention_impl, rngs=rngs)
        if cfg.kind == "llava_next":
            D = cfg.decoder.hidden_size
            pd = jnp.dtype(cfg.decoder.param_dtype)
            self.image_newline = param(rngs, (D,), ("embed",), pd, std=1 / math.sqrt(D))

    @property
    def decoder_config(self) -> DecoderConfig:
        return self.cfg.decoder

    # ------------------------------------------------------------- images

    def tile_features(self, tiles: jax.Array) -> jax.Array:
        """(N, 3, H, W) tiles -> (N, per_tile, D) projected features."""
        hidden = self.vision.hidden_state(tiles, self.cfg.llava.feature_layer)
        if self.cfg.llava.feature_strategy == "default":
            hidden = hidden[:, 1:]
        return self.projector(hidden)

    def image_features(self, pixel_values: jax.Array, image_sizes: jax.Array):
        """Per-sample layout -> (features (B, I, F_max, D), counts (B, I))."""
        B, n_img, S = pixel_values.shape[:3]
        feats = self.tile_features(pixel_values.reshape(B * n_img * S, *pixel_values.shape[3:]))
        D = feats.shape[-1]
        table = feats.reshape(B, n_img, S * feats.shape[1], D)
        if self.cfg.kind == "llava_next":
            newline = jnp.broadcast_to(
                self.image_newline[...].astype(table.dtype), (B, n_img, 1, D)
            )
            table = jnp.concatenate([table, newline], axis=2)
        index, counts = anyres.feature_index(image_sizes, self.cfg, S)
        out = jnp.take_along_axis(table, index[..., None], axis=2, mode="clip")
        return out, counts

    def embed_inputs(self, input_ids, pixel_values=None, image_sizes=None) -> jax.Array:
        """Token embeddings (B, T, D) with image features merged in (per-sample layout)."""
        ids = jnp.asarray(input_ids)
        image_id = self.cfg.llava.image_token_id
        text_ids = jnp.where(ids == image_id, 0, ids)  # the id may lie outside the vocabulary
        embeds = self.decoder.embed_tokens(text_ids)
        if pixel_values is None:
            return embeds
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be (B, images, tiles, 3, H, W), got shape {pixel_values.shape}"
            )
        if image_sizes is None:
            B, n_img = pixel_values.shape[:2]
            t = self.cfg.vision.image_size
            image_sizes = jnp.full((B, n_img, 2), t, jnp.int32)
        if not isinstance(input_ids, jax.core.Tracer) and not isinstance(
            image_sizes, jax.core.Tracer
        ):
            check_image_tokens(np.asarray(input_ids), np.asarray(image_sizes), self.cfg)
        feats, counts = self.image_features(pixel_values, jnp.asarray(image_sizes))
        merged = merge_image_features(embeds, ids, feats, counts, image_id)
        return constrain_sharding(merged, "act_batch", "act_length", "act_embed")

    # ------------------------------------------------------------ decoder

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        pixel_values=None,
        image_sizes=None,
        segment_ids=None,
    ) -> jax.Array:
        """Final-normed hidden states (B, T, D) for the per-sample batch layout."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        return self.decoder.hidden_from_embeds(embeds, attention_mask, positions, segment_ids)

    @staticmethod
    def batch_inputs(batch: dict) -> dict:
        """`hidden_states`' image arguments from a training batch (its
        per-sample `pixel_values` / `image_sizes`; {} for a text batch)."""
        packed = packed_inputs(batch)
        if "pixel_values" not in batch:
            return packed
        images = {"pixel_values": batch["pixel_values"], "image_sizes": batch.get("image_sizes")}
        return {**images, **packed}

    def forward_cached(
        self, inputs_embeds, cache: KVCache, attention_mask=None, positions=None
    ) -> tuple[jax.Array, KVCache]:
        """New tokens' embeddings against a KV cache (see `Decoder.forward_cached`;
        `positions` are M-RoPE's, so always None here)."""
        return self.decoder.forward_cached(inputs_embeds, cache, attention_mask, positions)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.decoder.logits(hidden)

    def output_head(self) -> jax.Array:
        return self.decoder.output_head()

    def __call__(
        self, *, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, **unexpected
    ):
        """fp32 logits (B, T, V) of the Hugging Face processor's outputs, given
        by name: `model(**processor(images=..., text=..., return_tensors="np"))`
        (NumPy or anything `np.asarray` takes).

        The keys are those `LlavaProcessor` returns (`input_ids`,
        `attention_mask`, `pixel_values` (images, 3, H, W)) and
        `LlavaNextProcessor` returns (also `image_sizes`; `pixel_values`
        (images, tiles, 3, H, W)); `ImageProcessor` (`hf.load_pretrained`)
        gives `pixel_values` and `image_sizes` for both kinds. Any other key
        (say `mm_token_type_ids`, which these processors return only when asked
        to with `return_mm_token_type_ids=True`) is a TypeError naming it. Token
        counts are checked on the host, the forward runs jitted."""
        if unexpected:
            raise TypeError(
                f"{type(self).__name__}() got unexpected input(s) {', '.join(sorted(unexpected))}"
                ": it takes input_ids, attention_mask, pixel_values and image_sizes"
            )
        input_ids = np.asarray(input_ids)
        if pixel_values is not None:
            pixel_values, image_sizes = to_sample_layout(
                input_ids, np.asarray(pixel_values), image_sizes, self.cfg
            )
        elif (input_ids == self.cfg.llava.image_token_id).any():
            raise DataError(
                f"sample {int(np.flatnonzero((input_ids == self.cfg.llava.image_token_id).any(1))[0])}"
                ": image tokens in input_ids but no pixel_values were given"
            )
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
        return _forward_logits(self, input_ids, attention_mask, pixel_values, image_sizes)


@nnx.jit
def _forward_logits(model, input_ids, attention_mask, pixel_values, image_sizes):
    hidden = model.hidden_states(input_ids, attention_mask, None, pixel_values, image_sizes)
    return model.logits(hidden)


# ------------------------------------------------------------ host checks


def image_token_counts(image_sizes: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Image tokens each slot needs: image_sizes (..., 2) -> (...) ints (0 for empty slots)."""
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    out = [
        vision_grid.num_image_tokens((int(h), int(w)), cfg) if h > 0 and w > 0 else 0
        for h, w in sizes
    ]
    return np.asarray(out, np.int64).reshape(np.shape(image_sizes)[:-1])


def check_image_tokens(input_ids: np.ndarray, image_sizes: np.ndarray, cfg: ModelConfig) -> None:
    """Raise a one-line DataError naming the sample whose image tokens do not match its images."""
    found = (np.asarray(input_ids) == cfg.llava.image_token_id).sum(axis=1)
    need = image_token_counts(image_sizes, cfg).sum(axis=1)
    for b in np.flatnonzero(found != need):
        n_img = int((np.asarray(image_sizes)[b] > 0).all(-1).sum())
        raise DataError(
            f"sample {b}: {found[b]} image tokens in input_ids but its {n_img} image(s) "
            f"need {need[b]} (more or fewer <image> placeholders than images?)"
        )


def to_sample_layout(input_ids: np.ndarray, pixel_values: np.ndarray, image_sizes, cfg):
    """Hugging Face processor layout -> per-sample padded layout (host side).

    Images are assigned to samples in order by their image-token counts; a
    mismatch is a DataError naming the sample.
    """
    ids = np.asarray(input_ids)
    pix = np.asarray(pixel_values, np.float32)
    if cfg.kind == "llava":
        pix = pix[:, None]  # (images, 1 tile, 3, H, W)
    if pix.ndim != 5:
        raise DataError(f"pixel_values has shape {pix.shape}; expected (images, tiles, 3, H, W)")
    n_images = pix.shape[0]
    if image_sizes is None:
        t = cfg.vision.image_size
        sizes = np.full((n_images, 2), t, np.int64)
    else:
        sizes = np.asarray(image_sizes).reshape(n_images, 2)
    per_image = image_token_counts(sizes, cfg)
    found = (ids == cfg.llava.image_token_id).sum(axis=1)
    owner: list[list[int]] = [[] for _ in range(ids.shape[0])]
    k = 0
    for b, n in enumerate(found):
        got = 0
        while got < n and k < n_images:
            got += per_image[k]
            owner[b].append(k)
            k += 1
        if got != n:
            raise DataError(
                f"sample {b}: {n} image tokens in input_ids do not match the images "
                f"given ({got} tokens for images {owner[b]} of {n_images})"
            )
    if k != n_images:
        raise DataError(f"{n_images - k} image(s) left over: no <image> tokens for image {k}")
    n_img = max(1, max(len(o) for o in owner))
    S = vision_grid.max_tiles(cfg)
    out = np.zeros((ids.shape[0], n_img, S, *pix.shape[2:]), np.float32)
    out_sizes = np.zeros((ids.shape[0], n_img, 2), np.int32)
    for b, imgs in enumerate(owner):
        for i, k in enumerate(imgs):
            need = vision_grid.num_tiles(tuple(sizes[k]), cfg)
            if need > pix.shape[1]:
                raise DataError(f"image {k}: needs {need} tiles, pixel_values has {pix.shape[1]}")
            out[b, i, :need] = pix[k, :need]
            out_sizes[b, i] = sizes[k]
    return out, out_sizes
