"""The Llama-3 / Qwen2 family decoder in Flax NNX.

Read top to bottom: RMSNorm, attention (rotary embeddings in `rope.py`),
SwiGLU MLP, one pre-norm block, and the decoder that embeds tokens, scans the
stacked blocks, normalises and projects to the vocabulary.

Each module has one parameter layout, the one checkpoints store. Decoding's
specialisations (unstacked blocks, fused projections, packed weights) are
built from these weights by `sample.decode_transform`, as modules of its own.

Shapes: B batch, T tokens, D hidden, N query heads, K key/value heads, H head
dim, F MLP width, V vocabulary. Every parameter carries logical axis names
(see `parallel.LOGICAL_RULES`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from insightv_jax.config import DecoderConfig
from insightv_jax.models.attention import attention
from insightv_jax.models.cache import KVCache, write_rows
from insightv_jax.models.linear import dense, param, zeros
from insightv_jax.models.mrope import mrope_cos_sin
from insightv_jax.models.rope import apply_rope, decoder_inv_freq, rope_cos_sin
from insightv_jax.models.stack import layer_modules, scan_layers, stack_layers
from insightv_jax.parallel import constrain_sharding


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


# ------------------------------------------------------------ attention, MLP


class Attention(nnx.Module):
    """Grouped-query self-attention with optional q/k/v (and output) bias.

    `attention_impl`: the attention implementation (`attention.resolve` of
    `cfg.attention` and the platform)."""

    def __init__(self, cfg: DecoderConfig, *, attention_impl: str, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.attention_impl = attention_impl
        self.q_proj = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = zeros((N, H), ("heads", "head_dim"), pd)
            self.k_bias = zeros((K, H), ("kv_heads", "head_dim"), pd)
            self.v_bias = zeros((K, H), ("kv_heads", "head_dim"), pd)
        if cfg.o_bias:
            self.o_bias = zeros((D,), ("embed",), pd)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, T, D) -> q (B, T, N, H), k and v (B, T, K, H), biases added."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = dense(x, self.q_proj[...].astype(dt))
        k = dense(x, self.k_proj[...].astype(dt))
        v = dense(x, self.v_proj[...].astype(dt))
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        return q, k, v

    def project_out(self, out: jax.Array) -> jax.Array:
        """Attention output (B, T, N, H) -> (B, T, D), bias added."""
        dt = jnp.dtype(self.cfg.dtype)
        y = dense(out, self.o_proj[...].astype(dt), axes=2)
        if self.cfg.o_bias:
            y = y + self.o_bias[...].astype(dt)
        return y

    def _queries_keys_values(self, x, rope):
        q, k, v = self.project_qkv(x)
        q = constrain_sharding(apply_rope(q, rope), "act_batch", "act_length", "act_heads", None)
        k = constrain_sharding(apply_rope(k, rope), "act_batch", "act_length", "act_kv_heads", None)
        return q, k, v

    def _attend(self, q, k, v, positions, kv_positions, kv_valid, heads_major: bool, segments=None):
        dt = jnp.dtype(self.cfg.dtype)
        return attention(
            q,
            k.astype(dt),
            v.astype(dt),
            positions,
            kv_positions,
            kv_valid,
            causal=True,
            backend=self.attention_impl,
            block_size=self.cfg.attention_block_size,
            heads_major=heads_major,
            q_segment_ids=segments,
        )

    def __call__(self, x, positions, rope, kv_valid, segment_ids=None) -> jax.Array:
        """Self-attention over x (B, T, D) at `positions` (B, T), rotated by
        `rope` (`rope_cos_sin` of those positions); `kv_valid` (B, T) marks
        real tokens; `segment_ids` (B, T), if given, keep packed records apart."""
        q, k, v = self._queries_keys_values(x, rope)
        out = self._attend(q, k, v, positions, positions, kv_valid, False, segment_ids)
        return self.project_out(out)

    def cached(self, x, positions, rope, slot_valid, offsets, layer_kv):
        """Self-attention of new tokens x (B, T, D) over a KV cache: this
        layer's (k, v), each (B, K, S, H), get the new keys/values written in
        place at [row, offsets[row]...], attention runs over the cache slots
        (`slot_valid` (B, S)). Returns (y, (k, v))."""
        q, k, v = self._queries_keys_values(x, rope)
        k = write_rows(layer_kv[0], k, offsets)
        v = write_rows(layer_kv[1], v, offsets)
        slots = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), slot_valid.shape)
        out = self._attend(q, k, v, positions, slots, slot_valid, heads_major=True)
        return self.project_out(out), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = param(rngs, (D, F), ("embed", "mlp"), pd)
        self.up_proj = param(rngs, (D, F), ("embed", "mlp"), pd)
        self.down_proj = param(rngs, (F, D), ("mlp", "embed"), pd)

    def project_gate_up(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> (gate, up), each (B, T, F)."""
        dt = self.dtype
        return dense(x, self.gate_proj[...].astype(dt)), dense(x, self.up_proj[...].astype(dt))

    def project_down(self, h: jax.Array) -> jax.Array:
        """(B, T, F) -> (B, T, D)."""
        return dense(h, self.down_proj[...].astype(self.dtype))

    def __call__(self, x):
        gate, up = self.project_gate_up(x)
        h = constrain_sharding(jax.nn.silu(gate) * up, "act_batch", "act_length", "mlp")
        return self.project_down(h)


class DecoderBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig, *, attention_impl: str, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.attn = Attention(cfg, attention_impl=attention_impl, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.mlp = MLP(cfg, rngs=rngs)

    def _mlp_residual(self, x):
        x = x + self.mlp(self.post_attn_norm(x))
        return constrain_sharding(x, "act_batch", "act_length", "act_embed")

    def __call__(self, x, positions, rope, kv_valid, segment_ids=None) -> jax.Array:
        """The block over a whole sequence (see `Attention.__call__`)."""
        x = x + self.attn(self.input_norm(x), positions, rope, kv_valid, segment_ids)
        return self._mlp_residual(x)

    def cached(self, x, positions, rope, slot_valid, offsets, layer_kv):
        """The block over new tokens against a KV cache (see `Attention.cached`):
        returns (x, this layer's updated (k, v))."""
        y, layer_kv = self.attn.cached(
            self.input_norm(x), positions, rope, slot_valid, offsets, layer_kv
        )
        return self._mlp_residual(x + y), layer_kv


# ------------------------------------------------------------------ decoder


def packed_inputs(batch: dict) -> dict:
    """A packed training batch's `segment_ids` (B, T) and per-record
    `positions` ((B, T), or M-RoPE's (B, 3, T) moved to (3, B, T)) as
    `hidden_states` keywords; {} for a batch without `segment_ids`."""
    if "segment_ids" not in batch:
        return {}
    positions = jnp.asarray(batch["positions"])
    if positions.ndim == 3:  # batches are batch-major; the decoder takes (3, B, T)
        positions = jnp.moveaxis(positions, 1, 0)
    return {"segment_ids": batch["segment_ids"], "positions": positions}


class Decoder(nnx.Module):
    """Token embeddings -> stacked blocks (scanned) -> final norm -> LM head.

    `attention_impl`: the attention implementation (`attention.resolve` of
    `cfg.attention` and the platform; `models.factory` picks it)."""

    def __init__(self, cfg: DecoderConfig, *, attention_impl: str, rngs: nnx.Rngs):
        cfg.validate()
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = stack_layers(
            lambda r: DecoderBlock(cfg, attention_impl=attention_impl, rngs=r), cfg.num_layers, rngs
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    @property
    def decoder_config(self) -> DecoderConfig:
        return self.cfg

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) ids -> (B, T, D) embeddings in the compute dtype."""
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.cfg.dtype)
        return constrain_sharding(x, "act_batch", "act_length", "act_embed")

    def embed_inputs(self, input_ids, pixel_values=None, image_sizes=None) -> jax.Array:
        """Input embeddings (B, T, D); the VLM merges image features here."""
        if pixel_values is not None or image_sizes is not None:
            raise ValueError("a text-only causal_lm model takes no images")
        return self.embed_tokens(input_ids)

    def _rotary(self, positions, B: int, T: int):
        """(mask positions (B, T), rope cos/sin) for 1-D or M-RoPE positions."""
        if positions is not None and positions.ndim == 3:
            if self.cfg.mrope_section is None:
                raise ValueError(
                    f"positions of shape {positions.shape} are M-RoPE ids (3, B, T), but "
                    "decoder.mrope_section is not set"
                )
            rope = mrope_cos_sin(positions, decoder_inv_freq(self.cfg), self.cfg.mrope_section)
            # M-RoPE ids only rotate: image tokens share ids and text after an
            # image jumps ahead, so causal masks follow token order, as in
            # Hugging Face (which masks by cache position).
            return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), rope
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return positions, rope_cos_sin(positions, decoder_inv_freq(self.cfg))

    def _run_blocks(self, inputs_embeds, attention_mask, positions, collect: bool, segments=None):
        B, T, _ = inputs_embeds.shape
        positions, rope = self._rotary(positions, B, T)
        if attention_mask is None:
            kv_valid = jnp.ones((B, T), bool)
        else:
            kv_valid = attention_mask.astype(bool)
        x, per_layer = scan_layers(
            self.layers,
            inputs_embeds,
            positions,
            rope,
            kv_valid,
            segments,
            remat=self.cfg.remat,
            collect=collect,
            scan=self.cfg.scan_layers,
        )
        return self.norm(x), per_layer

    def hidden_from_embeds(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Run the blocks and the final norm over embeddings (B, T, D).

        `attention_mask` (B, T): 1 for real tokens; `positions` default to
        0..T-1 (as Hugging Face does when none are given). With
        `cfg.mrope_section` set, `positions` may also be M-RoPE ids (3, B, T)
        (`mrope.get_rope_index`): they rotate queries and keys, and the causal
        mask follows token order. `segment_ids` (B, T) pack several records
        per row (k for the k-th record, 0 for padding): a token attends only
        within its record, and `positions` then restart at 0 per record, so
        each record's states equal those of it run alone. Returns the normed
        hidden states (B, T, D).
        """
        return self._run_blocks(inputs_embeds, attention_mask, positions, False, segment_ids)[0]

    def hidden_and_layer_outputs(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`hidden_from_embeds`, and each block's output stacked (L, B, T, D)."""
        return self._run_blocks(inputs_embeds, attention_mask, positions, True, segment_ids)

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        pixel_values=None,
        image_sizes=None,
        segment_ids=None,
    ) -> jax.Array:
        """Final-normed hidden states (B, T, D) of a batch: the training entry
        point of every top-level model (steps call this, then the head in chunks).
        `segment_ids`: packed rows (see `hidden_from_embeds`)."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        return self.hidden_from_embeds(embeds, attention_mask, positions, segment_ids)

    @staticmethod
    def batch_inputs(batch: dict) -> dict:
        """`hidden_states`' extra arguments from a training batch: a packed
        batch's `segment_ids` and per-record `positions`; none otherwise."""
        return packed_inputs(batch)

    def forward_cached(
        self,
        inputs_embeds: jax.Array,
        cache: KVCache,
        attention_mask=None,
        positions=None,
    ) -> tuple[jax.Array, KVCache]:
        """Run new tokens (B, T, D) against a KV cache; returns (normed hidden, cache).

        Row b's new tokens take slots (and causal order) lengths[b] ..
        lengths[b]+T-1; with a right-padded chunk, `attention_mask` (B, T) says
        how many are real and the row's length advances by that many.

        Rotary positions equal the slots, except with `cfg.mrope_section` set:
        there row b's chunk starts at rotary position lengths[b] +
        rope_deltas[b], and `positions` may give the chunk's M-RoPE ids (3, B,
        T) counted from that start (`mrope.get_rope_index` of the chunk alone,
        e.g. a prompt with images); the row's delta then advances by the
        chunk's max id + 1 - its real tokens. Without `positions` the chunk
        is text (three equal ids).
        """
        B, T, _ = inputs_embeds.shape
        counts = jnp.full((B,), T, jnp.int32) if attention_mask is None else attention_mask.sum(-1)
        counts = counts.astype(jnp.int32)
        order = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
        slots = jnp.arange(cache.max_length, dtype=jnp.int32)
        slot_valid = slots[None, :] < (cache.lengths + counts)[:, None]
        rope, deltas = self._cached_rotary(cache, order, counts, attention_mask, positions)
        # Layers run in Python order (unrolled), each on its own cache buffer:
        # a scan would slice every layer's weights and cache out of the stacked
        # arrays per token (copies). Stacked blocks are sliced here too;
        # `sample.decode_transform` unstacks them once instead.
        x, ks, vs = inputs_embeds, [], []
        for i, block in enumerate(layer_modules(self.layers, self.cfg.num_layers)):
            layer_kv = (cache.k[i], cache.v[i])
            x, (k, v) = block.cached(x, order, rope, slot_valid, cache.lengths, layer_kv)
            ks.append(k)
            vs.append(v)
        new_cache = cache.replace(
            k=tuple(ks), v=tuple(vs), lengths=cache.lengths + counts, rope_deltas=deltas
        )
        return self.norm(x), new_cache

    def _cached_rotary(self, cache: KVCache, order, counts, attention_mask, positions):
        """(rope cos/sin of a cached chunk, the cache's next `rope_deltas`)."""
        if self.cfg.mrope_section is None:
            if positions is not None:
                raise ValueError("explicit positions need M-RoPE (decoder.mrope_section)")
            return cache.rope_at(order), cache.rope_deltas
        inv_freq = decoder_inv_freq(self.cfg)
        start = cache.lengths + cache.rope_deltas  # (B,) each row's next rotary position
        if positions is None:
            # Text: three equal ids rotate as 1-D RoPE. Computed, not gathered
            # from the per-slot table: a row's position may pass its last slot.
            ids = start[:, None] + jnp.arange(order.shape[1], dtype=jnp.int32)
            return rope_cos_sin(ids, inv_freq), cache.rope_deltas
        positions = jnp.asarray(positions, jnp.int32)
        if attention_mask is None:
            real = jnp.ones(order.shape, bool)
        else:
            real = attention_mask.astype(bool)
        top = jnp.max(jnp.where(real[None], positions, -1), axis=(0, 2))  # (B,); -1 if empty
        rope = mrope_cos_sin(positions + start[None, :, None], inv_freq, self.cfg.mrope_section)
        return rope, cache.rope_deltas + top + 1 - counts

    def output_head(self) -> jax.Array:
        """The (D, V) output projection in the compute dtype (the embeddings,
        transposed, when tied)."""
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return head.astype(self.cfg.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project hidden states to fp32 vocabulary logits (accumulated in fp32)."""
        head = self.output_head().astype(hidden.dtype)
        # fp32 out of the matmul, not a bf16 result widened: bf16 logits of size ~20
        # are 0.06-0.125 apart, errors that log-probs (DPO, RL, sampling) would keep.
        out = dense(hidden, head, out_dtype=jnp.float32)
        return constrain_sharding(out, "act_batch", "act_length", "act_vocab")

    def __call__(self, input_ids, attention_mask=None, positions=None, inputs_embeds=None):
        """Logits (B, T, V) in fp32 for token ids (or precomputed embeddings).
        `input_ids` and `attention_mask` go by position or by name
        (`model(input_ids=..., attention_mask=...)`, a tokenizer's outputs)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return self.logits(self.hidden_from_embeds(inputs_embeds, attention_mask, positions))
