"""ONNX Runtime fusion and quantization of export_onnx folders (issue 4): parity, reports, sizes, CLI and bad input."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import hf_optim  # noqa: E402
from hf_optim.cli import main  # noqa: E402
from hf_optim.core.errors import ConfigError  # noqa: E402
from hf_optim.export.onnx import export_onnx  # noqa: E402
from hf_optim.export.runtime import OnnxCausalLM  # noqa: E402
from tests.helpers import local_tokenizer, tiny_model  # noqa: E402

TEXTS = [
    "once upon a time there was a little dog who liked to run in the park",
    "the cat sat on the mat and looked at the bright sun all day long",
    "a girl named lily liked to play with her red ball in the garden",
    "tom and his mom went to the store to buy some bread and milk",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One validated export (with KV cache) per family: (model, folder)."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            model = tiny_model(family).eval()
            folder = tmp_path_factory.mktemp(f"ort_{family}") / "fp32"
            export_onnx(model, folder, tokenizer=local_tokenizer())
            cache[family] = (model, folder)
        return cache[family]

    return get


def _load(folder) -> OnnxCausalLM:
    return OnnxCausalLM.from_pretrained(folder, providers=["CPUExecutionProvider"], num_threads=1)


def _size(folder) -> int:
    return (folder / "model.onnx").stat().st_size


@pytest.mark.parametrize("family,level", [("gpt2", "O1"), ("gpt2", "O2"), ("gpt2", "O3"), ("llama", "O2")])
def test_optimize_levels_keep_parity_with_pytorch(exported, family, level):
    model, src = exported(family)
    out = src.parent / f"opt-{level}"
    report = hf_optim.optimize_onnx(src, out, level=level, reference_model=model)
    written = json.loads((out / "optimization.json").read_text())
    assert written["level"] == level and written["reference"] == "pytorch"
    assert written["validation"]["passed"] and written["validation"]["greedy_match"]
    assert written["validation"]["max_abs_diff_no_past"] <= 1e-4
    assert written["validation"]["max_abs_diff_with_past"] <= 1e-4
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no staging left
    runtime = _load(out)
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert (runtime(input_ids=ids).logits - expected).abs().max() <= 1e-4
    if level == "O1":
        assert not written["transformer_fusions"]
    else:  # the transformer fusions ran: norms folded into (Skip)LayerNorm kernels, fewer nodes
        norm = "SkipLayerNormalization" if family == "gpt2" else "SkipSimplifiedLayerNormalization"
        assert report["fused_operators"][norm] == 2 * model.config.num_hidden_layers
        assert sum(written["op_counts_after"].values()) < sum(written["op_counts_before"].values())
    if family == "gpt2" and level != "O1":
        assert report["fused_operators"]["FastGelu"] == model.config.num_hidden_layers
    assert report["gelu_approximation"] is (level == "O3")


def test_quantize_dynamic_int8_and_int4_are_smaller_and_close(exported):
    model, src = exported("llama")
    fp32 = _load(src)
    ids = torch.randint(2, 512, (2, 10), generator=torch.Generator().manual_seed(6))
    reference = fp32(input_ids=ids).logits
    for mode, kwargs in [("dynamic-int8", {}), ("int4", {"algorithm": "rtn"}), ("int4", {"algorithm": "hqq"})]:
        out = src.parent / f"{mode}-{kwargs.get('algorithm', '')}"
        report = hf_optim.quantize_onnx(src, out, mode=mode, **kwargs)
        written = json.loads((out / "quantization.json").read_text())
        assert written["mode"] == mode and written["size_bytes"] == _size(out) < _size(src)
        assert (out / "tokenizer.json").is_file()
        op = "MatMulInteger" if mode == "dynamic-int8" else "MatMulNBits"
        assert written["op_counts_after"].get(op, 0) >= 7 * model.config.num_hidden_layers
        got = _load(out)(input_ids=ids).logits
        diff = float((got - reference).abs().max())
        assert diff == pytest.approx(0, abs=0.15) and diff > 0  # really quantized, still close
        assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75
        assert report["parity"]["top1_agreement"] >= 0.75
    assert written["algorithm"] == "hqq" and written["block_size"] == 32


@pytest.mark.parametrize("method", ["MinMax", "Entropy"])
def test_quantize_static_qdq_calibrated(exported, method):
    _, src = exported("gpt2")
    out = src.parent / f"static-{method}"
    report = hf_optim.quantize_onnx(src, out, mode="static-int8", calibration_texts=TEXTS, calibrate_method=method)
    assert report["calibration_samples"] == len(TEXTS) and report["format"] == "QDQ"
    assert report["op_counts_after"]["QuantizeLinear"] > 0 and report["op_counts_after"]["DequantizeLinear"] > 0
    assert report["size_bytes"] < report["source_size_bytes"]
    assert report["parity"]["max_abs_logits_diff"] < 0.2 and report["parity"]["top1_agreement"] >= 0.75
    assert _load(out).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)


def test_quantize_an_optimized_folder(exported):
    """The O2 graph's fused ops defeat ONNX's shape inference (the ORT 1.32 failure); symbolic inference fixes it."""
    _, src = exported("gpt2")
    hf_optim.optimize_onnx(src, src.parent / "o2q", level="O2")
    report = hf_optim.quantize_onnx(src.parent / "o2q", src.parent / "o2-int8", mode="dynamic-int8")
    assert report["source_optimized"] and report["parity"]["top1_agreement"] >= 0.75
    assert report["op_counts_after"]["SkipLayerNormalization"] == 4
    with pytest.raises(ConfigError, match="already quantized"):
        hf_optim.quantize_onnx(src.parent / "o2-int8", src.parent / "again")


def test_cli_optimize_and_quantize(exported, tmp_path, capsys):
    _, src = exported("gpt2")
    assert main(["export", "optimize", str(src), "--output", str(tmp_path / "o2"), "--level", "O2"]) == 0
    assert "SkipLayerNormalization=4" in capsys.readouterr().out
    texts = tmp_path / "calib.txt"
    texts.write_text("\n\n".join(TEXTS))
    assert main(["export", "quantize", str(src), "--output", str(tmp_path / "q"), "--mode", "static-int8",
                 "--calibration-data", str(texts), "--calibrate-method", "Percentile"]) == 0
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert report["calibrate_method"] == "Percentile" and report["calibration_samples"] == len(TEXTS)
    assert main(["export", "quantize", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "no model.onnx" in capsys.readouterr().err


def test_bad_input_is_named(exported, tmp_path):
    _, src = exported("gpt2")
    with pytest.raises(ConfigError, match="level='O9'.*O1, O2, O3"):
        hf_optim.optimize_onnx(src, tmp_path / "x", level="O9")
    with pytest.raises(ConfigError, match="mode='int2'.*dynamic-int8"):
        hf_optim.quantize_onnx(src, tmp_path / "x", mode="int2")
    with pytest.raises(ConfigError, match="calibrate_method='Max'"):
        hf_optim.quantize_onnx(src, tmp_path / "x", mode="static-int8", calibration_texts=TEXTS, calibrate_method="Max")
    with pytest.raises(ConfigError, match="needs calibration_texts"):
        hf_optim.quantize_onnx(src, tmp_path / "x", mode="static-int8")
    with pytest.raises(ConfigError, match="block_size=24"):
        hf_optim.quantize_onnx(src, tmp_path / "x", mode="int4", block_size=24)
    with pytest.raises(ConfigError, match="gelu_approximation needs"):
        hf_optim.optimize_onnx(src, tmp_path / "x", level="O1", gelu_approximation=True)
    for call in (hf_optim.optimize_onnx, hf_optim.quantize_onnx):
        with pytest.raises(ConfigError, match="no model.onnx.*export_onnx"):
            call(tmp_path, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_stories260k_int8_stays_close(tmp_path, stories260k_dir):
    export_onnx(stories260k_dir, tmp_path / "fp32")
    report = hf_optim.quantize_onnx(tmp_path / "fp32", tmp_path / "int8", mode="dynamic-int8")
    parity = report["parity"]
    # a trained model: int8 moves logits by a small fraction of their range and keeps the argmax nearly everywhere
    assert parity["max_abs_logits_diff"] < 0.05 * parity["logits_scale"]
    assert parity["top1_agreement"] >= 0.9 and report["size_bytes"] < report["source_size_bytes"]
