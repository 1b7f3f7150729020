"""CLIP and SigLIP vision towers (ViT) in Flax NNX.

CLIP: patch embedding (no bias) + class token + learned positions, then
`pre_layrnorm`, then pre-norm blocks with quick-GELU. SigLIP: patch embedding
with bias, no class token, no pre-norm, GELU (tanh). Both keep a
`post_layernorm` as Hugging Face does; it only feeds the pooled output, which
LLaVA never uses, so it is carried for round trips but not applied here.

Hidden states are numbered like Hugging Face's `hidden_states`: 0 is the input
of the first block (after the pre-norm for CLIP), i the output of block i.
Shapes: N images, P patches (+1 class token), D width, F MLP width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from insightv_jax.config import VisionConfig
from insightv_jax.models.attention import attention
from insightv_jax.models.linear import dense, param, zeros
from insightv_jax.models.stack import scan_layers, stack_layers
from insightv_jax.parallel import constrain_sharding

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


class LayerNorm(nnx.Module):
    """Affine layer norm computed in fp32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional multi-head attention with biases on every projection."""

    def __init__(self, cfg: VisionConfig, *, attention_impl: str, rngs: nnx.Rngs):
        D, N = cfg.hidden_size, cfg.num_heads
        H = D // N
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.attention_impl = attention_impl  # see attention.resolve
        for name in ("q", "k", "v"):
            setattr(
                self,
                f"{name}_proj",
                param(rngs, (D, N, H), ("vision_embed", "vision_heads", "head_dim"), pd),
            )
            setattr(self, f"{name}_bias", zeros((N, H), ("vision_heads", "head_dim"), pd))
        self.o_proj = param(rngs, (N, H, D), ("vision_heads", "head_dim", "vision_embed"), pd)
        self.o_bias = zeros((D,), ("vision_embed",), pd)

    def __call__(self, x, positions, valid):
        dt = jnp.dtype(self.cfg.dtype)

        def project(name):
            w, b = getattr(self, f"{name}_proj"), getattr(self, f"{name}_bias")
            y = dense(x, w[...].astype(dt)) + b[...].astype(dt)
            return constrain_sharding(y, "act_batch", "act_length", "act_heads", None)

        out = attention(
            project("q"),
            project("k"),
            project("v"),
            positions,
            positions,
            valid,
            causal=False,
            backend=self.attention_impl,
        )
        return dense(out, self.o_proj[...].astype(dt), axes=2) + self.o_bias[...].astype(dt)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.fc1 = param(rngs, (D, F), ("vision_embed", "vision_mlp"), pd)
        self.fc1_bias = zeros((F,), ("vision_mlp",), pd)
        self.fc2 = param(rngs, (F, D), ("vision_mlp", "vision_embed"), pd)
        self.fc2_bias = zeros((D,), ("vision_embed",), pd)

    def __call__(self, x):
        dt = jnp.dtype(self.cfg.dtype)
        h = dense(x, self.fc1[...].astype(dt)) + self.fc1_bias[...].astype(dt)
        h = constrain_sharding(
            ACTIVATIONS[self.cfg.hidden_act](h), "act_batch", "act_length", "vision_mlp"
        )
        return dense(h, self.fc2[...].astype(dt)) + self.fc2_bias[...].astype(dt)


class VisionBlock(nnx.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, *, attention_impl: str, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.ln1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, pd)
        self.attn = VisionAttention(cfg, attention_impl=attention_impl, rngs=rngs)
        self.ln2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, pd)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x, positions, valid):
        x = x + self.attn(self.ln1(x), positions, valid)
        x = x + self.mlp(self.ln2(x))
        return constrain_sharding(x, "act_batch", "act_length", "act_embed")


def patchify(pixel_values: jax.Array, patch: int) -> jax.Array:
    """(N, C, H, W) -> (N, (H/p)*(W/p), C*p*p), patches in row-major order."""
    N, C, H, W = pixel_values.shape
    x = pixel_values.reshape(N, C, H // patch, patch, W // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(N, (H // patch) * (W // patch), C * patch * patch)


class VisionTower(nnx.Module):
    """A CLIP or SigLIP ViT returning the hidden state of a chosen layer.

    `attention_impl`: the attention implementation (`attention.resolve` of
    `cfg.attention` and the platform)."""

    def __init__(self, cfg: VisionConfig, *, attention_impl: str, rngs: nnx.Rngs):
        cfg.validate()
        C, P, D = cfg.num_channels, cfg.patch_size, cfg.hidden_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.has_cls = cfg.family == "clip"
        self.patch_embed = param(rngs, (C * P * P, D), ("patch", "vision_embed"), pd)
        if not self.has_cls:
            self.patch_bias = zeros((D,), ("vision_embed",), pd)
        else:
            self.class_embed = param(rngs, (D,), ("vision_embed",), pd)
        n_pos = cfg.patches_per_side**2 + int(self.has_cls)
        self.pos_embed = param(rngs, (n_pos, D), ("patch", "vision_embed"), pd)
        if self.has_cls:
            self.pre_norm = LayerNorm(D, cfg.layer_norm_eps, pd)
        self.layers = stack_layers(
            lambda r: VisionBlock(cfg, attention_impl=attention_impl, rngs=r), cfg.num_layers, rngs
        )
        self.post_norm = LayerNorm(D, cfg.layer_norm_eps, pd)

    @property
    def num_positions(self) -> int:
        return self.cfg.patches_per_side**2 + int(self.has_cls)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """(N, C, H, W) pixels -> (N, T, D) hidden state 0."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        if pixel_values.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"vision tower expects {cfg.image_size}x{cfg.image_size} tiles, "
                f"got {pixel_values.shape[-2]}x{pixel_values.shape[-1]}"
            )
        used = cfg.patches_per_side * cfg.patch_size  # a strided conv ignores the remainder
        pixels = pixel_values[..., :used, :used].astype(dt)
        x = dense(patchify(pixels, cfg.patch_size), self.patch_embed[...].astype(dt))
        if self.has_cls:
            cls = jnp.broadcast_to(self.class_embed[...].astype(dt), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        else:
            x = x + self.patch_bias[...].astype(dt)
        x = x + self.pos_embed[...].astype(dt)
        if self.has_cls:
            x = self.pre_norm(x)
        return constrain_sharding(x, "act_batch", "act_length", "act_embed")

    def hidden_state(self, pixel_values: jax.Array, layer: int = -1) -> jax.Array:
        """Hugging Face's `hidden_states[layer]` (N, T, D); only the blocks it
        needs are run (feature layer -2 skips the last block)."""
        L = self.cfg.num_layers
        if not -(L + 1) <= layer <= L:
            raise ValueError(f"vision feature layer {layer} is out of range for {L} layers")
        n = layer % (L + 1)
        x = self.embed(pixel_values)
        if n == 0:
            return x
        layers = self.layers
        if n < L:
            graphdef, state = nnx.split(self.layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:n], state))
        N, T, _ = x.shape
        positions = jnp.zeros((N, T), jnp.int32)
        valid = jnp.ones((N, T), bool)
        x, _ = scan_layers(
            layers, x, positions, valid, remat=self.cfg.remat, scan=self.cfg.scan_layers
        )
        return x

    def __call__(self, pixel_values: jax.Array, layer: int = -1) -> jax.Array:
        return self.hidden_state(pixel_values, layer)
