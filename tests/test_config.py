"""Configs: YAML + key=value overrides, one-line errors that name the key."""

import pytest

from insightv_jax.config import ConfigError, RunConfig, load_config, save_yaml


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  decoder:\n    hidden_size: 96\n    num_heads: 4\nseed: 3\n")
    cfg = load_config(
        f, ["model.decoder.num_layers=5", "mesh.tensor=2", "model.decoder.rope_theta=1e4"]
    )
    assert cfg.model.decoder.hidden_size == 96 and cfg.model.decoder.num_layers == 5
    assert cfg.mesh.tensor == 2 and cfg.seed == 3 and cfg.model.decoder.rope_theta == 10000.0
    save_yaml(cfg, tmp_path / "back.yaml")
    assert load_config(tmp_path / "back.yaml") == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.decoder.hiden_size=3", "unknown config key 'model.decoder.hiden_size'"),
        ("model.decoder.num_layers=two", "model.decoder.num_layers: expected an integer"),
        ("model.decoder.attention=flash", "model.decoder.attention: 'flash' is not one of"),
        ("model.decoder.tie_embeddings=3", "model.decoder.tie_embeddings: expected true/false"),
        ("model.decoder.num_kv_heads=3", "num_heads=4 is not a multiple"),
        ("model.decoder.param_dtype=int8", "decoder.param_dtype='int8'"),
        ("seed", "not of the form key=value"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.decoder.num_heads=4", override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 1


def test_every_shipped_config_loads():
    from pathlib import Path

    from insightv_jax.demo import load_preset

    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for f in files:
        if f.parent.name == "demo":  # demo presets: their own schema (insightv_jax/demo.py)
            load_preset(f.stem)
        else:
            load_config(f)


def test_include_extends_a_preset(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  decoder:\n    hidden_size: 96\n    num_layers: 3\n"
    )
    (tmp_path / "run.yaml").write_text(
        "include: base.yaml\nmodel:\n  decoder:\n    num_layers: 5\n"
    )
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.model.decoder.hidden_size == 96 and cfg.model.decoder.num_layers == 5
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "loop.yaml")
