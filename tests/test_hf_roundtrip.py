"""HF -> ours -> HF: the export reloads in transformers with the same logits and keys."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hf_models import build_decoder, save, torch_logits
from safetensors import safe_open

from insightv_jax import cli


def _keys_and_shapes(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="np") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


@pytest.mark.parametrize("case", ["llama_gqa2_tied", "qwen2_gqa2_untied", "llama_gqa4_odd_rope"])
def test_roundtrip_through_cli(case, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = build_decoder(case)
    src = save(hf, tmp_path / "src")
    assert cli.main(["convert", "hf2jax", "--src", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "params").is_dir() and (tmp_path / "ckpt" / "config.yaml").is_file()
    assert (
        cli.main(
            ["convert", "jax2hf", "--src", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]
        )
        == 0
    )

    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    ids = np.random.RandomState(2).randint(0, 97, (2, 17))
    np.testing.assert_allclose(torch_logits(back, ids), torch_logits(hf, ids), atol=1e-5, rtol=0)
    assert _keys_and_shapes(tmp_path / "back") == _keys_and_shapes(src)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == hf.config.model_type


def test_load_pretrained_accepts_every_layout(tmp_path):
    from insightv_jax.hf import load_pretrained

    hf = build_decoder("llama_mha_untied")
    src = save(hf, tmp_path / "src")
    cli.main(["convert", "hf2jax", "--src", str(src), "--out", str(tmp_path / "ckpt")])
    ids = np.arange(10)[None]
    ref = torch_logits(hf, ids)
    for path in (src, tmp_path / "ckpt"):
        model, tok, proc, cfg = load_pretrained(path)
        assert cfg.decoder.num_layers == 2 and tok is None and proc is None
        np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)


def test_sharded_export_with_index(tmp_path):
    """A model written in several shards (with an index) imports identically."""
    from insightv_jax.hf.convert import export_hf, import_hf
    from insightv_jax.parallel import single_device_mesh

    hf = build_decoder("qwen2_gqa2_untied")
    model, cfg = import_hf(save(hf, tmp_path / "src"), single_device_mesh())
    (tmp_path / "sharded").mkdir()
    export_hf(model, cfg, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    again, _ = import_hf(tmp_path / "sharded", single_device_mesh())
    ids = np.arange(12)[None]
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "insightv_jax.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "convert" in out.stdout
