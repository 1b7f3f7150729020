"""The CPU panel kernel behind decode-step matmuls: the same products as XLA's
matmul, used by the decode transform where it applies, and a kernel that cannot be
built leaves decoding to XLA."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.models.cache import KVCache
from insightv_jax.models.factory import construct
from insightv_jax.sample import panel_matmul
from insightv_jax.sample.decode_transform import for_decoding

needs_kernel = pytest.mark.skipif(
    not panel_matmul.available(), reason="the panel kernel needs an x86-64 CPU with AVX-512"
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_panel_matmul_equals_xla_matmul(rows):
    rng = np.random.RandomState(rows)
    x = rng.randn(rows, 77).astype(np.float32)
    w = rng.randn(77, 100).astype(np.float32)  # 100 columns: 3 panels, the last zero-padded
    y = jax.jit(lambda x, p: panel_matmul.matmul(x, p, 100))(x, panel_matmul.pack(jnp.asarray(w)))
    assert y.shape == (rows, 100)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_decode_transform_packs_weights_and_decodes_as_xla_does():
    cfg = DecoderConfig(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    model = construct(ModelConfig(decoder=cfg), seed=0)
    packed, plain = for_decoding(model), for_decoding(model, pack=False)
    assert hasattr(packed.layers[0].attn, "qkv_proj_packed") and hasattr(packed, "head_packed")
    assert not hasattr(plain, "head_packed")
    prompt = jnp.asarray(np.random.RandomState(0).randint(1, 200, (2, 6)))
    logits = []
    for view in (packed, plain):
        cache = KVCache.empty(cfg, 2, 16)
        _, cache = view.forward_cached(view.embed_tokens(prompt), cache)  # 12 rows: XLA's matmul
        hidden, _ = view.forward_cached(view.embed_tokens(prompt[:, -1:]), cache)  # 2 rows: kernel
        logits.append(np.asarray(view.logits(hidden)))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
@pytest.mark.parametrize(
    "env, warned",
    [({"CXX": "false"}, True), ({panel_matmul.ENV_SWITCH: "0"}, False)],
    ids=["no-compiler", "switched-off"],
)
def test_without_the_kernel_decoding_uses_xla(tmp_path, env, warned):
    """A kernel that cannot be built (one warning) or is switched off leaves
    decoding to XLA's matmul."""
    code = """
import warnings
from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.sample import panel_matmul
from insightv_jax.models.factory import construct
from insightv_jax.sample.decode_transform import for_decoding
from insightv_jax.sample.sampler import Sampler, SamplingParams
cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                    num_heads=2, num_kv_heads=2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sampler = Sampler(construct(ModelConfig(decoder=cfg)), pad_id=0)
assert not panel_matmul.available()
warned = [str(w.message) for w in caught if "panel matmul not built" in str(w.message)]
assert len(warned) == WARNED, warned
out = sampler.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
assert len(out[0]["tokens"]) == 3
print("decoded")
"""
    env = {**os.environ, **env, "XDG_CACHE_HOME": str(tmp_path)}
    code = code.replace("WARNED", str(int(warned)))
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "decoded" in run.stdout, run.stderr[-2000:]
