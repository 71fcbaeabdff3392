"""TensorRT engine building (issue 4): the parts that need neither TensorRT nor a GPU, and the build where present."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import hf_optim  # noqa: E402
from hf_optim.cli import main  # noqa: E402
from hf_optim.core.errors import ConfigError  # noqa: E402
from hf_optim.export.tensorrt import (  # noqa: E402
    INSTALL_HINT,
    ProfileRanges,
    ShapeRange,
    build_engine,
    check_device,
    check_precision,
    count_qdq_nodes,
    profile_shapes,
)
from tests.helpers import tiny_model  # noqa: E402

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = "TensorRT is not installed (optional extra hf-optim[tensorrt]; the registry here only has stub packages)"
RANGES = ProfileRanges(batch=ShapeRange(1, 2, 4), sequence=ShapeRange(1, 16, 128), past_sequence=ShapeRange(0, 32, 256))


@pytest.fixture(scope="module")
def onnx_dirs(tmp_path_factory):
    """The tiny Llama (2 layers, 2 KV heads of 16) exported with and without KV cache."""
    model = tiny_model("llama").eval()
    root = tmp_path_factory.mktemp("trt")
    hf_optim.export_onnx(model, root / "past", with_past=True, validate=False)
    hf_optim.export_onnx(model, root / "no_past", with_past=False, validate=False)
    return root / "past", root / "no_past"


def test_profile_shapes_follow_the_graph_inputs(onnx_dirs):
    shapes = profile_shapes(onnx_dirs[0], RANGES)
    names = ["input_ids", "attention_mask", "position_ids"]
    names += [f"past_key_values.{layer}.{kind}" for layer in range(2) for kind in ("key", "value")]
    assert list(shapes) == names
    assert shapes["input_ids"] == ((1, 1), (2, 16), (4, 128))
    assert shapes["position_ids"] == shapes["input_ids"]
    # the mask spans the cache and the new tokens
    assert shapes["attention_mask"] == ((1, 1), (2, 48), (4, 384))
    for name in names[3:]:
        assert shapes[name] == ((1, 2, 0, 16), (2, 2, 32, 16), (4, 2, 256, 16))


def test_profile_shapes_without_cache(onnx_dirs):
    shapes = profile_shapes(onnx_dirs[1] / "model.onnx", RANGES)
    assert list(shapes) == ["input_ids", "attention_mask", "position_ids"]
    assert shapes["attention_mask"] == shapes["input_ids"] == ((1, 1), (2, 16), (4, 128))


def test_unnamed_dynamic_axis_is_rejected(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 8])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="'x' axis 0 is 'rows'"):
        profile_shapes(tmp_path)


@pytest.mark.parametrize(
    ("precision", "flags"),
    [("fp16", ("FP16",)), ("bf16", ("BF16",)), ("int8", ("INT8", "FP16")), ("fp8", ("FP8", "FP16"))],
)
def test_precision_flags(precision, flags):
    assert check_precision(precision) == flags


@pytest.mark.parametrize("precision", ["fp32", "FP16", "int4", ""])
def test_bad_precision(precision):
    with pytest.raises(ConfigError, match=f"precision={precision!r}.*fp16, bf16, int8, fp8"):
        check_precision(precision)


def test_device_capability():
    check_device("fp8", (9, 0))
    check_device("bf16", (8, 0))
    with pytest.raises(ConfigError, match=r"fp8.*>= 8.9; this one is 8.0"):
        check_device("fp8", (8, 0))
    with pytest.raises(ConfigError, match=r"bf16.*>= 8.0; this one is 7.5"):
        check_device("bf16", (7, 5))


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        (ProfileRanges(batch=ShapeRange(2, 1, 4)), "batch range min=2, opt=1, max=4 must satisfy min <= opt <= max"),
        (ProfileRanges(sequence=ShapeRange(1, 600, 512)), "sequence range .*opt=600, max=512"),
        (ProfileRanges(sequence=ShapeRange(0, 1, 8)), "sequence min=0 must be >= 1"),
        (ProfileRanges(past_sequence=ShapeRange(-1, 0, 8)), "past_sequence min=-1 must be >= 0"),
        (ProfileRanges(batch=ShapeRange(1, 1.5, 4)), "must be integers"),
    ],
)
def test_bad_ranges(onnx_dirs, ranges, message):
    with pytest.raises(ConfigError, match=message):
        profile_shapes(onnx_dirs[0], ranges)


def test_missing_onnx_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass a folder written by `hf-optim export onnx`"):
        build_engine(tmp_path / "nowhere", precision="fp16")


def test_int8_needs_qdq_graph(onnx_dirs, tmp_path):
    assert count_qdq_nodes(onnx_dirs[0]) == 0
    with pytest.raises(ConfigError, match="precision='int8' builds from a Q/DQ-quantized ONNX graph"):
        build_engine(onnx_dirs[0], tmp_path / "x.engine", precision="int8")
    # a graph with Q/DQ pairs is counted
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [scale],
    )
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    assert count_qdq_nodes(tmp_path) == 2


def test_missing_tensorrt_is_a_clear_error(onnx_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(ConfigError, match=r"TensorRT is not installed: pip install 'hf-optim\[tensorrt\]'"):
        build_engine(onnx_dirs[0], tmp_path / "model.engine", precision="fp16", ranges=RANGES)
    assert not list(tmp_path.iterdir())
    code = main(["export", "tensorrt", str(onnx_dirs[0]), "--precision", "bf16", "--output", str(tmp_path / "e")])
    assert code == 2 and INSTALL_HINT in capsys.readouterr().err


def test_cli_rejects_bad_ranges(onnx_dirs, capsys):
    code = main(["export", "tensorrt", str(onnx_dirs[0]), "--precision", "fp16", "--sequence", "8", "4", "16"])
    assert code == 2 and "sequence range min=8, opt=4, max=16" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="building a TensorRT engine needs an NVIDIA GPU")
def test_build_fp16_engine(onnx_dirs, tmp_path):
    import json

    report = build_engine(onnx_dirs[0], tmp_path / "model.engine", precision="fp16", ranges=RANGES)
    engine = tmp_path / "model.engine"
    assert engine.stat().st_size == report["engine_bytes"] > 0
    written = json.loads((tmp_path / "model.engine.json").read_text())
    assert written["precision"] == "fp16" and written["profile"]["input_ids"]["max"] == [4, 128]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.engine.json"]
