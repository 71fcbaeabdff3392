"""Build a serialized TensorRT engine from a folder written by :func:`hf_optim.export_onnx`.

The pure parts (precision → builder flags, optimization-profile shapes read from the ONNX graph's inputs, range
validation) return plain data and need neither TensorRT nor a GPU; :func:`build_engine` is a thin layer that hands
them to the TensorRT Python API. TensorRT is an optional extra (``pip install 'hf-optim[tensorrt]'``, Linux with an
NVIDIA GPU) imported only when an engine is built.

Precisions: ``fp16`` and ``bf16`` (Ampere or newer) let TensorRT pick reduced-precision kernels for an fp32 graph.
``int8`` and ``fp8`` (Ada/Hopper or newer) use *explicit* quantization: the ONNX graph must carry
QuantizeLinear/DequantizeLinear (Q/DQ) nodes, e.g. from ONNX Runtime's static QDQ quantization or NVIDIA
ModelOpt; TensorRT 10 deprecated implicit INT8 calibration, so no calibrator is offered. Layers outside the Q/DQ
pairs fall back to fp16.

Example:
    >>> report = build_engine("exported/", precision="fp16", ranges=ProfileRanges(sequence=ShapeRange(1, 128, 512)))
    >>> report["engine"]
    'exported/model-fp16.engine'
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_optim.core.atomic import write_file_atomically
from hf_optim.core.errors import ConfigError, HfOptimError
from hf_optim.export.runtime import ONNX_FILE

# TensorRT BuilderFlag names per precision; fp16 is added to the quantized ones for the layers outside Q/DQ pairs
PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "fp16": ("FP16",),
    "bf16": ("BF16",),
    "int8": ("INT8", "FP16"),
    "fp8": ("FP8", "FP16"),
}
# lowest CUDA compute capability with native kernels for the precision (bf16: Ampere, fp8: Ada/Hopper)
MIN_COMPUTE_CAPABILITY = {"fp16": (6, 0), "bf16": (8, 0), "int8": (6, 1), "fp8": (8, 9)}
INSTALL_HINT = (
    "TensorRT is not installed: pip install 'hf-optim[tensorrt]' (NVIDIA's tensorrt wheels, Linux with an NVIDIA "
    "GPU and CUDA 12/13) or run inside NVIDIA's TensorRT container; the ONNX export itself runs without it."
)
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


class TensorRTBuildError(HfOptimError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


@dataclass(frozen=True)
class ShapeRange:
    """Minimum, optimum (what TensorRT tunes kernels for) and maximum of one dynamic axis; needs min ≤ opt ≤ max."""

    min: int
    opt: int
    max: int

    def check(self, name: str, lowest: int) -> None:
        values = (self.min, self.opt, self.max)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{name} range {values} must be integers.")
        if self.min < lowest:
            raise ConfigError(f"{name} min={self.min} must be >= {lowest}.")
        if not self.min <= self.opt <= self.max:
            raise ConfigError(
                f"{name} range min={self.min}, opt={self.opt}, max={self.max} must satisfy min <= opt <= max."
            )


@dataclass(frozen=True)
class ProfileRanges:
    """Ranges of the dynamic axes ``export_onnx`` names: batch, sequence (new tokens) and past_sequence (cache).

    The default covers prefill of up to 512 tokens and decoding against a cache of up to 512 tokens at batch ≤ 4.
    """

    batch: ShapeRange = field(default_factory=lambda: ShapeRange(1, 1, 4))
    sequence: ShapeRange = field(default_factory=lambda: ShapeRange(1, 64, 512))
    past_sequence: ShapeRange = field(default_factory=lambda: ShapeRange(0, 64, 512))

    def check(self) -> None:
        self.batch.check("batch", 1)
        self.sequence.check("sequence", 1)
        self.past_sequence.check("past_sequence", 0)  # 0: the prefill step feeds an empty cache


def check_precision(precision: str) -> tuple[str, ...]:
    """The TensorRT BuilderFlag names for ``precision`` (fp16, bf16, int8 or fp8).

    Example:
        >>> check_precision("int8")
        ('INT8', 'FP16')
    """
    if precision not in PRECISION_FLAGS:
        raise ConfigError(f"precision={precision!r} is not supported; use one of {', '.join(PRECISION_FLAGS)}.")
    return PRECISION_FLAGS[precision]


def check_device(precision: str, compute_capability: tuple[int, int]) -> None:
    """Raise when the GPU (``compute_capability`` as (major, minor)) has no kernels for ``precision``."""
    check_precision(precision)
    needed = MIN_COMPUTE_CAPABILITY[precision]
    if tuple(compute_capability) < needed:
        raise ConfigError(
            f"precision={precision!r} needs a GPU of compute capability >= {needed[0]}.{needed[1]}; this one is "
            f"{compute_capability[0]}.{compute_capability[1]}: use {'fp16' if precision != 'fp16' else 'an fp32 ONNX Runtime session'}."
        )


def _onnx_file(onnx_dir: str | os.PathLike) -> Path:
    path = Path(onnx_dir)
    path = path / ONNX_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass a folder written by `hf-optim export onnx` (or a .onnx file).")
    return path


def _load_graph(onnx_path: Path) -> Any:
    import onnx

    # weights are not needed for the input shapes or the node types
    return onnx.load(str(onnx_path), load_external_data=False).graph


def count_qdq_nodes(onnx_path: str | os.PathLike) -> int:
    """How many QuantizeLinear/DequantizeLinear nodes the graph has (int8/fp8 engines need them)."""
    return sum(node.op_type in _QDQ_OPS for node in _load_graph(_onnx_file(onnx_path)).node)


def profile_shapes(
    onnx_path: str | os.PathLike, ranges: ProfileRanges | None = None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes per graph input, from its named dynamic axes and ``ranges``.

    ``total_sequence`` (the attention mask) is sequence + past_sequence, or sequence alone for an export without
    KV cache; fixed axes (heads, head_dim) keep their size.

    Example:
        >>> profile_shapes("exported/")["past_key_values.0.key"]
        ((1, 2, 0, 16), (1, 2, 64, 16), (4, 2, 512, 16))
    """
    ranges = ranges or ProfileRanges()
    ranges.check()
    graph = _load_graph(_onnx_file(onnx_path))
    initializers = {init.name for init in graph.initializer}
    inputs = [node for node in graph.input if node.name not in initializers]
    has_past = any(node.name.startswith("past_key_values.") for node in inputs)
    past = ranges.past_sequence if has_past else ShapeRange(0, 0, 0)
    axes = {
        "batch": ranges.batch,
        "sequence": ranges.sequence,
        "past_sequence": past,
        "total_sequence": ShapeRange(
            ranges.sequence.min + past.min, ranges.sequence.opt + past.opt, ranges.sequence.max + past.max
        ),
    }
    shapes = {}
    for node in inputs:
        per_level: list[list[int]] = [[], [], []]
        for index, dim in enumerate(node.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                sizes = (dim.dim_value,) * 3
            elif dim.dim_param in axes:
                axis = axes[dim.dim_param]
                sizes = (axis.min, axis.opt, axis.max)
            else:
                raise ConfigError(
                    f"input {node.name!r} axis {index} is {dim.dim_param or 'unnamed'!r}, not one of "
                    f"{', '.join(axes)}; export the graph with `hf-optim export onnx` so its axes are named."
                )
            for level, size in enumerate(sizes):
                per_level[level].append(int(size))
        shapes[node.name] = tuple(tuple(level) for level in per_level)
    return shapes


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return tensorrt


def _builder_flag(trt: Any, name: str, precision: str) -> Any:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise ConfigError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{name} for precision={precision!r}; "
            f"use one of {', '.join(p for p, f in PRECISION_FLAGS.items() if hasattr(trt.BuilderFlag, f[0]))}."
        )
    return flag


def build_engine(
    onnx_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    precision: str = "fp16",
    ranges: ProfileRanges | None = None,
    workspace_gib: float | None = None,
) -> dict:
    """Build ``output`` (default ``<onnx_dir>/model-<precision>.engine``) and a ``.json`` report beside it.

    One optimization profile covers the dynamic axes (see :class:`ProfileRanges`). Both files are written
    atomically (temporary sibling, then rename). Needs TensorRT and an NVIDIA GPU.

    Example:
        >>> build_engine("exported/", "llama-bf16.engine", precision="bf16")["precision"]
        'bf16'
    """
    flag_names = check_precision(precision)
    onnx_path = _onnx_file(onnx_dir)
    shapes = profile_shapes(onnx_path, ranges)
    if precision in ("int8", "fp8") and count_qdq_nodes(onnx_path) == 0:
        raise ConfigError(
            f"precision={precision!r} builds from a Q/DQ-quantized ONNX graph (explicit quantization), and "
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes: quantize it first (ONNX Runtime static QDQ "
            "or NVIDIA ModelOpt), or use fp16/bf16."
        )
    if workspace_gib is not None and workspace_gib <= 0:
        raise ConfigError(f"workspace_gib={workspace_gib} must be > 0 (or None for TensorRT's default).")
    output = Path(output) if output is not None else onnx_path.parent / f"model-{precision}.engine"
    trt = _import_tensorrt()
    import torch

    if torch.cuda.is_available():
        check_device(precision, torch.cuda.get_device_capability())

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT >= 10 networks are always explicit-batch; older releases need the flag
    major = int(trt.__version__.split(".")[0])
    network = builder.create_network(0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file so external data is found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for name in flag_names:
        config.set_flag(_builder_flag(trt, name, precision))
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 1024**3))
    profile = builder.create_optimization_profile()
    for name, (low, best, high) in shapes.items():
        profile.set_shape(name, low, best, high)
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build a {precision} engine from {onnx_path}; see its log above.")
    report = {
        "engine": str(output), "onnx": str(onnx_path), "precision": precision, "builder_flags": list(flag_names),
        "tensorrt_version": trt.__version__, "build_seconds": round(time.perf_counter() - started, 3),
        "profile": {name: {"min": s[0], "opt": s[1], "max": s[2]} for name, s in shapes.items()},
        "ranges": asdict(ranges or ProfileRanges()), "engine_bytes": serialized.nbytes,
    }
    write_file_atomically(output, bytes(serialized))
    write_file_atomically(output.with_suffix(output.suffix + ".json"), json.dumps(report, indent=2).encode())
    return report
