"""The optimize pipeline: recipe, agreement and Pareto math, a real run with its folders and reports, the CLI with
--select pareto, and the compression-schedule Trainer callback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
import torch
import yaml

import hf_optim
from hf_optim.core.errors import ConfigError
from hf_optim.pipeline.agreement import agreement_windows, combine, token_agreement
from hf_optim.pipeline.recipe import OptimizeRecipe, resolve_recipe
from hf_optim.pipeline.selection import pareto_front, within_budget
from tests.helpers import REPO_ROOT, local_tokenizer, tiny_model

# the module-scoped optimize run is shared: keep its tests on one xdist worker so it runs once
pytestmark = pytest.mark.xdist_group("pipeline")

# small enough for seconds per variant; no MiniLM (its load alone takes seconds)
FAST = [
    "max_eval_tokens=1024", "max_length=64", "agreement_windows=2", "agreement_length=32", "prompt_tokens=16",
    "new_tokens=4", "speed_repeats=1", "num_calibration_samples=4", "calibration_seq_len=32",
    "profile_embeddings=false", "profile_max_texts=40", "threads=1",
]


# ------------------------------------------------------------------------------------------------------------ recipe
def test_recipe_presets_round_trip_and_overrides(tmp_path):
    recipe = OptimizeRecipe(eval_data="eval.txt", variants=[
        "int8", "wanda-2:4+int8", "cluster-16", "onnx-int8", "tflite-int8", "sparsegpt-30",
        {"name": "mine", "steps": ["magnitude-50", {"method": "int8_weight_only", "group_size": 32}]},
    ], budget={"max_perplexity_increase": "2%"})
    steps = {v["name"]: v["steps"] for v in recipe.variants}
    assert steps["wanda-2:4+int8"] == [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"},
                                       {"method": "int8_weight_only"}]
    assert steps["cluster-16"] == [{"method": "kmeans", "n_clusters": 16}]
    assert steps["onnx-int8"] == [{"export": "onnx"}, {"export": "onnx_quantize", "mode": "dynamic-int8"}]
    assert steps["sparsegpt-30"] == [{"method": "sparsegpt", "sparsity": 0.3}]
    assert steps["mine"][0] == {"method": "magnitude", "sparsity": 0.5}
    assert recipe.budget == {"max_perplexity_increase": 0.02, "min_top1_agreement": None}
    assert recipe.needs_calibration == ["wanda-2:4+int8", "sparsegpt-30"]
    assert OptimizeRecipe.from_yaml(recipe.to_yaml()) == recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    loaded = OptimizeRecipe.load(path, ["select=pareto", "variants=[int8,wanda-2:4+int8]",
                                        "budget.max_perplexity_increase=0.05"])
    assert (loaded.select, [v["name"] for v in loaded.variants]) == ("pareto", ["int8", "wanda-2:4+int8"])
    assert loaded.budget["max_perplexity_increase"] == 0.05
    assert resolve_recipe(recipe, ["objectives=[perplexity,decode_ms_per_token]"]).objectives == [
        "perplexity", "decode_ms_per_token"]


@pytest.mark.parametrize("changes, message", [
    ({"variants": ["int9"]}, "Unknown variant step 'int9'"),
    ({"variants": ["wanda-50+bogus"]}, "Unknown variant step 'bogus'"),
    ({"variants": [{"name": "x", "steps": [{"method": "wanda", "sparsty": 0.5}]}]}, r"variant 'x'.*sparsty"),
    ({"variants": [{"name": "x", "steps": [{"export": "onnx", "opst": 17}]}]}, r"no option\(s\) \['opst'\]"),
    ({"variants": [{"name": "x", "steps": [{"export": "onnx"}, {"method": "int8_weight_only"}]}]}, "must come before"),
    ({"variants": [{"name": "x", "steps": [{"export": "onnx_quantize"}]}]}, "cannot be chained"),
    ({"variants": ["int8", "int8"]}, r"unique; \['int8'\]"),
    ({"variants": [{"name": "base", "steps": ["int8"]}]}, "reserved"),
    ({"variants": []}, "non-empty `variants:`"),
    ({"eval_data": None}, "needs eval_data"),
    ({"budget": {"max_perplexity_increase": -0.1}}, r"max_perplexity_increase=-0.1 must be a fraction >= 0"),
    ({"budget": {"max_perplexity_increase": "two percent"}}, "is not a number"),
    ({"budget": {"max_ppl": 0.02}}, r"Unknown budget key\(s\) \['max_ppl'\]"),
    ({"budget": {"max_perplexity_increase": None}}, "budget is empty"),
    ({"budget": {"min_top1_agreement": 1.5}}, r"min_top1_agreement=1.5 must be in \[0, 1\]"),
    ({"objectives": ["speed"]}, "subset of"),
])
def test_recipe_bad_input(changes, message):
    data = {"eval_data": "eval.txt", "variants": ["int8"], **changes}
    with pytest.raises(ConfigError, match=message):
        resolve_recipe(data)


def test_recipe_unknown_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="Unknown OptimizeRecipe key 'variant'. Did you mean 'variants'"):
        resolve_recipe({"eval_data": "e.txt", "variant": ["int8"]})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_recipe(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------------------------------------ pure functions
def test_pareto_front_on_a_hand_made_table():
    rows = [
        {"name": "base", "perplexity": 4.0, "size_bytes": 100, "decode_ms_per_token": 10.0},
        {"name": "int8", "perplexity": 4.01, "size_bytes": 36, "decode_ms_per_token": 12.0},
        {"name": "wanda", "perplexity": 9.0, "size_bytes": 100, "decode_ms_per_token": 9.0},  # dominated by base, int4
        {"name": "cluster", "perplexity": 4.2, "size_bytes": 34, "decode_ms_per_token": 11.0},
        {"name": "cluster-copy", "perplexity": 4.2, "size_bytes": 34, "decode_ms_per_token": 11.0},  # a tie stays
        {"name": "int4", "perplexity": 5.0, "size_bytes": 40, "decode_ms_per_token": 8.0},  # fastest: on the 3-D front
        {"name": "failed"},  # no numbers: takes no part
        {"name": "nan", "perplexity": float("nan"), "size_bytes": 1},
    ]
    assert pareto_front(rows, ["perplexity", "size_bytes"]) == ["base", "int8", "cluster", "cluster-copy"]
    assert pareto_front(rows, ["perplexity", "size_bytes", "decode_ms_per_token"]) == [
        "base", "int8", "cluster", "cluster-copy", "int4"]
    assert pareto_front(rows, ["decode_ms_per_token"]) == ["int4"]

    budget = {"max_perplexity_increase": 0.02, "min_top1_agreement": None}
    assert [r["name"] for r in rows[:6] if within_budget(r, 4.0, budget)] == ["base", "int8"]
    assert not within_budget({"perplexity": 4.0, "top1_agreement": 0.9}, 4.0, {"min_top1_agreement": 0.95})
    assert not within_budget({"top1_agreement": 1.0}, 4.0, budget)  # perplexity not measured: not inside


def test_token_agreement_math():
    torch.manual_seed(0)
    reference = torch.randn(2, 5, 7)
    same = token_agreement(reference, reference.clone())
    assert same == {"top1_agreement": 1.0, "kl_divergence": pytest.approx(0.0, abs=1e-6), "positions": 10}
    flipped = reference.clone()
    flipped[0, 0] = -flipped[0, 0]  # moves that position's top-1 token
    other = token_agreement(reference, flipped)
    assert other["top1_agreement"] == pytest.approx(0.9)
    p, q = torch.softmax(reference[0, 0], -1), torch.softmax(flipped[0, 0], -1)
    assert other["kl_divergence"] == pytest.approx(float((p * (p / q).log()).sum()) / 10, rel=1e-5)
    assert combine([same, other])["top1_agreement"] == pytest.approx(0.95)
    assert agreement_windows(torch.arange(100), windows=3, length=30).tolist()[2][0] == 60
    assert agreement_windows(torch.arange(10), windows=3, length=30).shape == (1, 10)


# ------------------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from hf_optim.training.data import builtin_corpus

    root = tmp_path_factory.mktemp("pipeline")
    model, tokenizer = tiny_model("llama"), local_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    # paragraphs of CPython's documentation: the first 60 to evaluate, later ones to calibrate
    paragraphs = [p for doc in builtin_corpus() for p in doc.split("\n\n") if len(p.split()) > 5]
    (root / "eval.txt").write_text("\n\n".join(paragraphs[:60]))
    (root / "calib.txt").write_text("\n\n".join(paragraphs[-30:]))
    return root


@pytest.fixture(scope="module")
def optimized(tiny_dir):
    recipe = {
        "eval_data": str(tiny_dir / "eval.txt"), "calibration_data": str(tiny_dir / "calib.txt"),
        "variants": ["int8", "wanda-50", "onnx-fp32", "int4-g7", "tflite-int8"],
    }
    out = tiny_dir / "out"
    results = hf_optim.optimize(str(tiny_dir / "model"), recipe, out, overrides=FAST, progress=False)
    return results, out


def test_optimize_builds_measures_and_records_failures(optimized, tiny_dir):
    results, out = optimized
    status = {row["name"]: row["status"] for row in results}
    litert = importlib.util.find_spec("litert_torch") is not None
    assert status == {"base": "ok", "int8": "ok", "wanda-50": "ok", "onnx-fp32": "ok", "int4-g7": "failed",
                      "tflite-int8": "ok" if litert else "skipped"}
    assert "group_size=7" in results["int4-g7"]["error"]  # 64 inputs do not split into groups of 7
    assert not (out / "int4-g7").exists()
    if status["tflite-int8"] == "skipped":
        assert "litert_torch is not installed" in results["tflite-int8"]["reason"]
        assert not (out / "tflite-int8").exists()
    for name in ("int8", "wanda-50", "onnx-fp32"):
        assert (out / name).is_dir() and results[name]["folder"] == str(out / name)
    assert (out / "onnx-fp32" / "model.onnx").is_file() and (out / "int8" / "packed_weights.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind

    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in results]
    for name in ("report.md", "report.html", "size_vs_perplexity.png", "latency_vs_perplexity.png"):
        assert (out / name).stat().st_size > 0
    assert "| int8 |" in (out / "report.md").read_text() and "int4-g7" in (out / "report.html").read_text()


def test_optimize_numbers_are_the_measured_ones(optimized, tiny_dir):
    from transformers import AutoModelForCausalLM

    from hf_optim.core.evaluation import evaluate_perplexity, size_on_disk

    results, out = optimized
    texts = hf_optim.load_texts(tiny_dir / "eval.txt")
    tokenizer = local_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    assert results["base"]["perplexity"] == pytest.approx(evaluate_perplexity(base, tokenizer, texts, 64, 32, 1024))
    int8 = hf_optim.load_optimized(out / "int8")
    assert results["int8"]["perplexity"] == pytest.approx(evaluate_perplexity(int8, tokenizer, texts, 64, 32, 1024))
    assert results["int8"]["size_bytes"] == size_on_disk(out / "int8") < results["base"]["size_bytes"]
    assert results["base"]["top1_agreement"] == 1.0 and results["base"]["kl_divergence"] == pytest.approx(0, abs=1e-6)
    assert results["onnx-fp32"]["top1_agreement"] == 1.0 and results["onnx-fp32"]["kl_divergence"] < 1e-6
    assert results["wanda-50"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert 0 < results["wanda-50"]["top1_agreement"] < 1 and results["wanda-50"]["kl_divergence"] > 0
    for name in ("base", "int8", "wanda-50", "onnx-fp32"):
        row = results[name]
        assert row["decode_tokens_per_s"] > 0 and row["prefill_ms"] > 0
        assert row["within_budget"] == (row["perplexity"] <= results["base"]["perplexity"] * 1.02 + 1e-9)
    front = pareto_front([r for r in results if r["status"] == "ok"], ["perplexity", "size_bytes"])
    assert [r["name"] for r in results if r["pareto"]] == front


def test_variant_folders_carry_card_and_profile(optimized, tiny_dir):
    from huggingface_hub import ModelCard

    results, out = optimized
    for name in ("int8", "wanda-50", "onnx-fp32"):
        card = ModelCard.load(out / name / "README.md")
        assert card.data.base_model == str(tiny_dir / "model")
        assert card.data.base_model_relation in ("quantized", "finetune")
        assert f"| perplexity | {results[name]['perplexity']:.6g} |" in card.text
        assert "top1_agreement" in card.text and "kl_divergence" in card.text
        profile = hf_optim.ReferenceProfile.load(out / name / "reference_profile.npz")
        assert profile.num_texts == 40 and "prompt_perplexity" in profile.features
        assert profile.tokenizer_path == str((out / name).resolve())
    assert ModelCard.load(out / "int8" / "README.md").data.base_model_relation == "quantized"


def test_optimize_needs_calibration_data_up_front(tiny_dir):
    recipe = {"eval_data": str(tiny_dir / "eval.txt"), "variants": ["int8", "wanda-50"]}
    with pytest.raises(ConfigError, match=r"Variants \['wanda-50'\] need calibration data"):
        hf_optim.optimize(str(tiny_dir / "model"), recipe, tiny_dir / "never")
    assert not (tiny_dir / "never").exists()


def test_cli_optimize_select_pareto(stories260k_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "hf-optim"), "optimize", str(stories260k_dir),
        "--recipe", str(REPO_ROOT / "recipes" / "optimize_tiny.yaml"), "--output", str(out), "--select", "pareto",
        "variants=[int8,magnitude-50]", *FAST,
    ]
    # from the repository root, where the example recipe's ../shared paths point
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| int8 |" in done.stdout and "Kept int8;" in done.stdout
    saved = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in saved["rows"]}
    assert saved["select"] == "pareto"
    # magnitude-50 is as large as the base and far worse: off the front, measured, then its folder removed
    assert rows["magnitude-50"]["status"] == "ok" and not rows["magnitude-50"]["pareto"]
    assert not rows["magnitude-50"]["kept"] and rows["magnitude-50"]["folder"] is None
    assert not (out / "magnitude-50").exists()
    assert rows["int8"]["kept"] and rows["int8"]["pareto"] and rows["int8"]["within_budget"]
    assert (out / "int8" / "reference_profile.npz").is_file()
    front_matter = yaml.safe_load((out / "int8" / "README.md").read_text().split("---")[1])
    assert front_matter["base_model"] == str(stories260k_dir) and front_matter["base_model_relation"] == "quantized"


# --------------------------------------------------------------------------------------------- Trainer callback
def _train(model, tmp_path, callback, steps=6):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(2, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids.repeat(8, 1)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()


def test_callback_cluster_preserving_fine_tuning(tmp_path):
    model = tiny_model("llama")
    hf_optim.cluster(model, hf_optim.ClusterConfig(n_clusters=4, per_channel=True))
    layer = model.model.layers[0].mlp.up_proj
    before = layer.weight.detach().clone()
    _train(model, tmp_path, hf_optim.CompressionScheduleCallback(model, preserve_clusters=True))
    after = layer.weight.detach()
    assert not torch.equal(after, before)  # the codebooks trained
    for row_before, row_after in zip(before, after):  # same assignment: equal weights stay equal, ≤ 4 values a row
        assert len(torch.unique(row_after)) <= 4
        assert torch.equal(row_before[:, None] == row_before[None], row_after[:, None] == row_after[None])
    hf_optim.save_optimized(model, tmp_path / "clustered")  # finalized: packed form again
    assert torch.equal(hf_optim.load_optimized(tmp_path / "clustered").model.layers[0].mlp.up_proj.weight, after)


def test_callback_gradual_pruning_and_bad_arguments(tmp_path):
    from hf_optim.compression.pruning import sparsity_report

    model = tiny_model("llama")
    pruner = hf_optim.GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.5),
                                    hf_optim.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2))
    callback = hf_optim.CompressionScheduleCallback(model, pruner=pruner)
    assert isinstance(callback, hf_optim.GradualPruningCallback)
    _train(model, tmp_path, callback)
    assert all(s == 0.5 for s in sparsity_report(model)["layers"].values())
    with pytest.raises(ConfigError, match="one schedule"):
        hf_optim.CompressionScheduleCallback(model)
    with pytest.raises(ConfigError, match="one schedule"):
        hf_optim.CompressionScheduleCallback(model, pruner=pruner, preserve_clusters=True)
    with pytest.raises(ConfigError, match="no clustered layers"):
        hf_optim.CompressionScheduleCallback(tiny_model("llama"), preserve_clusters=True)
