"""Recipe configs: YAML plus key=value overrides, round trip, and clear errors."""

from __future__ import annotations

import pytest

from hf_optim.core.errors import ConfigError
from hf_optim.training.config import TrainConfig
from tests.helpers import REPO_ROOT

BASE = ["model_config.model_type=llama", "train_files=[a.txt]"]


def test_shipped_recipe_configs_load_and_round_trip(tmp_path):
    for path in sorted((REPO_ROOT / "recipes" / "configs").glob("*.yaml")):
        cfg = TrainConfig.load(path)
        copy = tmp_path / path.name
        copy.write_text(cfg.to_yaml())
        assert TrainConfig.load(copy) == cfg, path.name


def test_overrides_reach_into_nested_keys_and_convert_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_config: {model_type: llama, hidden_size: 64}\ntrain_files: [a.txt]\nmax_steps: 5\n")
    cfg = TrainConfig.load(recipe, ["model_config.hidden_size=128", "max_steps=1e3", "learning_rate=3e-4",
                                    "mixed_precision=bf16", "resume_from=latest", "activation_offload=false"])
    assert cfg.model_config == {"model_type": "llama", "hidden_size": 128}
    assert (cfg.max_steps, cfg.learning_rate, cfg.mixed_precision) == (1000, 3e-4, "bf16")
    assert cfg.resume_from == "latest" and cfg.activation_offload is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_step=5"], "Did you mean 'max_steps'"),
        (["max_steps=2.5"], "max_steps=2.5 must be an integer"),
        (["mixed_precision=fp4"], "is not one of ['no', 'bf16', 'fp16', 'fp8']"),
        (["gradient_checkpointing=sometimes"], "is not one of ['off', 'full', 'selective']"),
        (["validation_split=1.5"], "validation_split=1.5 must be in [0, 1)"),
        (["model=some/model"], "exactly one of `model`"),
        (["micro_batch_size"], "not of the form key=value"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.load(None, BASE + overrides)
    assert message in str(info.value)


def test_missing_data_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="No training data"):
        TrainConfig.load(None, ["model_config.model_type=llama"])
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.load(tmp_path / "nope.yaml")


def test_global_batch_size_derives_accumulation_or_explains_why_not():
    cfg = TrainConfig.load(None, BASE + ["micro_batch_size=4", "global_batch_size=32"])
    assert cfg.accumulation_steps(world_size=2) == 4
    with pytest.raises(ConfigError, match="global_batch_size=32 is not divisible .* = 12"):
        cfg.accumulation_steps(world_size=3)


def test_yaml_1_1_booleans_stay_strings_so_no_and_off_are_valid_choices(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_config: {model_type: llama}\ntrain_files: [a.txt]\nmixed_precision: no\n")
    cfg = TrainConfig.load(recipe, ["gradient_checkpointing=off", "activation_offload=false"])
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.activation_offload) == ("no", "off", False)
