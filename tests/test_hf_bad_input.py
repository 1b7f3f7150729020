"""Broken Hugging Face folders: one-line errors naming the file/key, exit 1,
nothing written at --out."""

import json

import pytest
from hf_models import build_decoder, save

from insightv_jax import cli


@pytest.fixture()
def good(tmp_path):
    return save(build_decoder("llama_mha_untied"), tmp_path / "good")


def _run(capsys, src, out):
    capsys.readouterr()  # drop what building the fixture printed
    code = cli.main(["convert", "hf2jax", "--src", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean_failure(code, err, out, *needles):
    assert code == 1
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_safetensors(good, tmp_path, capsys):
    (good / "model.safetensors").unlink()
    code, err = _run(capsys, good, tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", str(good), "no safetensors")


def test_truncated_safetensors(good, tmp_path, capsys):
    f = good / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, err = _run(capsys, good, tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "model.safetensors", "truncated")


def test_missing_shard_of_index(tmp_path, capsys):
    from insightv_jax.hf.convert import export_hf, import_hf
    from insightv_jax.parallel import single_device_mesh

    model, cfg = import_hf(
        save(build_decoder("llama_mha_untied"), tmp_path / "a"), single_device_mesh()
    )
    (tmp_path / "sh").mkdir()
    export_hf(model, cfg, tmp_path / "sh", max_shard_bytes=30_000)
    victim = sorted((tmp_path / "sh").glob("model-*.safetensors"))[1]
    victim.unlink()
    code, err = _run(capsys, tmp_path / "sh", tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", victim.name, "missing")


def test_config_shape_disagrees(good, tmp_path, capsys):
    cfg = json.loads((good / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (good / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, good, tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "gate_proj.weight", "does not fit")


def test_extra_layer_weights(good, tmp_path, capsys):
    cfg = json.loads((good / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (good / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, good, tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "layers.1.", "not used")


def test_unsupported_model_type(good, tmp_path, capsys):
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (good / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, good, tmp_path / "out")
    _assert_clean_failure(
        code, err, tmp_path / "out", "config.json", "unsupported model_type 'mamba'"
    )


def test_corrupt_config_json(good, tmp_path, capsys):
    (good / "config.json").write_text("{not json")
    code, err = _run(capsys, good, tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "config.json", "not valid JSON")


def test_missing_source_and_bad_checkpoint(tmp_path, capsys):
    code, err = _run(capsys, tmp_path / "nope", tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "nope")
    (tmp_path / "junk").mkdir()
    capsys.readouterr()
    code = cli.main(
        ["convert", "jax2hf", "--src", str(tmp_path / "junk"), "--out", str(tmp_path / "o2")]
    )
    err = capsys.readouterr().err.strip()
    _assert_clean_failure(code, err, tmp_path / "o2", "junk", "not a model directory")


def test_truncated_orbax_params(good, tmp_path, capsys):
    assert cli.main(["convert", "hf2jax", "--src", str(good), "--out", str(tmp_path / "ck")]) == 0
    for f in (tmp_path / "ck" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    capsys.readouterr()
    code = cli.main(
        ["convert", "jax2hf", "--src", str(tmp_path / "ck"), "--out", str(tmp_path / "o3")]
    )
    err = capsys.readouterr().err.strip()
    # checked before orbax reads anything: the first file that would fail is named
    _assert_clean_failure(code, err, tmp_path / "o3", "params/_METADATA", "corrupt checkpoint")
