"""The `model:` section: decoder, vision tower and how image features reach the decoder."""

import dataclasses
from typing import Literal

from insightv_jax.config.base import DTYPES, ConfigError, check_positive
from insightv_jax.config.qwen_vision import QwenVisionConfig


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1-style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    rope_type: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A Llama-3 / Qwen2 family decoder (the language model of both agents)."""

    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # Llama with attention_bias=True
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    # Storage dtype. Training bfloat16 parameters wants `train.master_weights: true`
    # (an fp32 copy takes the updates; docs/design.md, "Precision").
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and losses stay fp32
    # auto: splash on TPU, cudnn on GPU in bf16/fp16, else xla (models.attention.resolve).
    # The default stays xla until the device check has run the kernels on real hardware
    # (they are tested in Pallas's interpreter and, for cudnn, not at all yet).
    attention: Literal["auto", "xla", "cudnn", "splash", "blockwise"] = "xla"
    attention_block_size: int = 512  # query/key block for blockwise (splash's largest)
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = True  # lax.scan over the layer stack; False unrolls (small models)
    family: Literal["llama", "qwen2"] = "llama"
    # Qwen2-VL / Qwen2.5-VL multimodal RoPE: how many of the H/2 frequencies
    # take their angle from the time, row and column position ids (in that
    # order, summing to H/2). Set, the uncached forward also accepts (3, B, T)
    # position ids; 1-D positions rotate as plain RoPE (all three ids equal).
    mrope_section: tuple[int, int, int] | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        check_positive(
            self, "decoder", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "max_position_embeddings",
        )  # fmt: skip
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"decoder.head_dim={self.head_dim} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"decoder.num_heads={self.num_heads} is not a multiple of "
                f"decoder.num_kv_heads={self.num_kv_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"decoder head_dim={self.resolved_head_dim} must be even (RoPE)")
        if self.mrope_section is not None and (
            len(self.mrope_section) != 3
            or min(self.mrope_section) < 0
            or sum(self.mrope_section) != self.resolved_head_dim // 2
        ):
            raise ConfigError(
                f"decoder.mrope_section={list(self.mrope_section)} must be 3 counts >= 0 summing "
                f"to head_dim / 2 = {self.resolved_head_dim // 2}"
            )
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"decoder.{key}={getattr(self, key)!r} is not one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT image tower: CLIP (class token, pre-layernorm) or SigLIP (neither)."""

    family: Literal["clip", "siglip"] = "clip"
    image_size: int = 40  # tile side in pixels (a remainder after patches is ignored)
    patch_size: int = 10
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 1
    num_heads: int = 4
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: Literal["quick_gelu", "gelu", "gelu_pytorch_tanh"] = "quick_gelu"
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: Literal["auto", "xla", "cudnn", "splash", "blockwise"] = "xla"  # as the decoder's
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = True  # as DecoderConfig.scan_layers

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        check_positive(
            self, "vision", "image_size", "patch_size", "hidden_size", "intermediate_size",
            "num_layers", "num_heads", "num_channels",
        )  # fmt: skip
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"vision.patch_size={self.patch_size} exceeds vision.image_size={self.image_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision.hidden_size={self.hidden_size} is not a multiple of "
                f"vision.num_heads={self.num_heads}"
            )
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"vision.{key}={getattr(self, key)!r} is not one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """How image features reach the decoder (LLaVA-1.5 single view or LLaVA-NeXT anyres).

    `image_grid_pinpoints` are (height, width) canvas sizes in pixels, multiples of
    the tile size (`vision.image_size`); only `kind: llava_next` uses them.
    """

    image_token_id: int = 3
    feature_layer: int = -2  # index into the tower's hidden states (0 = embeddings)
    feature_strategy: Literal["default", "full"] = "default"  # default drops the CLS token
    projector: Literal["mlp2x_gelu"] = "mlp2x_gelu"
    projector_bias: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    images_per_sample: int = 1  # I of the per-sample padded batch layout


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """How Qwen2-VL / Qwen2.5-VL prompts mark images and videos: each item is
    `vision_start`, then one placeholder id per merged token, then `vision_end`
    (the defaults are the Qwen2 tokenizer's ids). `min_pixels` / `max_pixels`
    bound the area the image processor resizes an image to (its
    `preprocessor_config.json`; Hugging Face's defaults): they fix how many
    tokens an image becomes, so training data and prompts depend on them.
    `video_min_pixels` / `video_max_pixels` do the same for a video's frames
    (transformers' `Qwen2VLVideoProcessor` defaults: 128 and 768 merge units)."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28


QWEN_VL_KINDS = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: its kind and its parts (`vision`, `llava` for the LLaVA kinds;
    `qwen_vision`, `qwen_vl` and `decoder.mrope_section` for the Qwen-VL kinds)."""

    kind: Literal["causal_lm", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"] = "causal_lm"
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    vision: VisionConfig | None = None
    llava: LlavaConfig | None = None
    qwen_vision: QwenVisionConfig | None = None
    qwen_vl: QwenVLConfig | None = None

    @property
    def is_vlm(self) -> bool:
        """A LLaVA kind (CLIP/SigLIP tower, projector, per-sample image layout)."""
        return self.kind in ("llava", "llava_next")

    @property
    def is_qwen_vl(self) -> bool:
        """A Qwen2-VL / Qwen2.5-VL kind (`models.qwen_vl`)."""
        return self.kind in QWEN_VL_KINDS

    @property
    def takes_images(self) -> bool:
        """Any vision-language kind (LLaVA or Qwen-VL)."""
        return self.is_vlm or self.is_qwen_vl

    def validate(self) -> None:
        self.decoder.validate()
        if self.is_qwen_vl:
            self._validate_qwen_vl()
            return
        if not self.is_vlm:
            return
        if self.vision is None or self.llava is None:
            raise ConfigError(f"model.kind={self.kind!r} needs model.vision and model.llava")
        self.vision.validate()
        tile = self.vision.image_size
        if self.kind == "llava_next":
            if not self.llava.image_grid_pinpoints:
                raise ConfigError("model.llava.image_grid_pinpoints is empty (llava_next)")
            for h, w in self.llava.image_grid_pinpoints:
                if h % tile or w % tile or h <= 0 or w <= 0:
                    raise ConfigError(
                        f"model.llava.image_grid_pinpoints: {[h, w]} is not a positive "
                        f"multiple of the tile size {tile}"
                    )
            want = "default" if self.vision.family == "clip" else "full"
            if self.llava.feature_strategy != want:
                raise ConfigError(
                    f"model.llava.feature_strategy must be {want!r} for anyres with a "
                    f"{self.vision.family} tower (tile features must form a square grid)"
                )
        if self.llava.images_per_sample < 1:
            raise ConfigError("model.llava.images_per_sample must be >= 1")

    def _validate_qwen_vl(self) -> None:
        if self.qwen_vision is None or self.qwen_vl is None:
            raise ConfigError(f"model.kind={self.kind!r} needs model.qwen_vision and model.qwen_vl")
        self.qwen_vision.validate()
        if self.qwen_vision.family != self.kind:
            raise ConfigError(
                f"model.qwen_vision.family={self.qwen_vision.family!r} does not match "
                f"model.kind={self.kind!r}"
            )
        if self.decoder.mrope_section is None:
            raise ConfigError(f"model.kind={self.kind!r} needs model.decoder.mrope_section")
        if self.decoder.family != "qwen2":
            raise ConfigError(
                f"model.kind={self.kind!r} has a Qwen2 decoder: set model.decoder.family: qwen2 "
                f"(got {self.decoder.family!r})"
            )
        for prefix in ("", "video_"):
            lo = getattr(self.qwen_vl, f"{prefix}min_pixels")
            hi = getattr(self.qwen_vl, f"{prefix}max_pixels")
            if not 0 < lo <= hi:
                raise ConfigError(
                    f"model.qwen_vl: need 0 < {prefix}min_pixels <= {prefix}max_pixels, "
                    f"got {lo}, {hi}"
                )
        if self.qwen_vision.out_hidden_size != self.decoder.hidden_size:
            raise ConfigError(
                f"model.qwen_vision.out_hidden_size={self.qwen_vision.out_hidden_size} must equal "
                f"model.decoder.hidden_size={self.decoder.hidden_size}"
            )
        for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
            value = getattr(self.qwen_vl, key)
            if not 0 <= value < self.decoder.vocab_size:
                raise ConfigError(
                    f"model.qwen_vl.{key}={value} is not a vocabulary id "
                    f"(vocab_size {self.decoder.vocab_size})"
                )
