"""Image loading and preprocessing, equal to transformers' LLaVA-NeXT image
processor (PIL backend) on the same input.

Per image (anyres): convert to RGB (transparency composited on white), pick
the grid canvas (`vision_grid.best_resolution`), resize to fit it keeping the
aspect ratio (bicubic), pad centred with zeros, cut row-major tiles, put a
squashed resize of the whole image first (the base view), then per tile:
shortest-edge resize, centre crop, x/255, (x - mean) / std. Single view
(`llava`): shortest-edge resize + centre crop only.

`ImageProcessor.__call__` returns the Hugging Face layout (pixel_values
(images, tiles, 3, H, W) padded to the batch's largest tile count, image_sizes
(images, 2)); `pack_samples` builds the per-sample layout the model trains on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from insightv_jax.errors import DataError
from insightv_jax.vision_grid import best_resolution, max_tiles

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3
PREPROCESSOR_FILE = "preprocessor_config.json"


def open_image(source, name: str = "image") -> Image.Image:
    """A decoded PIL image (its own mode) from a path, bytes or PIL image; a one-line
    DataError naming `name` if it is missing, unreadable, truncated or empty."""
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(Path(source))
        img.load()
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise DataError(f"{name}: unreadable image ({reason})") from None
    if img.width == 0 or img.height == 0:
        raise DataError(f"{name}: image has zero size ({img.width}x{img.height})")
    return img


def load_image(source, name: str = "image") -> Image.Image:
    """`open_image`, in RGB (`to_rgb`)."""
    return to_rgb(open_image(source, name))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as transformers does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _fit_size(height: int, width: int, th: int, tw: int) -> tuple[int, int]:
    """Size after resizing into (th, tw) keeping the aspect ratio (ceil, capped)."""
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Centre crop of (H, W, C), zero-padding first where the image is smaller."""
    h, w = arr.shape[:2]
    if h < ch or w < cw:
        nh, nw = max(h, ch), max(w, cw)
        canvas = np.zeros((nh, nw, arr.shape[2]), arr.dtype)
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        canvas[top : top + h, left : left + w] = arr
        arr, h, w = canvas, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top : top + ch, left : left + cw]


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """LLaVA(-NeXT) preprocessing; `pinpoints` (height, width) empty = single view."""

    shortest_edge: int = 336
    crop_size: tuple[int, int] = (336, 336)
    pinpoints: tuple[tuple[int, int], ...] = ()
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def for_model(cls, cfg) -> ImageProcessor:
        """The processor matching a VLM ModelConfig (tile = vision.image_size)."""
        t = cfg.vision.image_size
        pins = cfg.llava.image_grid_pinpoints if cfg.kind == "llava_next" else ()
        norm = {}
        if cfg.vision.family == "siglip":  # SigLIP normalises to [-1, 1]
            norm = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
        return cls(shortest_edge=t, crop_size=(t, t), pinpoints=tuple(pins), **norm)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageProcessor:
        path = Path(folder) / PREPROCESSOR_FILE
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read image processor config ({e})") from None
        size, crop = d.get("size", {}), d.get("crop_size", {})
        edge = size.get("shortest_edge") or size.get("height")
        return cls(
            shortest_edge=int(edge),
            crop_size=(int(crop.get("height", edge)), int(crop.get("width", edge))),
            pinpoints=tuple(tuple(p) for p in d.get("image_grid_pinpoints") or ()),
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )

    def to_dict(self) -> dict:
        """A `preprocessor_config.json` that transformers loads too."""
        d = {
            "image_processor_type": (
                "LlavaNextImageProcessor" if self.pinpoints else "CLIPImageProcessor"
            ),
            "size": {"shortest_edge": self.shortest_edge},
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "do_resize": True,
            "do_center_crop": True,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "resample": BICUBIC,
        }
        if self.pinpoints:
            d.update(image_grid_pinpoints=[list(p) for p in self.pinpoints], do_pad=True)
        return d

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2))

    # ------------------------------------------------------------ pipeline

    def _finish(self, tile: Image.Image) -> np.ndarray:
        """Shortest-edge resize, centre crop, rescale, normalise -> (3, H, W) fp32."""
        size = _shortest_edge_size(tile.height, tile.width, self.shortest_edge)
        if size != (tile.height, tile.width):
            tile = tile.resize((size[1], size[0]), BICUBIC)
        arr = _center_crop(np.asarray(tile), *self.crop_size)
        x = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        return ((x - mean) / std).transpose(2, 0, 1)

    def tiles(self, image, name: str = "image") -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (tiles (n, 3, H, W) fp32, (height, width))."""
        img = load_image(image, name)
        height, width = img.height, img.width
        if not self.pinpoints:
            return self._finish(img)[None], (height, width)
        th, tw = best_resolution(height, width, self.pinpoints)
        nh, nw = _fit_size(height, width, th, tw)
        fitted = np.asarray(img.resize((nw, nh), BICUBIC))
        top, left = (th - nh) // 2, (tw - nw) // 2
        canvas = np.zeros((th, tw, 3), np.uint8)
        canvas[top : top + nh, left : left + nw] = fitted
        t = self.crop_size[0]
        views = [img.resize((self.shortest_edge, self.shortest_edge), BICUBIC)]
        views += [
            Image.fromarray(canvas[i : i + t, j : j + t])
            for i in range(0, th, t)
            for j in range(0, tw, t)
        ]
        return np.stack([self._finish(v) for v in views]), (height, width)

    def __call__(self, images, names=None) -> dict[str, np.ndarray]:
        """Hugging Face layout for a list of images (paths, bytes or PIL images)."""
        names = names or [f"image {k}" for k in range(len(images))]
        out = [self.tiles(im, n) for im, n in zip(images, names)]
        most = max(t.shape[0] for t, _ in out)
        pv = np.zeros((len(out), most, *out[0][0].shape[1:]), np.float32)
        for k, (t, _) in enumerate(out):
            pv[k, : t.shape[0]] = t
        if not self.pinpoints:
            pv = pv[:, 0]
        return {"pixel_values": pv, "image_sizes": np.array([s for _, s in out], np.int64)}


def pack_samples(samples, processor: ImageProcessor, cfg, images_per_sample: int | None = None):
    """Per-sample layout for a batch: `samples[b]` is a list of (image, name).

    Returns pixel_values (B, I, tiles, 3, H, W) fp32 and image_sizes (B, I, 2)
    int32, empty slots zero; tiles = `vision_grid.max_tiles(cfg)` (static).
    """
    n_img = images_per_sample or cfg.llava.images_per_sample
    S, t = max_tiles(cfg), cfg.vision.image_size
    pv = np.zeros((len(samples), n_img, S, 3, t, t), np.float32)
    sizes = np.zeros((len(samples), n_img, 2), np.int32)
    for b, images in enumerate(samples):
        if len(images) > n_img:
            raise DataError(f"sample {b}: {len(images)} images, more than {n_img} per sample")
        for i, (image, name) in enumerate(images):
            tiles, size = processor.tiles(image, name)
            pv[b, i, : tiles.shape[0]] = tiles
            sizes[b, i] = size
    return pv, sizes
