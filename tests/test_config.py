"""Typed config: YAML + overrides, strict keys, one-line actionable errors."""

from __future__ import annotations

import pytest

from selfalign.config import ConfigError, apply_overrides, describe, dump_yaml, load_config
from selfalign.train import TrainConfig


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: selm\nalpha: 0.001\nlora:\n  r: 8\n")
    cfg = load_config(TrainConfig, path, ["beta=0.01", "lora.enabled=true", "learning_rate=5e-7"])
    assert (cfg.loss, cfg.alpha, cfg.beta, cfg.lora.r, cfg.lora.enabled) == ("selm", 0.001, 0.01, 8, True)
    assert cfg.learning_rate == 5e-7 and isinstance(cfg.learning_rate, float)
    assert load_config(TrainConfig, None, []).loss == "dpo"
    assert "loss: selm" in dump_yaml(cfg)


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate'; did you mean 'learning_rate'\?"):
        load_config(TrainConfig, None, ["lerning_rate=1e-6"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rank'"):
        load_config(TrainConfig, None, ["lora.rank=8"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss=kto", r"loss: expected one of 'dpo', 'ipo', 'ipo_sum', 'selm', 'xpo', 'sail', got 'kto'"),
        ("beta=-1", r"train\.beta: must be > 0, got -1"),
        ("batch_size=0", r"train\.batch_size: must be >= 1, got 0"),
        ("batch_size=two", r"batch_size: expected an integer, got 'two'"),
        ("gradient_checkpointing=maybe", r"gradient_checkpointing: expected true or false"),
        ("label_smoothing=0.5", r"train\.label_smoothing: must be in \[0, 0\.5\)"),
        ("lora.target_modules=[]", r"lora\.target_modules: must name at least one module"),
    ],
)
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(TrainConfig, None, [override])
    assert "\n" not in str(info.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: 0.1\nloss: [dpo\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: not valid YAML"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["beta"])


def test_every_field_is_documented():
    rows = describe(TrainConfig)
    assert rows and all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_yaml_no_is_read_as_the_choice_no():
    assert load_config(TrainConfig, None, ["mixed_precision=no"]).mixed_precision == "no"
