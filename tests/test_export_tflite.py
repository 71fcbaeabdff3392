"""TFLite (LiteRT) export (issue 4): input checks and the missing-extra error here; conversion where litert-torch is."""

from __future__ import annotations

import importlib.util
import json

import pytest

from hf_optim.cli import main
from hf_optim.core.errors import ConfigError
from hf_optim.export.tflite import INSTALL_HINT, export_tflite
from tests.helpers import tiny_model

HAS_LITERT = all(importlib.util.find_spec(name) is not None for name in ("litert_torch", "ai_edge_litert"))
NO_LITERT = (
    "litert-torch/ai-edge-litert not installed: litert-torch 0.10 needs typing-extensions<4.13 (via xdsl 0.28), "
    "which conflicts with pydantic 2.14's >=4.16 pin here"
)


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


@pytest.mark.skipif(HAS_LITERT, reason="litert-torch is installed here")
def test_missing_litert_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"pip install 'hf-optim\[tflite\]'"):
        export_tflite(tiny_model("llama"), tmp_path / "m.tflite", sequence_length=8)
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    code = main(["export", "tflite", str(folder), "--output", str(tmp_path / "m.tflite"), "--sequence-length", "8"])
    assert code == 2 and INSTALL_HINT in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not HAS_LITERT, reason=NO_LITERT)
def test_fp32_parity_and_dynamic_int8_is_smaller(tmp_path):
    model = tiny_model("llama").eval()
    fp32 = export_tflite(model, tmp_path / "fp32.tflite", sequence_length=16)
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["logits_shape"] == [1, 16, 512]
    assert json.loads((tmp_path / "fp32.tflite.json").read_text())["input"]["dtype"] == "int32"
    int8 = export_tflite(model, tmp_path / "int8.tflite", sequence_length=16, quantize="dynamic-int8")
    assert int8["size_bytes"] < 0.5 * fp32["size_bytes"] and int8["top1_agreement"] > 0.5


@pytest.mark.skipif(not HAS_LITERT, reason=NO_LITERT)
def test_cli(tmp_path):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    out = tmp_path / "m.tflite"
    assert main(["export", "tflite", str(folder), "--output", str(out), "--sequence-length", "8"]) == 0
    assert out.is_file() and json.loads(out.with_suffix(".tflite.json").read_text())["max_abs_diff"] <= 1e-4
