"""Decoding's specialisations of a model, built from its weights.

`for_decoding(model)` returns a model of the same interface (`models.interface`)
that computes what `model` computes, laid out for KV-cache decoding. It is made
of this module's own classes; `model` is never changed, and every array but
the copies named below is shared with it.

  unstacked  (always) each decoder block is its own module, so the layer loop
             reads each block's weights in place instead of slicing them out
             of the stacked arrays every token. The slices are copies.
  fused      (default: on the CPU backend) q/k/v as one (D, N+2K, H) weight and
             gate/up as one (D, 2F): a decode step runs 3 matmuls per block
             instead of 7. XLA:CPU pays a fixed cost per matmul, large beside a
             one-row-per-sequence product. The fused weights are copies.
  packed     (default: wherever `panel_matmul` applies, see there) also a copy
             of every block matmul's weight and of the LM head packed for the
             CPU panel kernel, which products of at most 8 rows (decode steps)
             then use instead of XLA's matmul; prefill keeps XLA's.

The fused and packed forms run other matmuls than the model's own, so their
results may differ from its `forward_cached` in the last float bits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from insightv_jax.models.decoder import MLP, Attention, Decoder, DecoderBlock
from insightv_jax.models.interface import CausalLM
from insightv_jax.models.linear import dense
from insightv_jax.models.llava import LlavaModel
from insightv_jax.models.qwen_vl import QwenVL
from insightv_jax.models.stack import layer_modules
from insightv_jax.parallel import constrain_sharding
from insightv_jax.sample import panel_matmul
from insightv_jax.sample.panel_matmul import PackedWeight


def for_decoding(model: CausalLM, fuse: bool | None = None, pack: bool | None = None) -> CausalLM:
    """`model` (a `Decoder`, `LlavaModel` or `QwenVL`) in its decode form: blocks
    unstacked, and with `fuse` (default: on the CPU backend) q/k/v and gate/up
    fused, with `pack` (default: where the panel kernel applies; implies
    `fuse`) weights packed for the panel kernel. Other models, and models
    already in a decode form, come back as they are."""
    decoder = model if isinstance(model, Decoder) else getattr(model, "decoder", None)
    if not isinstance(decoder, Decoder) or isinstance(decoder, UnstackedDecoder):
        return model
    if fuse is None:
        fuse = jax.default_backend() == "cpu"
    if pack is None:
        pack = fuse and _packable(decoder) and panel_matmul.available()
    form = PackedDecoder if pack else FusedDecoder if fuse else UnstackedDecoder
    decoding = form(decoder)
    if isinstance(model, LlavaModel):
        return DecodingLlava(model, decoding)
    if isinstance(model, QwenVL):
        return DecodingQwenVL(model, decoding)
    return decoding


def _packable(decoder: Decoder) -> bool:
    """fp32 weights and compute, every weight on a single device."""
    cfg = decoder.cfg
    if jnp.dtype(cfg.dtype) != jnp.float32 or jnp.dtype(cfg.param_dtype) != jnp.float32:
        return False
    leaves = jax.tree.leaves(nnx.state(decoder, nnx.Param))
    return all(len(x.sharding.device_set) == 1 for x in leaves)


def unstack_layers(layers: nnx.Module, num_layers: int) -> list[nnx.Module]:
    """The stacked `layers` as `num_layers` separate modules (each parameter
    sliced once, its leading `layers` axis name dropped)."""
    out = layer_modules(layers, num_layers)
    for layer in out:
        for _, var in nnx.iter_graph(layer):
            if isinstance(var, nnx.Variable):
                _drop_layers_axis(var)
    return out


def _drop_layers_axis(var: nnx.Variable) -> None:
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if isinstance(names, tuple) and names and names[0] == "layers":
            var.set_metadata(key, names[1:])


def packed_dense(x: jax.Array, w: jax.Array, packed: jax.Array, axes: int = 1) -> jax.Array:
    """`dense(x, w, axes)`, on the panel kernel (`packed`: w packed by
    `panel_matmul.pack`) for products of at most 8 rows."""
    lead, k = x.shape[: x.ndim - axes], math.prod(x.shape[x.ndim - axes :])
    if not panel_matmul.applies(math.prod(lead)):
        return dense(x, w, axes)
    y = panel_matmul.matmul(x.reshape(-1, k), packed, math.prod(w.shape[axes:]))
    return y.reshape(lead + w.shape[axes:])


# ------------------------------------------------------------------ fused


class FusedAttention(Attention):
    """`Attention` with q/k/v as one (D, N+2K, H) weight: one matmul."""

    def __init__(self, attn: Attention):
        cfg = attn.cfg
        self.cfg = cfg
        self.attention_impl = attn.attention_impl
        qkv = jnp.concatenate([attn.q_proj[...], attn.k_proj[...], attn.v_proj[...]], axis=1)
        with nnx.use_eager_sharding(False):  # the array keeps the sharding concatenate gave
            self.qkv_proj = nnx.Param(qkv, out_sharding=("embed", None, "head_dim"))
        self.o_proj = attn.o_proj
        if cfg.qkv_bias:
            self.q_bias, self.k_bias, self.v_bias = attn.q_bias, attn.k_bias, attn.v_bias
        if cfg.o_bias:
            self.o_bias = attn.o_bias

    def _qkv(self, x: jax.Array) -> jax.Array:
        return dense(x, self.qkv_proj[...].astype(self.cfg.dtype))

    def _out(self, out: jax.Array) -> jax.Array:
        return dense(out, self.o_proj[...].astype(self.cfg.dtype), axes=2)

    def project_qkv(self, x):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        N, K = cfg.num_heads, cfg.num_kv_heads
        q, k, v = jnp.split(self._qkv(x), [N, N + K], axis=2)
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        return q, k, v

    def project_out(self, out):
        y = self._out(out)
        if self.cfg.o_bias:
            y = y + self.o_bias[...].astype(self.cfg.dtype)
        return y


class FusedMLP(MLP):
    """`MLP` with gate/up as one (D, 2F) weight: one matmul."""

    def __init__(self, mlp: MLP):
        self.dtype = mlp.dtype
        gate_up = jnp.concatenate([mlp.gate_proj[...], mlp.up_proj[...]], axis=1)
        with nnx.use_eager_sharding(False):  # the array keeps the sharding concatenate gave
            self.gate_up_proj = nnx.Param(gate_up, out_sharding=("embed", "mlp"))
        self.down_proj = mlp.down_proj

    def _gate_up(self, x: jax.Array) -> jax.Array:
        return dense(x, self.gate_up_proj[...].astype(self.dtype))

    def project_gate_up(self, x):
        gate, up = jnp.split(self._gate_up(x), 2, axis=-1)
        return gate, up


class FusedBlock(DecoderBlock):
    """A `DecoderBlock` (unstacked) whose attention and MLP are fused."""

    attention_form, mlp_form = FusedAttention, FusedMLP

    def __init__(self, block: DecoderBlock):
        self.input_norm = block.input_norm
        self.attn = self.attention_form(block.attn)
        self.post_attn_norm = block.post_attn_norm
        self.mlp = self.mlp_form(block.mlp)


# ----------------------------------------------------------------- packed


class PackedAttention(FusedAttention):
    """`FusedAttention` plus its weights packed for the panel kernel."""

    def __init__(self, attn: Attention):
        super().__init__(attn)
        D = self.cfg.hidden_size
        self.qkv_proj_packed = PackedWeight(panel_matmul.pack(self.qkv_proj[...].reshape(D, -1)))
        self.o_proj_packed = PackedWeight(panel_matmul.pack(self.o_proj[...].reshape(-1, D)))

    def _qkv(self, x):
        w = self.qkv_proj[...].astype(self.cfg.dtype)
        return packed_dense(x, w, self.qkv_proj_packed[...])

    def _out(self, out):
        w = self.o_proj[...].astype(self.cfg.dtype)
        return packed_dense(out, w, self.o_proj_packed[...], axes=2)


class PackedMLP(FusedMLP):
    """`FusedMLP` plus its weights packed for the panel kernel."""

    def __init__(self, mlp: MLP):
        super().__init__(mlp)
        self.gate_up_proj_packed = PackedWeight(panel_matmul.pack(self.gate_up_proj[...]))
        self.down_proj_packed = PackedWeight(panel_matmul.pack(self.down_proj[...]))

    def _gate_up(self, x):
        w = self.gate_up_proj[...].astype(self.dtype)
        return packed_dense(x, w, self.gate_up_proj_packed[...])

    def project_down(self, h):
        w = self.down_proj[...].astype(self.dtype)
        return packed_dense(h, w, self.down_proj_packed[...])


class PackedBlock(FusedBlock):
    """A `FusedBlock` whose matmuls run on the panel kernel for decode steps."""

    attention_form, mlp_form = PackedAttention, PackedMLP


# --------------------------------------------------------------- decoders


class UnstackedDecoder(Decoder):
    """A `Decoder` whose blocks are a list of separate modules (`layers`);
    embeddings, final norm and head are the decoder's own."""

    def __init__(self, decoder: Decoder):
        cfg = decoder.cfg
        self.cfg = cfg
        self.embed = decoder.embed
        blocks = unstack_layers(decoder.layers, cfg.num_layers)
        self.layers = nnx.List([self.block_form(b) for b in blocks])
        self.norm = decoder.norm
        if not cfg.tie_embeddings:
            self.lm_head = decoder.lm_head

    @staticmethod
    def block_form(block: DecoderBlock) -> DecoderBlock:
        return block


class FusedDecoder(UnstackedDecoder):
    """`UnstackedDecoder` with fused blocks."""

    block_form = FusedBlock


class PackedDecoder(FusedDecoder):
    """`FusedDecoder` with packed blocks and a packed copy of the LM head."""

    block_form = PackedBlock

    def __init__(self, decoder: Decoder):
        super().__init__(decoder)
        self.head_packed = PackedWeight(panel_matmul.pack(self.output_head()))

    def logits(self, hidden):
        w = self.output_head().astype(hidden.dtype)
        out = packed_dense(hidden, w, self.head_packed[...])
        return constrain_sharding(out.astype(jnp.float32), "act_batch", "act_length", "act_vocab")


class DecodingLlava(LlavaModel):
    """A `LlavaModel` whose decoder is in a decode form; the vision tower,
    projector and image newline are the model's own."""

    def __init__(self, model: LlavaModel, decoder: UnstackedDecoder):
        self.cfg = model.cfg
        self.vision = model.vision
        self.projector = model.projector
        self.decoder = decoder
        if model.cfg.kind == "llava_next":
            self.image_newline = model.image_newline


class DecodingQwenVL(QwenVL):
    """A `QwenVL` whose decoder is in a decode form; the vision tower is the
    model's own."""

    def __init__(self, model: QwenVL, decoder: UnstackedDecoder):
        self.cfg = model.cfg
        self.vision = model.vision
        self.decoder = decoder
