"""What every Hugging Face importer does with converted tensors: place each one,
shape-checked, into the model's abstract parameter tree on its sharding, and
check afterwards that the checkpoint held no tensor the config does not use."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np

from insightv_jax.errors import CheckpointError
from insightv_jax.hf.keymap import IGNORED_KEY_SUFFIXES


def place(target: dict, path: tuple[str, ...], host: np.ndarray, where: str, key: str) -> None:
    """Replace the abstract leaf at `path` of `target` by `host` (converted to our
    layout) on the leaf's sharding; a one-line CheckpointError naming `where` (its
    file) and `key` (the HF tensor) when the shapes differ."""
    leaf = target
    for p in path[:-1]:
        leaf = leaf[p]
    spec = leaf[path[-1]]
    if host.shape != spec.shape:
        raise CheckpointError(
            f"{where}: tensor {key!r} does not fit the config "
            f"(converted shape {host.shape}, config expects {spec.shape})"
        )
    host = host.astype(spec.dtype)
    leaf[path[-1]] = jax.make_array_from_callback(spec.shape, spec.sharding, lambda i: host[i])


def check_all_used(
    tensors, used: Iterable[str], tied_head: bool, skip: Callable[[str], bool] = lambda k: False
) -> None:
    """A one-line CheckpointError naming the first tensor of `tensors` (a
    SafetensorsFolder) that is not in `used`, not a known leftover (rotary
    buffers...), not the LM head of a tied checkpoint and not `skip`ped."""
    used = set(used)
    extra = [
        k
        for k in tensors.keys()
        if k not in used
        and not k.endswith(IGNORED_KEY_SUFFIXES)
        and not (tied_head and k.endswith("lm_head.weight"))
        and not skip(k)
    ]
    if extra:
        raise CheckpointError(
            f"{tensors.key_to_file[extra[0]]}: tensor {extra[0]!r} is not used by the config "
            f"({len(extra)} unused tensors; does config.json match the weights?)"
        )
