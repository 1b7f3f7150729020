"""Validation of every record before training (METHOD/DESIGN: bad input is named).

Checks: parseable, an id, a non-empty alternating conversation (optional leading
system turn, human first, gpt last) with non-empty text, `<image>` count equal to
the number of images, image paths relative and inside the data root, images that
exist and decode, valid UTF-8 text, and a length within `max_length` after each
`<image>` is expanded to its image-token count.

A record may carry videos (Qwen-VL models only), each as its sampled frames:

    "video": {"frames": ["clip/0.png", "clip/1.png", ...], "fps": 2.0}
    "video": [{"frames": [...], "seconds_per_frame": 0.5}, ...]

`fps` or `seconds_per_frame` (one of them) is the rate of the frames given. The
checks: each `<video>` in the conversation has its video, each video has frames
(paths as for images) that exist, decode and share one size, and a positive
rate; a model that takes no videos (`Limits.video_tokens` None) refuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from insightv_jax.data.sources import BadRecord, record_id
from insightv_jax.errors import DataError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
_WORD = re.compile(r"\w+|[^\w\s]")


def approx_token_count(text: str) -> int:
    """Words and punctuation marks: a stand-in when no tokenizer is given."""
    return len(_WORD.findall(text))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a record must fit: `image_tokens` per image (an int or a function of
    the image's (height, width)), `max_length` tokens after expansion, and a text
    token counter (`count_tokens`; default words+punctuation, plus 4 per turn for
    the chat template). `count_conversation(conversation, image_token_counts,
    video_token_counts)`, when given, is exact (the transform's own rendering,
    system prompt and markers included) and replaces the estimate.
    `video_tokens` per video (an int or a function of its frame count and
    frame (height, width)); None: the model takes no videos."""

    max_length: int = 4096
    image_tokens: int | Callable[[tuple[int, int]], int] = 16
    count_tokens: Callable[[str], int] = approx_token_count
    turn_overhead: int = 4
    count_conversation: Callable[[list[dict], list[int], list[int]], int] | None = None
    video_tokens: int | Callable[[int, tuple[int, int]], int] | None = 16


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass
class Report:
    total: int = 0
    good: list[int] = dataclasses.field(default_factory=list)
    bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (id, reason)

    def reasons(self) -> dict[str, int]:
        """Bad-record counts by reason kind (the reason's text before any ':' or '(')."""
        out: dict[str, int] = {}
        for _, reason in self.bad:
            kind = re.split(r"[:(]", reason)[0].strip()
            out[kind] = out.get(kind, 0) + 1
        return out


def image_paths(rec: dict) -> list:
    img = rec.get("image")
    if img is None:
        return []
    return list(img) if isinstance(img, list) else [img]


def record_videos(rec: dict) -> list:
    """A record's `video` entries in order (one object or a list of them)."""
    video = rec.get("video")
    if video is None:
        return []
    return list(video) if isinstance(video, list) else [video]


def video_fps(video: dict) -> float:
    """The frame rate of a (validated) video entry: `fps`, or 1 / `seconds_per_frame`."""
    return float(video["fps"]) if "fps" in video else 1.0 / float(video["seconds_per_frame"])


def _video_rate_reason(video: dict) -> str | None:
    rates = [k for k in ("fps", "seconds_per_frame") if k in video]
    if len(rates) != 1:
        return "needs one of fps or seconds_per_frame"
    value = video[rates[0]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        return f"{rates[0]} {value!r} is not a positive number"
    return None


def _check_utf8_fast(rec) -> str | None:
    """`_check_utf8` in one C-level pass for the common, clean record."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
        return None
    except (UnicodeEncodeError, TypeError, ValueError):  # name the field (or non-JSON values)
        return _check_utf8(rec, "record")


def _check_utf8(value, where: str) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where}: text is not valid UTF-8"
    elif isinstance(value, dict):
        for k, v in value.items():
            if (r := _check_utf8(v, f"{where}.{k}")) is not None:
                return r
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (r := _check_utf8(v, f"{where}[{i}]")) is not None:
                return r
    return None


def _check_conversation(conv) -> str | None:
    if not isinstance(conv, list) or not conv:
        return "empty conversation"
    turns = conv[1:] if isinstance(conv[0], dict) and conv[0].get("from") == "system" else conv
    if not turns:
        return "empty conversation"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"conversation turn {i}: not a {{from, value}} object"
        want = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != want:
            return f"conversation turn {i}: expected from={want}, got {turn.get('from')!r}"
        if not turn["value"].strip():
            return f"conversation turn {i}: empty text"
    if len(turns) % 2:
        return "conversation does not end with a gpt turn"
    return None


def load_image_size(path: Path) -> tuple[int, int]:
    """(height, width) of a fully decoded image; raises OSError/ValueError if broken.

    A file is decoded once per process while it is unchanged: records often share
    an image (a question and its perception question, a question's chains), and
    length grouping re-measures what validation decoded."""
    full = os.path.abspath(path)
    st = os.stat(full)
    return _decoded_size(full, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def _image_file(root: str, p: str) -> tuple[str | None, os.stat_result | None]:
    """(real path, stat) of image `p` relative to the real directory `root`:
    path None when it leaves `root` (`..`, absolute, a symlink out), stat None
    when it is not a file. Resolves each directory once and each file with one
    lstat, since validation checks every record's images."""

    def inside(path: str) -> bool:
        return path.startswith(root + os.sep)

    if os.path.isabs(p):
        return None, None
    head, name = os.path.split(os.path.join(root, p))
    full = os.path.normpath(os.path.join(_real_dir(head), name))
    if not inside(full):
        return None, None
    try:
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            full = os.path.realpath(full)
            if not inside(full):
                return None, None
            st = os.stat(full)
    except OSError:
        return full, None
    return full, (st if stat.S_ISREG(st.st_mode) else None)


@functools.lru_cache(maxsize=1 << 20)
def _decoded_size(path: str, mtime_ns: int, size: int) -> tuple[int, int]:
    with Image.open(io.BytesIO(Path(path).read_bytes())) as img:
        img.load()
        return img.height, img.width


def token_count(conv: list[dict], sizes: list[tuple[int, int]], limits: Limits, videos=()) -> int:
    """Tokens of a conversation with images of `sizes` and `videos` ((frame
    count, (height, width)) each), as `limits` counts them."""
    per_image, per_video = limits.image_tokens, limits.video_tokens
    counts = [per_image(s) if callable(per_image) else per_image for s in sizes]
    video_counts = [per_video(n, s) if callable(per_video) else per_video for n, s in videos]
    if limits.count_conversation is not None:
        return limits.count_conversation(conv, counts, video_counts)
    text_len = sum(
        limits.count_tokens(t["value"].replace(IMAGE_TOKEN, " ").replace(VIDEO_TOKEN, " "))
        + limits.turn_overhead
        for t in conv
    )
    return text_len + sum(counts) + sum(video_counts)


def estimated_length(rec: dict, root: Path, limits: Limits) -> int:
    """A valid record's token count as validation measures it: the key of length
    grouping when the transform cannot count for itself."""
    conv = rec["conversations"]
    if "image_arrays" in rec:
        sizes = [tuple(a.shape[:2]) for a in rec["image_arrays"]]
    elif callable(limits.image_tokens):
        sizes = [load_image_size(Path(root) / p) for p in image_paths(rec)]
    else:  # a fixed count per image: sizes do not matter
        sizes = [(0, 0)] * sum(t["value"].count(IMAGE_TOKEN) for t in conv)
    videos = [
        (len(v["frames"]), load_image_size(Path(root) / v["frames"][0])) for v in record_videos(rec)
    ]
    return token_count(conv, sizes, limits, videos)


def _frame_reason(root_abs: str, p, what: str) -> tuple[str | None, tuple[int, int] | None]:
    """(reason, None) if image file `p` is bad, else (None, its decoded (height, width))."""
    if not isinstance(p, str) or not p:
        return f"{what} path {p!r} is not a string", None
    full, st = _image_file(root_abs, p)
    if full is None:
        return f"{what} path {p} leaves the data root", None
    if st is None:
        return f"{what} {p} not found", None
    try:
        return None, _decoded_size(full, st.st_mtime_ns, st.st_size)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return f"{what} {p} does not decode ({type(e).__name__})", None


def _check_videos(rec: dict, root: Path) -> tuple[str | None, list[tuple[int, tuple[int, int]]]]:
    """(reason, []) for a bad `video` field, else (None, [(frames, (height, width))])."""
    root_abs = _real_dir(str(root))
    out = []
    for k, video in enumerate(record_videos(rec)):
        if not isinstance(video, dict):
            return f"video {k}: not a {{frames, fps}} object", []
        frames = video.get("frames")
        if not isinstance(frames, list) or not frames:
            return f"video {k}: frames must be a non-empty list of image paths", []
        if (r := _video_rate_reason(video)) is not None:
            return f"video {k}: {r}", []
        sizes = set()
        for p in frames:
            reason, size = _frame_reason(root_abs, p, f"video {k} frame")
            if reason is not None:
                return reason, []
            sizes.add(size)
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
            return f"video {k}: frames of different sizes ({shown})", []
        out.append((len(frames), sizes.pop()))
    return None, out


def check_record(rec, root: Path, limits: Limits) -> str | None:
    """The reason `rec` is bad, or None."""
    if isinstance(rec, BadRecord):
        return rec.reason
    if (r := _check_utf8_fast(rec)) is not None:
        return r
    conv = rec.get("conversations")
    if (r := _check_conversation(conv)) is not None:
        return r
    sizes: list[tuple[int, int]] = []
    if "image_arrays" in rec:
        sizes = [tuple(a.shape[:2]) for a in rec["image_arrays"]]
    else:
        root_abs = _real_dir(str(root))
        for p in image_paths(rec):
            reason, size = _frame_reason(root_abs, p, "image")
            if reason is not None:
                return reason
            sizes.append(size)
    n_tags = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
    if n_tags != len(sizes):
        return f"{n_tags} <image> tag(s) but {len(sizes)} image(s)"
    videos: list[tuple[int, tuple[int, int]]] = []
    if limits.video_tokens is None:  # the model's: `<video>` is plain text to it
        if record_videos(rec):
            return "has a video, but the model takes no videos (only Qwen-VL models do)"
    else:
        reason, videos = _check_videos(rec, root)
        if reason is not None:
            return reason
        n_tags = sum(t["value"].count(VIDEO_TOKEN) for t in conv)
        if n_tags != len(videos):
            return f"{n_tags} <video> tag(s) but {len(videos)} video(s)"
    try:
        n = token_count(conv, sizes, limits, videos)
    except DataError as e:  # the transform's own rendering refused it
        return str(e)
    if n > limits.max_length:
        return f"too long: {n} tokens > max_length {limits.max_length}"
    return None


def validate_source(
    source, limits: Limits = DEFAULT_LIMITS, root: str | Path | None = None, check=check_record
) -> Report:
    """Check every record of `source` with `check(rec, root, limits) -> reason | None`;
    the report lists good indices and bad (id, reason)."""
    root = Path(root) if root is not None else Path(getattr(source, "root", "."))
    report = Report(total=len(source))
    for i in range(len(source)):
        rec = source[i]
        reason = check(rec, root, limits)
        if reason is None:
            report.good.append(i)
        else:
            report.bad.append((record_id(rec, i), reason))
    return report
