"""Image preprocessing for Qwen2-VL / Qwen2.5-VL, equal to transformers'
`Qwen2VLImageProcessorPil` on the same input.

Per image: convert to RGB (transparency composited on white), resize
(bicubic) to the size `smart_resize` picks (each side a multiple of
patch_size * merge_size, the area kept within [min_pixels, max_pixels]),
x/255, (x - mean) / std, then cut into patch_size x patch_size patches. The
patches come out grouped by merge unit: the merge_size x merge_size patches
that the model's merger fuses into one token are consecutive rows, the units
row-major over the image. A still image is repeated along time to
`temporal_patch_size` frames, so each row is (C, T, p, p) flattened.

`QwenImageProcessor.__call__` returns the Hugging Face layout that
`models.qwen_vl.QwenVL` takes: pixel_values (total_patches, C*T*p*p) float32
and image_grid_thw (images, 3) int64, each row (1, grid_h, grid_w).

`QwenImageProcessor.video` lays out one video's (already sampled) frames the
same way: frames resized alike, padded to a multiple of `temporal_patch_size`
by repeating the last, each pair of frames one temporal patch, giving
pixel_values_videos, video_grid_thw (1, 3) and second_per_grid_ts
(temporal_patch_size / fps, as Qwen2.5-VL's processor). transformers' video
processor needs torchvision, which these machines cannot run, so this path
was not checked against it (it resizes frames with PIL's bicubic as the image
path does; torchvision's resize can differ by rounding). A still image is
exactly a video of its frame repeated `temporal_patch_size` times (tested).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from insightv_jax.data.images import CLIP_MEAN, CLIP_STD, open_image, to_rgb
from insightv_jax.errors import DataError

BICUBIC = 3
PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28  # transformers' Qwen2VLVideoProcessor defaults
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_ASPECT = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) to resize to: both multiples of `factor`, close to the
    input's aspect ratio, the area brought into [min_pixels, max_pixels].

    Each side is first rounded to the nearest multiple (Python's round, ties to
    even). If that area is too large, both sides are scaled down by the same
    factor and floored to a multiple (at least `factor`); if too small, scaled
    up and ceiled. Raises ValueError for an aspect ratio above 200.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT:
        raise ValueError(f"aspect ratio {ratio:.1f} is above {MAX_ASPECT}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def _config_error(path, msg: str) -> DataError:
    return DataError(f"{path}: {msg}")


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    """Qwen2-VL / Qwen2.5-VL image preprocessing (the two share it)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resample: int = BICUBIC
    rescale_factor: float = 1 / 255
    do_convert_rgb: bool = True
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merge unit, in pixels."""
        return self.patch_size * self.merge_size

    # ------------------------------------------------------------ config

    @classmethod
    def for_model(cls, cfg) -> QwenImageProcessor:
        """The processor a Qwen-VL `ModelConfig` was trained with: its tower's
        patch, time and merge sizes, `qwen_vl`'s pixel bounds (images' and
        video frames'), CLIP's mean and std (every Qwen2-VL / Qwen2.5-VL
        checkpoint's)."""
        v = cfg.qwen_vision
        return cls(
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size,
            min_pixels=cfg.qwen_vl.min_pixels,
            max_pixels=cfg.qwen_vl.max_pixels,
            video_min_pixels=cfg.qwen_vl.video_min_pixels,
            video_max_pixels=cfg.qwen_vl.video_max_pixels,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> QwenImageProcessor:
        """Read a Hugging Face `preprocessor_config.json`. Pixel bounds come
        from top-level `min_pixels` / `max_pixels` (older Qwen2-VL configs) or
        `size: {shortest_edge, longest_edge}` (the top-level ones win)."""
        path = Path(folder) / PREPROCESSOR_FILE
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise _config_error(path, f"cannot read image processor config ({e})") from None
        if not isinstance(d, dict):
            raise _config_error(path, "image processor config is not a JSON object")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(flag, True) is False:
                raise _config_error(path, f"{flag}: false is not supported")
        size = d.get("size") or {}
        min_px = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_px = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        try:
            proc = cls(
                patch_size=int(d.get("patch_size", 14)),
                temporal_patch_size=int(d.get("temporal_patch_size", 2)),
                merge_size=int(d.get("merge_size", 2)),
                min_pixels=int(DEFAULT_MIN_PIXELS if min_px is None else min_px),
                max_pixels=int(DEFAULT_MAX_PIXELS if max_px is None else max_px),
                image_mean=tuple(float(v) for v in d.get("image_mean", CLIP_MEAN)),
                image_std=tuple(float(v) for v in d.get("image_std", CLIP_STD)),
                resample=int(d.get("resample", BICUBIC)),
                rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                do_convert_rgb=bool(d.get("do_convert_rgb", True)),
            )
        except (TypeError, ValueError) as e:
            raise _config_error(path, f"bad image processor field ({e})") from None
        if min(proc.patch_size, proc.temporal_patch_size, proc.merge_size) < 1:
            raise _config_error(path, "patch_size, temporal_patch_size, merge_size must be >= 1")
        if not 0 < proc.min_pixels <= proc.max_pixels:
            raise _config_error(
                path, f"need 0 < min_pixels <= max_pixels, got {proc.min_pixels}, {proc.max_pixels}"
            )
        return proc

    def to_dict(self) -> dict:
        """A `preprocessor_config.json` that transformers loads too."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "resample": self.resample,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2))

    # ------------------------------------------------------------ pipeline

    def _pixels(self, img: Image.Image) -> np.ndarray:
        """(H, W, C) uint8 array, RGB unless do_convert_rgb is off."""
        if self.do_convert_rgb:
            img = to_rgb(img)
        arr = np.asarray(img)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def _frame(self, img: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """One image resized to `size` (h, w), rescaled and normalised: (C, H, W) fp32."""
        h, w = size
        arr = self._pixels(img)
        if (h, w) != arr.shape[:2]:
            # PIL resizes each band of the (up to 4-band) image independently.
            band = Image.fromarray(arr if arr.shape[2] != 1 else arr[:, :, 0])
            arr = np.asarray(band.resize((w, h), self.resample))
            arr = arr[:, :, None] if arr.ndim == 2 else arr
        x = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        return ((x - mean) / std).transpose(2, 0, 1)

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(F, C, H, W) frames, F a multiple of temporal_patch_size ->
        (patches (grid_t*grid_h*grid_w, C*T*p*p), (grid_t, grid_h, grid_w)):
        merge units row-major per temporal patch, each unit's patches
        consecutive, each row (C, T, p, p) flattened."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        F, c, h, w = frames.shape
        gt, gh, gw = F // t, h // p, w // p
        x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
        # -> (time, unit row, unit col, row in unit, col in unit, C, T, py, px)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x).reshape(gt * gh * gw, c * t * p * p), (gt, gh, gw)

    def patches(self, image, name: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches (grid_h*grid_w, C*T*p*p) float32, (1, grid_h, grid_w)):
        the frame repeated along time to one temporal patch."""
        img = open_image(image, name)
        try:
            size = self.resized_size(img.height, img.width)
        except ValueError as e:
            raise DataError(f"{name}: cannot resize {img.width}x{img.height} image ({e})") from None
        x = self._frame(img, size)
        return self._patchify(np.broadcast_to(x[None], (self.temporal_patch_size, *x.shape)))

    def video(self, frames, fps: float = 2.0, name: str = "video") -> dict[str, np.ndarray]:
        """One video's sampled frames (images of one size) in the Hugging Face
        layout: pixel_values_videos, video_grid_thw (1, 3), second_per_grid_ts
        (1,) = temporal_patch_size / fps (`fps`: of the sampled frames)."""
        imgs = [open_image(f, f"{name} frame {k}") for k, f in enumerate(frames)]
        if not imgs:
            raise DataError(f"{name}: no frames")
        if len({im.size for im in imgs}) > 1:
            raise DataError(f"{name}: frames of different sizes {sorted({im.size for im in imgs})}")
        if not fps > 0:
            raise DataError(f"{name}: fps must be positive, got {fps}")
        try:
            size = self.video_resized_size(imgs[0].height, imgs[0].width)
        except ValueError as e:
            raise DataError(
                f"{name}: cannot resize {imgs[0].width}x{imgs[0].height} ({e})"
            ) from None
        x = np.stack([self._frame(im, size) for im in imgs])
        if pad := -len(imgs) % self.temporal_patch_size:  # repeat the last frame
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        patches, grid = self._patchify(x)
        return {
            "pixel_values_videos": patches,
            "video_grid_thw": np.asarray([grid], dtype=np.int64),
            "second_per_grid_ts": np.asarray([self.temporal_patch_size / fps], np.float32),
        }

    def __call__(self, images, names=None) -> dict[str, np.ndarray]:
        """Hugging Face layout for a list of images (paths, bytes or PIL images)."""
        if isinstance(images, (str, Path, bytes, Image.Image)):
            images = [images]
        if not images:
            raise DataError("no images given to the Qwen image processor")
        if names is None:
            names = [
                str(im) if isinstance(im, (str, Path)) else f"image {k}"
                for k, im in enumerate(images)
            ]
        out = [self.patches(im, n) for im, n in zip(images, names)]
        return {
            "pixel_values": np.concatenate([pv for pv, _ in out], axis=0),
            "image_grid_thw": np.asarray([g for _, g in out], dtype=np.int64),
        }

    def num_patches(self, height: int, width: int) -> int:
        """Rows of pixel_values an image of this size gives (before merging)."""
        h, w = self.resized_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size)

    def num_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens an image of this size takes (one per merge unit)."""
        return self.num_patches(height, width) // self.merge_size**2

    def video_resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame of a video of this frame size is resized to."""
        return smart_resize(height, width, self.factor, self.video_min_pixels,
                            self.video_max_pixels)  # fmt: skip

    def num_video_tokens(self, frames: int, height: int, width: int) -> int:
        """Placeholder tokens a video of `frames` frames of this size takes:
        one per merge unit of each temporal patch (`frames` padded up to a
        multiple of temporal_patch_size, as `video` pads them)."""
        h, w = self.video_resized_size(height, width)
        grid_t = -(-frames // self.temporal_patch_size)
        return grid_t * (h // self.factor) * (w // self.factor)
