"""A small, self-contained tokenisation transform for the loader's tests (word-level
vocabulary, a two-role template, `<image>` expansion, assistant-only labels,
images as float32 tiles): fast, and independent of the chat-template code.

It has the same contract as the real transform built from data/conversation.py
(chat templates + BPE tokenizer) and data/images.py: a picklable callable
`record -> {input_ids (L,), labels (L,), pixel_values (I, tiles, 3, H, W),
image_sizes (I, 2)}` with `labels = -100` off assistant tokens. The loader
pads and batches whatever such a transform returns.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from insightv_jax.errors import DataError

PAD, BOS, EOS, IMAGE, UNK, USER, ASSISTANT = range(7)
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>", "<user>", "<assistant>"]
_WORD = re.compile(r"<image>|\w+|[^\w\s]")


class WordTokenizer:
    """Word/punctuation vocabulary built from a corpus; unknown words map to <unk>."""

    def __init__(self, words: list[str]):
        self.vocab = {w: i for i, w in enumerate(SPECIALS)}
        for w in words:
            self.vocab.setdefault(w, len(self.vocab))

    @classmethod
    def from_texts(cls, texts) -> WordTokenizer:
        return cls(sorted({w.lower() for t in texts for w in _WORD.findall(t)} - set(SPECIALS)))

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(w.lower(), UNK) for w in _WORD.findall(text)]

    def count(self, text: str) -> int:
        return len(_WORD.findall(text))

    def __len__(self) -> int:
        return len(self.vocab)


class SimpleTransform:
    """`<s> (<user> human-tokens <assistant> gpt-tokens </s>)*`; `<image>` becomes
    `image_tokens` image ids; labels on the gpt tokens and their `</s>`."""

    def __init__(self, tokenizer: WordTokenizer, root: str | Path, image_tokens: int = 16):
        self.tok, self.root, self.image_tokens = tokenizer, Path(root), image_tokens

    def _images(self, rec: dict) -> list[np.ndarray]:
        if "image_arrays" in rec:
            return [np.asarray(a, np.uint8) for a in rec["image_arrays"]]
        paths = rec.get("image") or []
        out = []
        for p in [paths] if isinstance(paths, str) else paths:
            try:
                with Image.open(io.BytesIO((self.root / p).read_bytes())) as img:
                    out.append(np.asarray(img.convert("RGB")))
            except (OSError, ValueError) as e:
                raise DataError(f"record {rec.get('id')}: image {p} ({type(e).__name__})") from None
        return out

    def __call__(self, rec: dict) -> dict[str, np.ndarray]:
        ids, labels = [BOS], [-100]
        for turn in rec["conversations"]:
            if turn["from"] == "system":
                continue
            body = []
            for t in self.tok.encode(turn["value"]):
                body.extend([IMAGE] * self.image_tokens if t == IMAGE else [t])
            if turn["from"] == "human":
                ids += [USER, *body]
                labels += [-100] * (len(body) + 1)
            else:
                ids += [ASSISTANT, *body, EOS]
                labels += [-100, *body, EOS]
        images = self._images(rec)
        out = {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)}
        if images:
            pix = np.stack([a.astype(np.float32).transpose(2, 0, 1) / 255.0 for a in images])
            out["pixel_values"] = pix[:, None]  # (I, tiles=1, 3, H, W)
            out["image_sizes"] = np.asarray([a.shape[:2] for a in images], np.int32)
        return out
