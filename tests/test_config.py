"""Config resolution: defaults < preset < TOML < flags; unknown/bad values name the key."""
from __future__ import annotations

import pytest

from fastgpt.config import PRESETS, ConfigError, ModelConfig, TrainConfig, build_config, config_to_dict
from fastgpt.model import GPT
from fastgpt.stages.pretrain import PretrainConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve(name):
    cfg = build_config(PretrainConfig, preset=name)
    assert isinstance(cfg.model, ModelConfig)
    for k, v in PRESETS[name]["model"].items():
        assert getattr(cfg.model, k) == v
    for k, v in PRESETS[name]["train"].items():
        assert getattr(cfg, k) == v
    with __import__("torch").device("meta"):  # every preset builds a model
        GPT(cfg.model)


def test_preset_sizes():
    import torch
    with torch.device("meta"):
        n = GPT(build_config(PretrainConfig, preset="gpt-1b").model).num_params()
    assert 0.9e9 < n < 1.3e9


def test_defaults_without_preset():
    cfg = build_config(PretrainConfig)
    assert cfg.model == ModelConfig() and cfg.lr == TrainConfig().lr


def test_train_only_config_ignores_model_part():
    cfg = build_config(TrainConfig, preset="tiny")
    assert cfg.batch_size == PRESETS["tiny"]["train"]["batch_size"]


def test_toml_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 1e-3\nmax_steps = 7\ndata = "somewhere"\n[model]\nn_layer = 3\nnorm = "rmsnorm"\n')
    cfg = build_config(PretrainConfig, "tiny", path)
    assert (cfg.lr, cfg.max_steps, cfg.data, cfg.model.n_layer, cfg.model.norm) == (1e-3, 7, "somewhere", 3, "rmsnorm")
    assert cfg.model.n_embd == PRESETS["tiny"]["model"]["n_embd"]  # preset kept where TOML is silent
    cfg = build_config(PretrainConfig, "tiny", path, {"lr": "5e-4", "model.n_layer": "1", "compile": "true",
                                                      "batch_size": 3})
    assert (cfg.lr, cfg.model.n_layer, cfg.compile, cfg.batch_size) == (5e-4, 1, True, 3)
    assert cfg.max_steps == 7


def test_types_coerced():
    cfg = build_config(PretrainConfig, overrides={"max_steps": "12", "lr": "1", "resume": "no",
                                                  "model.dropout": "0.1", "model.tie_embeddings": "off"})
    assert cfg.max_steps == 12 and isinstance(cfg.lr, float) and cfg.resume is False
    assert cfg.model.dropout == 0.1 and cfg.model.tie_embeddings is False
    assert build_config(PretrainConfig, overrides={"max_steps": 3.0}).max_steps == 3


@pytest.mark.parametrize("overrides, key", [
    ({"bogus": 1}, "bogus"),
    ({"model.bogus": 1}, "model.bogus"),
    ({"max_steps": "many"}, "max_steps"),
    ({"max_steps": 2.5}, "max_steps"),
    ({"lr": "fast"}, "lr"),
    ({"compile": "maybe"}, "compile"),
    ({"model.n_layer": "x"}, "model.n_layer"),
    ({"model.norm": "batchnorm"}, "model.norm"),
    ({"model.n_head": 5}, "model.n_head"),
    ({"model.n_layer": 0}, "model.n_layer"),
    ({"model": 3}, "model"),
    ({"model.n_layer": True}, "model.n_layer"),
])
def test_bad_overrides_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        build_config(PretrainConfig, "tiny", overrides=overrides)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config(PretrainConfig, "huge")


def test_toml_errors(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("[model]\nn_layers = 2\n")
    with pytest.raises(ConfigError, match=r"a\.toml.*model\.n_layers"):
        build_config(PretrainConfig, toml_path=bad_key)
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('batch_size = "big"\n')
    with pytest.raises(ConfigError, match=r"b\.toml.*batch_size"):
        build_config(PretrainConfig, toml_path=bad_type)
    not_toml = tmp_path / "c.toml"
    not_toml.write_text("lr = = 3\n")
    with pytest.raises(ConfigError, match=r"c\.toml.*not valid TOML"):
        build_config(PretrainConfig, toml_path=not_toml)
    with pytest.raises(ConfigError, match="not found"):
        build_config(PretrainConfig, toml_path=tmp_path / "missing.toml")


def test_config_to_dict_round_trip():
    cfg = build_config(PretrainConfig, "small")
    d = config_to_dict(cfg)
    assert d["model"]["n_layer"] == 6
    assert ModelConfig(**d["model"]) == cfg.model
