"""The Llama-3 / Qwen2 family decoder in Flax NNX.

Read top to bottom: RMSNorm, attention (rotary embeddings in `rope.py`),
SwiGLU MLP, one pre-norm block, and the decoder that embeds tokens, scans the
stacked blocks, normalises and projects to the vocabulary.

Shapes: B batch, T tokens, D hidden, N query heads, K key/value heads, H head
dim, F MLP width, V vocabulary. Every parameter carries logical axis names
(see `parallel.LOGICAL_RULES`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from insightv_jax.config import DecoderConfig
from insightv_jax.models import panel_matmul
from insightv_jax.models.attention import attention
from insightv_jax.models.cache import KVCache, write_rows
from insightv_jax.models.linear import dense, param, zeros
from insightv_jax.models.panel_matmul import PackedWeight, packed_weight
from insightv_jax.models.rope import apply_rope, decoder_inv_freq, rope_cos_sin
from insightv_jax.models.stack import layer_modules, scan_layers, stack_layers, unstack_layers
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
    """Grouped-query self-attention with optional q/k/v (and output) bias."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
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

    def __call__(self, x, positions, rope, kv_valid, offsets=None, layer_kv=None):
        """Self-attention over x at `positions` (B, T), rotated by `rope`
        (`rope_cos_sin` of those positions); with a cache (`offsets` (B,), `layer_kv` =
        this layer's (k, v), each (B, K, S, H)) the new keys/values are written
        in place at [row, offset...], attention runs over the cache slots
        (`kv_valid` is then (B, S)), and (y, (k, v)) is returned."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        if hasattr(self, "qkv_proj"):  # fused by `decoding_view`: one matmul
            N, K = cfg.num_heads, cfg.num_kv_heads
            qkv = dense(x, self.qkv_proj[...].astype(dt), packed=packed_weight(self, "qkv_proj"))
            q, k, v = jnp.split(qkv, [N, N + K], axis=2)
        else:
            q = dense(x, self.q_proj[...].astype(dt))  # (B, T, N, H)
            k = dense(x, self.k_proj[...].astype(dt))  # (B, T, K, H)
            v = dense(x, self.v_proj[...].astype(dt))
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        q = constrain_sharding(apply_rope(q, rope), "act_batch", "act_length", "act_heads", None)
        k = constrain_sharding(apply_rope(k, rope), "act_batch", "act_length", "act_kv_heads", None)
        kv_positions = positions
        backend = cfg.attention
        if layer_kv is not None:
            k = write_rows(layer_kv[0], k, offsets)
            v = write_rows(layer_kv[1], v, offsets)
            layer_kv = (k, v)
            kv_positions = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), kv_valid.shape)
        out = attention(
            q,
            k.astype(dt),
            v.astype(dt),
            positions,
            kv_positions,
            kv_valid,
            causal=True,
            backend=backend,
            block_size=cfg.attention_block_size,
            heads_major=layer_kv is not None,
        )
        y = dense(out, self.o_proj[...].astype(dt), axes=2, packed=packed_weight(self, "o_proj"))
        if cfg.o_bias:
            y = y + self.o_bias[...].astype(dt)
        return y if layer_kv is None else (y, layer_kv)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = param(rngs, (D, F), ("embed", "mlp"), pd)
        self.up_proj = param(rngs, (D, F), ("embed", "mlp"), pd)
        self.down_proj = param(rngs, (F, D), ("mlp", "embed"), pd)

    def __call__(self, x):
        dt = self.dtype
        if hasattr(self, "gate_up_proj"):  # fused by `decoding_view`: one matmul
            gate_up = dense(
                x, self.gate_up_proj[...].astype(dt), packed=packed_weight(self, "gate_up_proj")
            )
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = dense(x, self.gate_proj[...].astype(dt))
            up = dense(x, self.up_proj[...].astype(dt))
        h = constrain_sharding(jax.nn.silu(gate) * up, "act_batch", "act_length", "mlp")
        return dense(h, self.down_proj[...].astype(dt), packed=packed_weight(self, "down_proj"))


class DecoderBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, rope, kv_valid, offsets=None, layer_kv=None):
        if layer_kv is None:
            x = x + self.attn(self.input_norm(x), positions, rope, kv_valid)
        else:
            y, layer_kv = self.attn(
                self.input_norm(x), positions, rope, kv_valid, offsets, layer_kv
            )
            x = x + y
        x = x + self.mlp(self.post_attn_norm(x))
        x = constrain_sharding(x, "act_batch", "act_length", "act_embed")
        return x if layer_kv is None else (x, layer_kv)


# ------------------------------------------------------------------ decoder


class Decoder(nnx.Module):
    """Token embeddings -> stacked blocks (scanned) -> final norm -> LM head."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = stack_layers(lambda r: DecoderBlock(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) ids -> (B, T, D) embeddings in the compute dtype."""
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.cfg.dtype)
        return constrain_sharding(x, "act_batch", "act_length", "act_embed")

    def hidden_states(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        collect: bool = False,
    ):
        """Run the blocks and the final norm over embeddings (B, T, D).

        `attention_mask` (B, T): 1 for real tokens; `positions` default to
        0..T-1 (as Hugging Face does when none are given). Returns the normed
        hidden states, and with `collect` also each block's output (L, B, T, D).
        """
        B, T, _ = inputs_embeds.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if attention_mask is None:
            kv_valid = jnp.ones((B, T), bool)
        else:
            kv_valid = attention_mask.astype(bool)
        x, per_layer = scan_layers(
            self.layers,
            inputs_embeds,
            positions,
            rope_cos_sin(positions, decoder_inv_freq(self.cfg)),
            kv_valid,
            remat=self.cfg.remat,
            collect=collect,
            scan=self.cfg.scan_layers,
        )
        x = self.norm(x)
        return (x, per_layer) if collect else x

    def decode_hidden(self, inputs_embeds: jax.Array, cache: KVCache, attention_mask=None):
        """Run new tokens (B, T, D) against a KV cache; returns (normed hidden, cache).

        Row b's new tokens take positions lengths[b] .. lengths[b]+T-1; with a
        right-padded chunk, `attention_mask` (B, T) says how many are real and
        the row's length advances by that many.
        """
        B, T, _ = inputs_embeds.shape
        counts = jnp.full((B,), T, jnp.int32) if attention_mask is None else attention_mask.sum(-1)
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
        slots = jnp.arange(cache.max_length, dtype=jnp.int32)
        slot_valid = slots[None, :] < (cache.lengths + counts)[:, None]
        # Layers run in Python order (unrolled), each on its own cache buffer:
        # a scan would slice every layer's weights and cache out of the stacked
        # arrays per token (copies). See `decoding_view`.
        rope = cache.rope_at(positions)
        x, ks, vs = inputs_embeds, [], []
        for i, layer in enumerate(layer_modules(self.layers, self.cfg.num_layers)):
            layer_kv = (cache.k[i], cache.v[i])
            x, (k, v) = layer(x, positions, rope, slot_valid, cache.lengths, layer_kv)
            ks.append(k)
            vs.append(v)
        new_cache = cache.replace(
            k=tuple(ks), v=tuple(vs), lengths=cache.lengths + counts.astype(jnp.int32)
        )
        return self.norm(x), new_cache

    def output_head(self) -> jax.Array:
        """The (D, V) output projection in the compute dtype (the embeddings,
        transposed, when tied)."""
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return head.astype(self.cfg.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project hidden states to fp32 vocabulary logits."""
        out = dense(
            hidden, self.output_head().astype(hidden.dtype), packed=packed_weight(self, "head")
        )
        return constrain_sharding(out.astype(jnp.float32), "act_batch", "act_length", "act_vocab")

    def embed_inputs(self, input_ids, pixel_values=None, image_sizes=None) -> jax.Array:
        """Input embeddings (B, T, D); the VLM merges image features here."""
        if pixel_values is not None or image_sizes is not None:
            raise ValueError("a text-only causal_lm model takes no images")
        return self.embed_tokens(input_ids)

    @property
    def decoder_config(self) -> DecoderConfig:
        return self.cfg

    def forward_hidden(
        self, input_ids, attention_mask=None, positions=None, pixel_values=None, image_sizes=None
    ):
        """Final-normed hidden states (B, T, D): the shared entry point of every
        top-level model (training steps call this, then `logits` in chunks)."""
        if pixel_values is not None or image_sizes is not None:
            raise ValueError("a text-only causal_lm model takes no images")
        return self.hidden_states(self.embed_tokens(input_ids), attention_mask, positions)

    def __call__(self, input_ids, attention_mask=None, positions=None, inputs_embeds=None):
        """Logits (B, T, V) in fp32 for token ids (or precomputed embeddings)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return self.logits(self.hidden_states(inputs_embeds, attention_mask, positions))


def decoding_view(
    model: nnx.Module, fuse: bool | None = None, pack: bool | None = None
) -> nnx.Module:
    """`model` (a Decoder, or a model with a `.decoder`) with its decoder blocks
    unstacked into separate modules, for KV-cache decoding: the layer loop then
    reads each block's weights in place instead of slicing them out of the
    stacked arrays every token. Shares every other array with `model`.

    `fuse` (default: on the CPU backend) also concatenates each block's q/k/v
    and gate/up weights, so a decode step runs 3 matmuls per block instead of 7:
    XLA:CPU pays a fixed cost per matmul, large beside a one-row-per-sequence
    product (bench-20m at batch 8: ~6 % less time a token). The fused weights are copies.

    `pack` (default: wherever `panel_matmul` applies, see there) adds a copy of
    every block matmul's weight and of the LM head packed for the CPU panel
    kernel, which decode steps then use instead of XLA's matmul."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    decoder = view if isinstance(view, Decoder) else getattr(view, "decoder", None)
    if not isinstance(decoder, Decoder):
        return view
    if not isinstance(decoder.layers, nnx.List):
        decoder.layers = unstack_layers(decoder.layers, decoder.cfg.num_layers)
    if fuse is None:
        fuse = jax.default_backend() == "cpu"
    if fuse:
        for layer in decoder.layers:
            _fuse_projections(layer)
    if pack is None:
        pack = fuse and _packable(decoder) and panel_matmul.available()
    if pack:
        _pack_weights(decoder)
    return view


def _fuse_projections(block: DecoderBlock) -> None:
    """Replace q/k/v by one (D, N+2K, H) weight and gate/up by one (D, 2F)."""
    attn, mlp = block.attn, block.mlp
    qkv = jnp.concatenate([attn.q_proj[...], attn.k_proj[...], attn.v_proj[...]], axis=1)
    gate_up = jnp.concatenate([mlp.gate_proj[...], mlp.up_proj[...]], axis=1)
    with nnx.use_eager_sharding(False):  # the arrays keep the sharding concatenate gave
        attn.qkv_proj = nnx.Param(qkv, out_sharding=("embed", None, "head_dim"))
        mlp.gate_up_proj = nnx.Param(gate_up, out_sharding=("embed", "mlp"))
    for module, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        for name in names:
            delattr(module, name)


def _packable(decoder: Decoder) -> bool:
    """fp32 weights and compute, every weight on a single device."""
    cfg = decoder.cfg
    if jnp.dtype(cfg.dtype) != jnp.float32 or jnp.dtype(cfg.param_dtype) != jnp.float32:
        return False
    leaves = jax.tree.leaves(nnx.state(decoder, nnx.Param))
    return all(len(x.sharding.device_set) == 1 for x in leaves)


def _pack_weights(decoder: Decoder) -> None:
    """Attach `<weight>_packed` copies (see `panel_matmul.pack`) to a decoder whose
    blocks are unstacked and fused."""
    D = decoder.cfg.hidden_size
    for block in decoder.layers:
        attn, mlp = block.attn, block.mlp
        attn.qkv_proj_packed = PackedWeight(panel_matmul.pack(attn.qkv_proj[...].reshape(D, -1)))
        attn.o_proj_packed = PackedWeight(panel_matmul.pack(attn.o_proj[...].reshape(-1, D)))
        mlp.gate_up_proj_packed = PackedWeight(panel_matmul.pack(mlp.gate_up_proj[...]))
        mlp.down_proj_packed = PackedWeight(panel_matmul.pack(mlp.down_proj[...]))
    decoder.head_packed = PackedWeight(panel_matmul.pack(decoder.output_head()))
