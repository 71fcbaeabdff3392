"""TFLite (LiteRT) export (issue 4): input checks and the missing-extra error here; conversion where litert-torch is."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hf_optim.cli import main
from hf_optim.core.errors import ConfigError
from hf_optim.export.tflite import INSTALL_HINT, TFLiteCausalLM, export_tflite
from tests.helpers import tiny_model

HAS_LITERT = all(importlib.util.find_spec(name) is not None for name in ("litert_torch", "ai_edge_litert"))
NO_LITERT = (
    "litert-torch/ai-edge-litert not installed (the optional extra hf-optim[tflite]: litert-torch 0.10 needs "
    "typing-extensions<4.13 via xdsl 0.28, so pydantic<=2.11)"
)
needs_litert = pytest.mark.skipif(not HAS_LITERT, reason=NO_LITERT)
SEQ = 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "int4"}, "quantize='int4' is not supported; use one of none, dynamic-int8, weight-only-int8"),
        ({"sequence_length": 0}, "sequence_length=0 must be a positive integer"),
        ({"sequence_length": 1000}, "sequence_length=1000 exceeds the model's 256 positions"),
    ],
)
def test_bad_input(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        export_tflite(tiny_model("llama"), tmp_path / "m.tflite", **kwargs)


def test_bad_suffix(tmp_path):
    with pytest.raises(ConfigError, match="must end in .tflite"):
        export_tflite(tiny_model("llama"), tmp_path / "m.onnx")


def test_runner_needs_the_report(tmp_path):
    (tmp_path / "m.tflite").write_bytes(b"")
    with pytest.raises(ConfigError, match="needs the .tflite file and its .tflite.json report"):
        TFLiteCausalLM.from_pretrained(tmp_path / "m.tflite")


@pytest.mark.skipif(HAS_LITERT, reason="litert-torch is installed here")
def test_missing_litert_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"pip install 'hf-optim\[tflite\]'"):
        export_tflite(tiny_model("llama"), tmp_path / "m.tflite", sequence_length=8)
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    code = main(["export", "tflite", str(folder), "--output", str(tmp_path / "m.tflite"), "--sequence-length", "8"])
    assert code == 2 and INSTALL_HINT in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    if not HAS_LITERT:
        pytest.skip(NO_LITERT)
    model = tiny_model("llama").eval()
    path = tmp_path_factory.mktemp("tflite") / "fp32.tflite"
    return model, path, export_tflite(model, path, sequence_length=SEQ)


@needs_litert
@pytest.mark.slow
def test_fp32_export_matches_pytorch(fp32_export):
    _, path, report = fp32_export
    assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert report["logits_shape"] == [1, SEQ, 512]
    written = json.loads(path.with_suffix(".tflite.json").read_text())
    assert written["input"] == {"name": "input_ids", "dtype": "int32", "shape": [1, SEQ]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["fp32.tflite", "fp32.tflite.json"]  # no staging left


@needs_litert
@pytest.mark.slow
def test_runner_logits_and_greedy_match_pytorch(fp32_export):
    model, path, _ = fp32_export
    runner = TFLiteCausalLM.from_pretrained(path, num_threads=1)
    assert runner.sequence_length == SEQ and runner.config.max_position_embeddings == SEQ
    ids = torch.randint(2, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the real tokens run alone from position 0
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        expected_padded = model(input_ids=ids[1:, 4:]).logits
    logits = runner(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits[0], expected[0], atol=1e-4)
    assert torch.allclose(logits[1, 4:], expected_padded[0], atol=1e-4) and not logits[1, :4].any()
    greedy = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(runner.generate(ids[:1], max_new_tokens=6, eos_token_id=-1), greedy)


@needs_litert
@pytest.mark.slow
def test_runner_rejects_what_the_fixed_shape_cannot_take(fp32_export):
    runner = TFLiteCausalLM.from_pretrained(fp32_export[1], num_threads=1)
    with pytest.raises(ConfigError, match=f"17 tokens do not fit the exported sequence_length={SEQ}"):
        runner(input_ids=torch.ones(1, SEQ + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match=f"20 tokens do not fit the exported sequence_length={SEQ}"):
        runner.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ConfigError, match=r"input_ids must lie in \[0, 512\)"):
        runner(input_ids=torch.tensor([[3, 512]]))
    with pytest.raises(ConfigError, match="do_sample=True is not supported"):
        runner.generate(torch.ones(1, 3, dtype=torch.long), do_sample=True)


@needs_litert
@pytest.mark.slow
def test_dynamic_int8_is_smaller_and_close(fp32_export, tmp_path):
    model, _, fp32 = fp32_export
    int8 = export_tflite(model, tmp_path / "int8.tflite", sequence_length=SEQ, quantize="dynamic-int8")
    assert int8["size_bytes"] < 0.6 * fp32["size_bytes"]
    assert 0 < int8["max_abs_diff"] < 0.1 and int8["top1_agreement"] > 0.9 and int8["atol"] is None


@needs_litert
@pytest.mark.slow
def test_cli_weight_only_int8(fp32_export, tmp_path, capsys):
    _, _, fp32 = fp32_export
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    out = tmp_path / "m.tflite"
    args = ["export", "tflite", str(folder), "--output", str(out), "--sequence-length", str(SEQ)]
    assert main([*args, "--quantize", "weight-only-int8"]) == 0
    report = json.loads(out.with_suffix(".tflite.json").read_text())
    assert report["quantize"] == "weight-only-int8" and report["size_bytes"] == out.stat().st_size
    assert report["size_bytes"] < 0.6 * fp32["size_bytes"] and report["top1_agreement"] > 0.9
    assert "top-1 agreement" in capsys.readouterr().out
