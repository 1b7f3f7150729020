"""Tokenizer and processor files that travel with a checkpoint unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# a Hugging Face folder has a tokenizer when it has one of these
HF_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    src, dst = Path(src), Path(dst)
    found = [n for n in names if (src / n).is_file()]
    if found:
        dst.mkdir(parents=True, exist_ok=True)
        for name in found:
            shutil.copy2(src / name, dst / name)
    return found


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files present in `src` to `dst`; returns their names."""
    return _copy(src, dst, TOKENIZER_FILES)


def copy_processor_files(src: Path, dst: Path) -> list[str]:
    """Copy the image-processor files present in `src` to `dst`."""
    return _copy(src, dst, PROCESSOR_FILES)


def copy_aux_dirs(dst: Path, tokenizer_dir: Path | None, processor_dir: Path | None) -> None:
    """Copy tokenizer / processor files into `dst/tokenizer` and `dst/processor`."""
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, dst / "tokenizer")
    if processor_dir is not None:
        copy_processor_files(processor_dir, dst / "processor")
