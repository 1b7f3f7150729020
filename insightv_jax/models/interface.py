"""The model interface that training and sampling program against.

Two protocols, each what its callers actually use:

  DecodingLM  what the sampler runs: input embeddings (images merged in for a
              VLM), a forward over new tokens against a KV cache (prefill and
              decode steps alike), the logits head, and the decoder's config.
              `sample.decode_transform` builds one from a `CausalLM`.
  CausalLM    a model as built and trained (`models.factory`): a DecodingLM
              that also gives the final hidden states of a training batch and
              the output projection, so that losses can apply the head in
              chunks (`train.losses`).

`Decoder` (text), `LlavaModel` and `QwenVL` (vision-language) are CausalLMs.
Names: `hidden_states` is always "final-normed hidden states (B, T, D) of a
batch of token ids"; `forward_cached` is always "new tokens against a cache".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

from insightv_jax.config import DecoderConfig
from insightv_jax.models.cache import KVCache


@runtime_checkable
class DecodingLM(Protocol):
    """The sampler's view of a model."""

    @property
    def decoder_config(self) -> DecoderConfig:
        """The text decoder's config (vocabulary, cache shapes, dtypes)."""
        ...

    def embed_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        image_sizes: jax.Array | None = None,
    ) -> jax.Array:
        """Input embeddings (B, T, D); a VLM writes image features at its
        image tokens (per-sample layout, see `models.llava`)."""
        ...

    def forward_cached(
        self,
        inputs_embeds: jax.Array,
        cache: KVCache,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Run new tokens (B, T, D) against `cache` (a right-padded chunk:
        `attention_mask` (B, T) marks the real ones); returns (final-normed
        hidden states (B, T, D), the cache with them appended). `positions`:
        a multimodal-RoPE model's ids of the chunk (3, B, T), counted from
        each row's next position (see `Decoder.forward_cached`); None for text."""
        ...

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 vocabulary logits (..., V) of hidden states (..., D)."""
        ...


@runtime_checkable
class CausalLM(DecodingLM, Protocol):
    """A model as built, trained and saved."""

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_sizes: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states (B, T, D) of a training batch (images
        in the per-sample layout); positions default to 0..T-1. A packed
        batch gives `segment_ids` (B, T) (k for its k-th record, 0 for
        padding) and positions that restart per record."""
        ...

    def batch_inputs(self, batch: dict) -> dict:
        """The keyword arguments of `hidden_states` beyond ids and mask that a
        training batch (a flat dict of batch-major arrays) carries for this
        model: its images, for a multimodal-RoPE model the positions, and for
        a packed batch its `segment_ids` and per-record positions."""
        ...

    def output_head(self) -> jax.Array:
        """The (D, V) output projection in the compute dtype."""
        ...
