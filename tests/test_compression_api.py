"""The compression verbs, recipes, saving/reloading and `hf-optim compress` (method details have their own tests)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import hf_optim
from hf_optim.cli import main
from hf_optim.compression.configs import config_from_dict
from hf_optim.compression.recipe import CompressionRecipe
from hf_optim.core.errors import ConfigError
from hf_optim.training.data import builtin_corpus
from tests.helpers import tiny_model

RECIPE = """
steps:
  - {method: wanda, sparsity: 0.5, pattern: "2:4"}
  - {method: int4_weight_only, algorithm: rtn, group_size: 32}
num_calibration_samples: 8
calibration_seq_len: 64
"""


def test_recipe_round_trips_through_yaml():
    recipe = CompressionRecipe.from_yaml(RECIPE)
    assert [type(s).__name__ for s in recipe.steps] == ["WandaConfig", "Int4WeightOnlyConfig"]
    assert CompressionRecipe.from_yaml(recipe.to_yaml()) == recipe
    assert recipe.needs_calibration


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: []", "at least one step"),
        ("steps: [{method: prune_everything}]", "Unknown compression method 'prune_everything'"),
        ("steps: [{method: wanda, sparsity: 1.5}]", "Recipe step 1: sparsity=1.5 must be in [0, 1)"),
        ("steps: [{method: wanda, pattern: '4-8'}]", "'4-8' is not an N:M pattern"),
        ("steps: [{method: kmeans, n_clusters: 1}]", "n_clusters=1 must be in"),
        ("steps: [{method: magnitude, sparsty: 0.5}]", "has no option(s) ['sparsty']"),
        ("stepz: []", "a mapping with a `steps:` list"),
        ("steps: [oops", "not valid YAML"),
    ],
)
def test_recipe_errors_name_the_bad_value(text, message):
    with pytest.raises(ConfigError) as info:
        CompressionRecipe.from_yaml(text)
    assert message in str(info.value)


def test_verbs_check_their_config_kind_and_calibration():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="is a quantize config; call hf_optim.quantize"):
        hf_optim.prune(model, hf_optim.Int8WeightOnlyConfig())
    with pytest.raises(ConfigError, match="needs calibration data"):
        hf_optim.prune(model, hf_optim.WandaConfig(sparsity=0.5))
    with pytest.raises(ConfigError, match="takes a config object"):
        hf_optim.prune(model, {"method": "wanda"})


def test_save_and_load_optimized_round_trip_with_card_and_metadata(tokenizer, tmp_path):
    model = tiny_model("llama")
    hf_optim.prune(model, hf_optim.MagnitudeConfig(sparsity=0.5))
    hf_optim.quantize(model, hf_optim.Int4WeightOnlyConfig(group_size=32))
    out = hf_optim.save_optimized(model, tmp_path / "variant", tokenizer=tokenizer, metrics={"perplexity": 12.5},
                                  base_model="local/tiny-llama")
    record = json.loads((out / "hf_optim.json").read_text())
    assert [step["method"] for step in record["steps"]] == ["magnitude", "int4_weight_only"]
    assert record["versions"]["torch"] == torch.__version__
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "local/tiny-llama" and metadata["base_model_relation"] == "quantized"
    assert "hf-optim" in metadata["tags"] and "| perplexity | 12.5 |" in card

    reloaded = hf_optim.load_optimized(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_compress_cli_runs_a_recipe_file(tokenizer, tmp_path, capsys):
    model_dir, out = tmp_path / "base", tmp_path / "compressed"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe, calibration = tmp_path / "recipe.yaml", tmp_path / "calib.txt"
    recipe.write_text(RECIPE)
    calibration.write_text("\n\n".join(builtin_corpus()[:3]))

    assert main(["compress", str(model_dir), "--recipe", str(recipe), "--output", str(out),
                 "--calibration-data", str(calibration)]) == 0
    model = hf_optim.load_optimized(out)
    for layer in model.model.layers:
        groups = (layer.mlp.up_proj.weight == 0).reshape(-1, 4).sum(1)
        assert bool((groups >= 2).all())  # 2:4 survived int4 quantization (zero stays zero)

    assert main(["compress", str(model_dir), "--recipe", str(recipe), "--output", str(out)]) == 2
    assert "need --calibration-data" in capsys.readouterr().err


def test_config_from_dict_covers_every_config_with_defaults():
    for method in ("magnitude", "wanda", "sparsegpt", "structured", "kmeans", "int8_weight_only", "int4_weight_only"):
        config = config_from_dict({"method": method})
        assert config_from_dict(config.to_dict()) == config
