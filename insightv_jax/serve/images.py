"""The images of `image_url` parts.

A client sends an image as a `data:<mime>;base64,<bytes>` URL (what OpenAI's
clients and our own `pipeline.openai_backend` send). A local file is read only
when the server was started with an image root, and only from inside it
(a `file://` URL or a path; `..` and links that leave the root are refused):
a server must not hand out the files of the machine it runs on. Remote
http(s) URLs are not fetched. Every image is limited in bytes and in pixels
before it is decoded, then decoded in full (truncated files fail here, as a
400, not in the model).
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from insightv_jax.data.images import load_image
from insightv_jax.errors import DataError

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)",
                       re.DOTALL)  # fmt: skip
MAX_PIXELS = 64 * 1024 * 1024  # beyond any image a VLM processor resizes from


class ImageRejected(ValueError):
    """An image part the server will not take; `code` names why (for the 400)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def load_image_url(url: str, max_bytes: int, root: Path | None, where: str) -> Image.Image:
    """The RGB image an `image_url` names; ImageRejected (one line, naming
    `where`) if it is too large, unreadable, remote or outside `root`."""
    if not isinstance(url, str) or not url:
        raise ImageRejected(f"{where}: image_url.url must be a non-empty string", "invalid_image")
    if url.startswith("data:"):
        data = _data_url_bytes(url, max_bytes, where)
    elif re.match(r"^[a-zA-Z][\w+.-]*://", url) and not url.startswith("file://"):
        raise ImageRejected(
            f"{where}: remote image URLs are not fetched; send the image as a data: URL",
            "unsupported_image_url",
        )
    else:
        data = _file_bytes(url, max_bytes, root, where)
    return _decode(data, where)


def _data_url_bytes(url: str, max_bytes: int, where: str) -> bytes:
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise ImageRejected(f"{where}: not a base64 data URL (data:<mime>;base64,...)",
                            "invalid_image")  # fmt: skip
    payload = m.group("data")
    if len(payload) > 4 * (max_bytes // 3 + 1) + 4:  # before decoding it
        raise ImageRejected(f"{where}: image is over the server's limit of {max_bytes} "
                            "bytes", "image_too_large")  # fmt: skip
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected(f"{where}: data URL is not valid base64", "invalid_image") from None
    if len(data) > max_bytes:
        raise ImageRejected(f"{where}: image is {len(data)} bytes, over the server's limit of "
                            f"{max_bytes}", "image_too_large")  # fmt: skip
    return data


def _file_bytes(url: str, max_bytes: int, root: Path | None, where: str) -> bytes:
    if root is None:
        raise ImageRejected(
            f"{where}: local image paths are not served (start the server with --image-root "
            "DIR to allow files under DIR); send the image as a data: URL",
            "local_images_disabled",
        )
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    resolved_root = root.resolve()
    full = (resolved_root / path).resolve()  # an absolute path stays itself
    if not full.is_relative_to(resolved_root):
        raise ImageRejected(f"{where}: {path} is outside the image root", "image_outside_root")
    if not full.is_file():
        raise ImageRejected(f"{where}: image file {path} not found", "image_not_found")
    size = full.stat().st_size
    if size > max_bytes:
        raise ImageRejected(f"{where}: image is {size} bytes, over the server's limit of "
                            f"{max_bytes}", "image_too_large")  # fmt: skip
    return full.read_bytes()


def _decode(data: bytes, where: str) -> Image.Image:
    import io

    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            w, h = probe.size
    except (OSError, ValueError, Image.DecompressionBombError):
        raise ImageRejected(f"{where}: not an image PIL can read", "invalid_image") from None
    if w * h > MAX_PIXELS:
        raise ImageRejected(f"{where}: image of {w}x{h} pixels is over the server's limit of "
                            f"{MAX_PIXELS}", "image_too_large")  # fmt: skip
    try:
        return load_image(data, where)
    except DataError as e:
        raise ImageRejected(str(e), "invalid_image") from None
