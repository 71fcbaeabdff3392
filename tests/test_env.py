from __future__ import annotations

import copy
import importlib.metadata
import json
import sys

import pytest
import torch

from hf_optim import cli
from hf_optim.core.env import collect_environment, format_environment


@pytest.fixture(scope="module")
def report():
    return collect_environment()


def test_report_has_the_installed_stack_and_cuda_state(report):
    assert report["stack"]["torch"] == importlib.metadata.version("torch") == torch.__version__
    assert report["stack"]["transformers"] == importlib.metadata.version("transformers")
    assert report["hardware"]["cuda"]["available"] is torch.cuda.is_available()
    assert len(report["hardware"]["cuda"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["hardware"]["cpu"]["logical_cores"] >= 1
    assert report["hardware"]["ram_gib"] > 0
    deepspeed = report["backends"]["deepspeed"]
    assert deepspeed["available"] is True
    assert deepspeed["version"] == importlib.metadata.version("deepspeed")
    assert "accelerator=" + ("cuda" if torch.cuda.is_available() else "cpu") in deepspeed["detail"]
    json.dumps(report)  # serialisable as it is


def test_missing_backend_is_reported_not_raised(monkeypatch):
    # deepspeed and optimum are installed here; a None entry in sys.modules makes them unimportable
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "optimum", None)
    backends = collect_environment()["backends"]
    assert backends["deepspeed"] == {
        "available": False,
        "version": None,
        "detail": "not installed (pip install deepspeed) — ZeRO / offload training",
    }
    assert backends["optimum_onnx"]["available"] is False  # its parent package is missing
    assert "pip install optimum-onnx" in backends["optimum_onnx"]["detail"]


def _fake_package(root, name: str, body: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)


def test_backend_whose_import_raises_is_reported_with_the_error(tmp_path, monkeypatch):
    _fake_package(tmp_path, "tensorrt", "raise RuntimeError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    entry = collect_environment()["backends"]["tensorrt"]
    assert entry["available"] is False
    assert entry["detail"] == "import failed: RuntimeError: libnvinfer.so.10: cannot open shared object file"


def test_backend_probe_uses_the_module_api(tmp_path, monkeypatch):
    providers = "def get_available_providers():\n    return ['CUDAExecutionProvider', 'CPUExecutionProvider']\n"
    _fake_package(tmp_path, "onnxruntime", providers)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    entry = collect_environment()["backends"]["onnxruntime"]
    assert entry["available"] is True
    assert entry["detail"] == "providers: CUDAExecutionProvider, CPUExecutionProvider"

    monkeypatch.delitem(sys.modules, "onnxruntime")
    broken = "def get_available_providers():\n    raise OSError('no libs')\n"
    (tmp_path / "onnxruntime" / "__init__.py").write_text(broken)
    entry = collect_environment()["backends"]["onnxruntime"]
    assert entry["available"] is False
    assert entry["detail"] == "imported, but OSError: no libs"


def test_cli_env_json_prints_valid_json(capsys):
    assert cli.main(["env", "--json"]) == 0
    out = capsys.readouterr().out
    parsed = json.loads(out)  # nothing a backend printed while importing leaked into stdout
    assert parsed["stack"]["torch"] == torch.__version__
    assert set(parsed["backends"]) >= {"deepspeed", "bitsandbytes", "onnxruntime", "tensorrt", "litert", "torchao"}


def test_format_environment_sections_and_gpu_rows(report):
    text = format_environment(report)
    assert text.startswith("Stack\n")
    assert "\nHardware\n" in text and "\nOptional backends\n" in text
    assert f"torch            {torch.__version__}" in text
    assert "  ✓ deepspeed " in text
    gpu_report = copy.deepcopy(report)
    gpu_report["hardware"]["cuda"] = {
        "available": True, "version": "12.8",
        "devices": [
            {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1, "bf16": True, "fp8": True},
        ],
    }
    assert "gpu 0  NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB, bf16 ✓  fp8 ✓" in format_environment(gpu_report)


@pytest.mark.gpu
def test_gpu_rows_match_torch(report):
    devices = report["hardware"]["cuda"]["devices"]
    assert [d["name"] for d in devices] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    major, minor = torch.cuda.get_device_capability(0)
    assert devices[0]["capability"] == f"{major}.{minor}"
    assert devices[0]["fp8"] is ((major, minor) >= (8, 9))
    assert devices[0]["bf16"] is torch.cuda.is_bf16_supported(including_emulation=False)
