"""Perplexity, size, sparsity and speed numbers, and the `hf-optim eval` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_optim.cli import main
from hf_optim.core.errors import ConfigError
from hf_optim.core.evaluation import evaluate_perplexity, generation_speed, parameter_stats, size_on_disk
from hf_optim.core.texts import load_texts
from hf_optim.training.data import builtin_corpus
from tests.helpers import CORPORA, tiny_model


def _naive_perplexity(model, tokenizer, texts, max_length, stride):
    """Transformers' documented loop, one window at a time, with labels=-100 masking (an independent reference)."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += model(input_ids, labels=labels).loss.item() * n
        count += n
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll / count)


def test_strided_perplexity_matches_the_documented_loop(tokenizer):
    model = tiny_model("llama", seed=0)
    texts = builtin_corpus()[:2]
    ours = evaluate_perplexity(model, tokenizer, texts, max_length=64, stride=24, max_tokens=None)
    assert ours == pytest.approx(_naive_perplexity(model, tokenizer, texts, 64, 24), rel=1e-5)
    # a random model is near-uniform over its 512-token vocabulary
    assert 200 < ours < 2000


def test_perplexity_reproduces_the_reference_score_of_stories260k(stories260k_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = json.loads((stories260k_dir / "reference_score.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir)
    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir)
    assert evaluate_perplexity(model, tokenizer, [reference["sentence"]]) == pytest.approx(reference["perplexity"], abs=1e-3)
    stories = load_texts(CORPORA / "tinystories" / "niklas6_tinystories.txt")
    assert 3.0 < evaluate_perplexity(model, tokenizer, stories, max_length=256, stride=128, max_tokens=4096) < 7.0


def test_local_evaluate_module_loads_offline(stories260k_dir):
    import evaluate

    from hf_optim.core.evaluate_modules import metric_path

    metric = evaluate.load(metric_path("perplexity"))
    sentence = json.loads((stories260k_dir / "reference_score.json").read_text())["sentence"]
    result = metric.compute(predictions=[sentence, "Tim had a red ball."], model_id=str(stories260k_dir))
    assert result["perplexities"][0] == pytest.approx(4.9536, abs=1e-3)
    assert result["mean_perplexity"] == pytest.approx(sum(result["perplexities"]) / 2)


def test_parameter_stats_and_size_on_disk(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    stats = parameter_stats(model)
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())
    zeros = model.model.layers[0].mlp.up_proj.weight.numel() // 2
    assert stats["linear_sparsity"] == pytest.approx(zeros / stats["linear_parameters"])
    model.save_pretrained(tmp_path)
    assert size_on_disk(tmp_path) == (tmp_path / "model.safetensors").stat().st_size


def test_generation_speed_reports_positive_rates(tokenizer):
    speed = generation_speed(tiny_model("llama"), tokenizer, prompt_tokens=16, new_tokens=4, repeats=1)
    assert speed["prefill_seconds"] > 0 and speed["decode_tokens_per_s"] > 0


def test_eval_cli_json(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "eval.txt"
    data.write_text("\n\n".join(builtin_corpus()[:2]))
    assert main(["eval", str(model_dir), "--data", str(data), "--max-length", "64", "--max-tokens", "500",
                 "--new-tokens", "4", "--prompt-tokens", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"] > 1 and report["size_bytes"] > 0 and report["speed"]["decode_tokens_per_s"] > 0
    assert report["perplexity_window"] == {"max_length": 64, "stride": 32}


def test_eval_bad_input(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="got no text"):
        evaluate_perplexity(tiny_model("llama"), tokenizer, ["  "])
    with pytest.raises(ConfigError, match="stride=100 must be in"):
        evaluate_perplexity(tiny_model("llama"), tokenizer, ["some text here"], max_length=50, stride=100)


def test_perplexity_and_speed_work_on_the_onnx_runtime_class(tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    import hf_optim

    model = tiny_model("llama")
    hf_optim.export_onnx(model, tmp_path / "onnx")
    runtime = hf_optim.OnnxCausalLM.from_pretrained(tmp_path / "onnx")
    texts = builtin_corpus()[:2]
    torch_ppl = evaluate_perplexity(model, tokenizer, texts, max_length=64, stride=32)
    assert evaluate_perplexity(runtime, tokenizer, texts, max_length=64, stride=32) == pytest.approx(torch_ppl, rel=1e-5)
    speed = generation_speed(runtime, tokenizer, prompt_tokens=8, new_tokens=4, repeats=1)
    assert speed["decode_tokens_per_s"] > 0 and speed["new_tokens"] <= 4
