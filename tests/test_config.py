"""The one config object: YAML in, one-line errors that name the key, the allowed values and the fix."""

import glob
import os

import pytest

from fedopal.config import ConfigError, FedOpalConfig, load_config

from conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "app_configs", "*.yaml"))))
def test_every_bundled_config_validates(path):
    assert isinstance(load_config(path), FedOpalConfig)


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  lamda: 0.1\n"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "'train.lamda'" in msg and "orth_lambda" in msg and "cfg.yaml" in msg


def test_wrong_type_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data:\n  batch_size: many\n"))
    msg = str(err.value)
    assert "\n" not in msg and "'data.batch_size'" in msg and "'many'" in msg


@pytest.mark.parametrize("text,key", [
    ("train:\n  num_rounds: 0\n", "train.num_rounds"),
    ("train:\n  num_rounds: -3\n", "train.num_rounds"),
    ("train:\n  orth_lambda: -1\n", "train.orth_lambda"),
    ("data:\n  image_size: 4\n", "data.image_size"),
])
def test_out_of_range_value_names_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(write(tmp_path, text))


def test_unknown_method_lists_allowed_methods(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  method: fedprox\n"))
    msg = str(err.value)
    for name in ("local", "fedavg_lora", "dual_lora", "fedopal_w", "fedopal_r"):
        assert name in msg


def test_literal_choices_are_listed(tmp_path):
    with pytest.raises(ConfigError, match="'train.orth_on'.*'A', 'B' or 'AB'"):
        load_config(write(tmp_path, "train:\n  orth_on: C\n"))


def test_bad_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line \d+ is not valid YAML"):
        load_config(write(tmp_path, "train:\n  method: [unclosed\n"))


def test_missing_file_says_fix():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/cfg.yaml")


def test_overrides_apply_dotted_keys(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  num_rounds: 3\n"), {"train.num_rounds": 7, "model.head": "personal"})
    assert cfg.train.num_rounds == 7 and cfg.model.head == "personal"
