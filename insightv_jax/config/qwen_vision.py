"""The Qwen2-VL / Qwen2.5-VL vision tower: a ViT over 3-D (time, height, width)
patches with 2-D rotary positions and a 2x2 patch merger into the language
model's width.

Field names follow Hugging Face's `Qwen2_5_VLVisionConfig`; `hf.qwen_vision`
maps Qwen2-VL's names onto them (`embed_dim` -> `hidden_size`, `hidden_size`
-> `out_hidden_size`, `embed_dim * mlp_ratio` -> `intermediate_size`).
"""

import dataclasses
from typing import Literal

from insightv_jax.config.base import DTYPES, ConfigError, check_positive

QWEN_VISION_ACTIVATIONS = ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """A Qwen2-VL (`family: qwen2_vl`: LayerNorm, fc1/fc2 MLP, full attention in
    every block) or Qwen2.5-VL (`qwen2_5_vl`: RMSNorm, SwiGLU MLP with biases,
    window attention except in `fullatt_block_indexes`) vision tower."""

    family: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_5_vl"
    depth: int = 2
    hidden_size: int = 64  # the tower's width (Qwen2-VL: embed_dim)
    intermediate_size: int = 128  # MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    out_hidden_size: int = 128  # the merger's output: the language model's width
    num_heads: int = 4
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: Literal["quick_gelu", "silu", "gelu", "gelu_pytorch_tanh"] = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # Hugging Face fixes every norm of the tower at 1e-6
    window_size: int = 112  # pixels per window side (qwen2_5_vl)
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks with full attention (qwen2_5_vl)
    tokens_per_second: int = 4  # M-RoPE temporal scale of videos (qwen2_5_vl)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and rotary stay fp32
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = True  # lax.scan over the block stack; False unrolls
    # the blocks' attention within each frame or window, as DecoderConfig.attention;
    # `blockwise` never holds the (L, L) scores of a sample's patches (the hub's
    # max_pixels gives ~16k patches an image)
    attention: Literal["auto", "xla", "cudnn", "splash", "blockwise"] = "xla"
    attention_block_size: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x time x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token (spatial_merge_size squared)."""
        return self.spatial_merge_size**2

    @property
    def windowed(self) -> bool:
        """Whether some blocks attend within windows (Qwen2.5-VL)."""
        return self.family == "qwen2_5_vl"

    @property
    def window_units(self) -> int:
        """Window side in merge units (Hugging Face's `vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def validate(self) -> None:
        check_positive(
            self, "qwen_vision", "depth", "hidden_size", "intermediate_size", "out_hidden_size",
            "num_heads", "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
        )  # fmt: skip
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"qwen_vision.hidden_size={self.hidden_size} is not a multiple of "
                f"qwen_vision.num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            # the 2-D rotary embedding gives height and width a quarter of the head each
            raise ConfigError(f"qwen_vision head_dim={self.head_dim} must be a multiple of 4")
        if self.hidden_act not in QWEN_VISION_ACTIVATIONS:
            raise ConfigError(
                f"qwen_vision.hidden_act={self.hidden_act!r} is not one of {QWEN_VISION_ACTIVATIONS}"
            )
        if self.windowed:
            if self.window_units < 1:
                raise ConfigError(
                    f"qwen_vision.window_size={self.window_size} is smaller than one merge unit "
                    f"({self.spatial_merge_size * self.patch_size} pixels)"
                )
            bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
            if bad:
                raise ConfigError(
                    f"qwen_vision.fullatt_block_indexes: {bad[0]} is not a block index "
                    f"(depth {self.depth})"
                )
        elif self.fullatt_block_indexes:
            raise ConfigError(
                "qwen_vision.fullatt_block_indexes is for family qwen2_5_vl "
                "(every qwen2_vl block attends to the whole image)"
            )
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(
                    f"qwen_vision.{key}={getattr(self, key)!r} is not one of {DTYPES}"
                )
