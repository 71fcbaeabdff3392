"""What this machine offers: versions of the stack, CPU/RAM/GPUs, and which optional backends actually work.

Every backend probe is guarded: a missing package costs one ``find_spec`` call, and a package that fails to import
(ImportError, a RuntimeError from a broken CUDA build, ...) is reported with its message instead of raising.

Example:
    >>> from hf_optim.core.env import collect_environment, format_environment
    >>> report = collect_environment()
    >>> report["hardware"]["cuda"]["available"]
    False
    >>> print(format_environment(report))  # what `hf-optim env` prints
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

# report key -> distribution name on PyPI
STACK_PACKAGES = {
    "torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers",
    "huggingface_hub": "huggingface-hub", "accelerate": "accelerate", "datasets": "datasets",
    "evaluate": "evaluate", "safetensors": "safetensors", "numpy": "numpy", "optimum": "optimum",
}
_GIB = 1024**3


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _stack() -> dict[str, str | None]:
    from hf_optim import __version__

    stack = {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "hf_optim": __version__,
    }
    stack.update({key: _dist_version(dist) for key, dist in STACK_PACKAGES.items()})
    return stack


def _cpu() -> dict[str, Any]:
    import psutil

    cpuinfo = Path("/proc/cpuinfo")
    model, flags = None, None
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model is None:
                model = value
            elif key == "flags" and flags is None:
                flags = set(value.split())
    model = model or platform.processor() or None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": usable,
        # None when the flags cannot be read (no /proc/cpuinfo), rather than a misleading False
        "avx2": None if flags is None else "avx2" in flags,
        "avx512": None if flags is None else "avx512f" in flags,
        "amx_bf16": None if flags is None else "amx_bf16" in flags,  # makes bf16 matmuls fast on CPU
    }


def _cuda() -> dict[str, Any]:
    import torch

    available = torch.cuda.is_available()
    devices = []
    for index in range(torch.cuda.device_count() if available else 0):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        devices.append({
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / _GIB, 1),
            "bf16": capability >= (8, 0),
            "fp8": capability >= (8, 9),  # Ada and Hopper tensor cores
        })
    return {"available": available, "version": torch.version.cuda, "devices": devices}


def _hardware() -> dict[str, Any]:
    import psutil

    return {"cpu": _cpu(), "ram_gib": round(psutil.virtual_memory().total / _GIB, 1), "cuda": _cuda()}


# --- optional backends: each detail function gets the imported module and returns a one-line description ---


def _jit_toolchain() -> str:
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    import torch

    compiler = os.environ.get("CXX", "c++")
    parts = [f"ninja {_mark(is_ninja_available())}", f"{compiler} {_mark(shutil.which(compiler) is not None)}"]
    if torch.cuda.is_available():  # CUDA ops also need nvcc
        parts.append(f"nvcc {_mark(bool(CUDA_HOME and shutil.which(os.path.join(CUDA_HOME, 'bin', 'nvcc'))))}")
    return ", ".join(parts)


def _deepspeed_detail(module: Any) -> str:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return (f"accelerator={accelerator.device_name()} ({accelerator.communication_backend_name()}); "
            f"C++ ops JIT: {_jit_toolchain()}")


def _bitsandbytes_detail(module: Any) -> str:
    cext = importlib.import_module("bitsandbytes.cextension")
    backend = getattr(cext, "BNB_BACKEND", "unknown")
    lib = getattr(cext, "lib", None)
    loaded = lib is not None and "Mock" not in type(lib).__name__  # a mock stands in when the .so failed to load
    return f"backend={backend}; native library {'loaded' if loaded else 'NOT loaded'}"


def _onnxruntime_detail(module: Any) -> str:
    return "providers: " + ", ".join(module.get_available_providers())


def _tensorrt_detail(module: Any) -> str:
    import torch

    return "needs a CUDA GPU at run time" + ("" if torch.cuda.is_available() else " (none visible here)")


BACKENDS: dict[str, tuple[str, str, Callable[[Any], str] | None, str]] = {
    # name: (module to import, PyPI distribution, detail function, what it is for)
    "deepspeed": ("deepspeed", "deepspeed", _deepspeed_detail, "ZeRO / offload training"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes", _bitsandbytes_detail, "8/4-bit quantization, 8-bit optimizers"),
    "onnxruntime": ("onnxruntime", "onnxruntime", _onnxruntime_detail, "ONNX inference"),
    "tensorrt": ("tensorrt", "tensorrt", _tensorrt_detail, "TensorRT engines"),
    "litert": ("ai_edge_litert", "ai-edge-litert", None, "LiteRT (TFLite) runtime"),
    "litert_torch": ("litert_torch", "litert-torch", None, "PyTorch -> LiteRT conversion"),
    "torchao": ("torchao", "torchao", None, "PyTorch-native quantization"),
    "optimum": ("optimum", "optimum", None, "Hugging Face optimization toolkit"),
    "optimum_onnx": ("optimum.onnxruntime", "optimum-onnx", None, "ONNX export and ORT models for optimum"),
}


def _probe(module_name: str, dist: str, detail_fn: Callable[[Any], str] | None, purpose: str) -> dict[str, Any]:
    """Import ``module_name`` if it is installed and describe it; never raises."""
    version = _dist_version(dist)
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:  # its parent package (optimum for optimum.onnxruntime) is not installed
        spec = None
    except Exception as exc:  # importing the parent package failed
        return {"available": False, "version": version, "detail": f"import failed: {type(exc).__name__}: {exc}"}
    if spec is None:
        return {"available": False, "version": None, "detail": f"not installed (pip install {dist}) — {purpose}"}
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure at import means the backend does not work here
        return {"available": False, "version": version, "detail": f"import failed: {type(exc).__name__}: {exc}"}
    version = version or getattr(module, "__version__", None)
    if detail_fn is None:
        return {"available": True, "version": version, "detail": purpose}
    try:
        return {"available": True, "version": version, "detail": detail_fn(module)}
    except Exception as exc:  # imported, but unusable (e.g. no accelerator, broken native library)
        return {"available": False, "version": version, "detail": f"imported, but {type(exc).__name__}: {exc}"}


def collect_environment() -> dict[str, Any]:
    """Versions, hardware and optional backends as a JSON-serialisable dict.

    Anything a backend prints while being imported goes to stderr, so ``hf-optim env --json`` stays parseable,
    and log records below ERROR are muted meanwhile (DeepSpeed warns that it fell back to CPU, which the report
    already says).

    Example:
        >>> report = collect_environment()
        >>> sorted(report)
        ['backends', 'hardware', 'stack']
        >>> report["backends"]["onnxruntime"]  # doctest: +SKIP
        {'available': True, 'version': '1.22.0', 'detail': 'providers: CPUExecutionProvider'}
    """
    muted = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            backends = {name: _probe(*entry) for name, entry in BACKENDS.items()}
    finally:
        logging.disable(muted)
    return {"stack": _stack(), "hardware": _hardware(), "backends": backends}


def _rows(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(key) for key, _ in rows)
    return [f"{indent}{key.ljust(width)}  {value}" for key, value in rows]


def _mark(flag: bool | None) -> str:
    return "?" if flag is None else "✓" if flag else "✗"


def format_environment(report: dict[str, Any]) -> str:
    """A readable, aligned text version of :func:`collect_environment`'s report.

    Example:
        >>> print(format_environment(collect_environment()))  # doctest: +SKIP
        Stack
          python        3.11.7 (CPython)
          ...
    """
    lines = ["Stack", *_rows([(k, v or "not installed") for k, v in report["stack"].items()])]

    hw, cpu, cuda = report["hardware"], report["hardware"]["cpu"], report["hardware"]["cuda"]
    cores = f"{cpu['logical_cores']} logical / {cpu['physical_cores']} physical, {cpu['usable_cores']} usable"
    isa = f"AVX2 {_mark(cpu['avx2'])}  AVX-512 {_mark(cpu['avx512'])}  AMX-BF16 {_mark(cpu['amx_bf16'])}"
    rows = [("cpu", cpu["model"] or "unknown"), ("cores", cores), ("isa", isa), ("ram", f"{hw['ram_gib']} GiB")]
    if cuda["available"]:
        rows.append(("cuda", f"{cuda['version']}, {len(cuda['devices'])} device(s)"))
        for index, gpu in enumerate(cuda["devices"]):
            sm = gpu["capability"].replace(".", "")
            flags = f"bf16 {_mark(gpu['bf16'])}  fp8 {_mark(gpu['fp8'])}"
            rows.append((f"gpu {index}", f"{gpu['name']}, sm_{sm}, {gpu['memory_gib']} GiB, {flags}"))
    else:
        built = f"torch built with CUDA {cuda['version']}" if cuda["version"] else "CPU-only torch build"
        rows.append(("cuda", f"not available ({built})"))
    lines += ["", "Hardware", *_rows(rows)]

    backends = report["backends"]
    width = max(len(name) for name in backends)
    vwidth = max(len(b["version"] or "-") for b in backends.values())
    lines += ["", "Optional backends"]
    for name, b in backends.items():
        version = (b["version"] or "-").ljust(vwidth)
        lines.append(f"  {_mark(b['available'])} {name.ljust(width)}  {version}  {b['detail']}")
    return "\n".join(lines)
