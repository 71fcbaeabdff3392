"""ONNX Runtime transformer-graph fusion (what Optimum's ``ORTOptimizer`` wraps) for folders written by export_onnx.

Levels follow Optimum's ``AutoOptimizationConfig``: O1 = ONNX Runtime basic graph optimizations only; O2 = extended
optimizations + the transformer fusions of ``onnxruntime.transformers.optimizer`` (LayerNorm/SkipLayerNorm,
SimplifiedLayerNorm/SkipSimplifiedLayerNorm for RMSNorm, GELU/FastGelu, attention where the pattern matches);
O3 = O2 + GELU approximation (Gelu -> FastGelu, tanh form, ~1e-3 relative change, so O3 is checked more loosely).
Optimum's O4 (fp16) is GPU-only and not offered. Every result is checked against the source export (or a PyTorch
model) with the export's own validation (max |logits diff| with and without past, greedy tokens identical).

Example:
    >>> report = optimize_onnx("exported/", "exported-o2/", level="O2")
    >>> report["fused_operators"]["SkipLayerNormalization"], report["validation"]["greedy_match"]
    (4, True)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from hf_optim.core.atomic import staged_directory
from hf_optim.core.errors import ConfigError
from hf_optim.export.onnx import EXTERNAL_DATA_FILE, VALIDATION_FILE, OnnxValidationError, _validate
from hf_optim.export.runtime import ONNX_FILE, OnnxCausalLM

OPTIMIZATION_FILE = "optimization.json"
QUANTIZATION_FILE = "quantization.json"
# level -> (ONNX Runtime graph-optimization level, transformer fusions on, GELU approximation on), as in Optimum
LEVELS = {"O1": (1, False, False), "O2": (2, True, False), "O3": (2, True, True)}
# O1/O2 keep the arithmetic; FastGelu's tanh approximation moves logits by ~1e-3 on random models
LEVEL_ATOL = {"O1": 1e-4, "O2": 1e-4, "O3": 1e-2}
# ORT has no "llama" optimizer class; its GPT-2 class carries the RMSNorm (SimplifiedLayerNorm) fusions that
# Llama-style graphs need, and is what it uses for qwen3 too
_OPTIMIZER_MODEL_TYPE = {"gpt2": "gpt2", "llama": "gpt2", "mistral": "gpt2", "qwen2": "gpt2", "qwen3": "gpt2"}
# files that describe the source graph rather than the model, so they are not copied to a derived folder
_GRAPH_FILES = {ONNX_FILE, EXTERNAL_DATA_FILE, VALIDATION_FILE, OPTIMIZATION_FILE, QUANTIZATION_FILE}


def check_onnx_dir(onnx_dir: str | os.PathLike) -> Path:
    """``onnx_dir`` as a Path, or a ConfigError when it holds no ``model.onnx``."""
    folder = Path(onnx_dir)
    if not (folder / ONNX_FILE).is_file():
        raise ConfigError(
            f"{str(folder)!r} has no {ONNX_FILE}; export the model first: hf_optim.export_onnx(model, dir) "
            "or `hf-optim export onnx <model> --output <dir>`."
        )
    return folder


def read_report(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


def copy_side_files(source: Path, target: Path) -> None:
    """Copy config, generation config and tokenizer files (everything but the graph and its reports)."""
    for path in source.iterdir():
        if path.is_file() and path.name not in _GRAPH_FILES and not path.name.startswith("."):
            shutil.copy2(path, target / path.name)


def op_counts(graph: Any) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))


def load_reference(onnx_dir: Path, reference_model: nn.Module | None) -> Any:
    """The PyTorch model when given, else the source fp32 export (itself validated against PyTorch by export_onnx)."""
    if reference_model is not None:
        return reference_model.float().eval()
    return OnnxCausalLM.from_pretrained(onnx_dir, providers=["CPUExecutionProvider"], num_threads=1)


def optimize_onnx(
    onnx_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    level: str = "O2",
    model_type: str | None = None,
    gelu_approximation: bool | None = None,
    reference_model: nn.Module | None = None,
    atol: float | None = None,
) -> dict:
    """Fuse the graph of an ``export_onnx`` folder with ONNX Runtime's transformer optimizer into ``output_dir``.

    ``model_type`` picks the optimizer class (default from config.json: GPT-2 for gpt2 and Llama-style families);
    ``gelu_approximation`` overrides the level's default (on only for O3). Parity is checked against
    ``reference_model`` (PyTorch) or else the source export; :class:`OnnxValidationError` is raised and nothing is
    written when it fails. ``output_dir`` gets model.onnx, config/tokenizer files and optimization.json (fused
    operator counts, op counts before/after, parity), written atomically.

    Example:
        >>> report = optimize_onnx("exported/", "exported-o2/", level="O2")
        >>> report["validation"]["max_abs_diff_no_past"] <= 1e-4
        True
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model
    from transformers import AutoConfig

    if level not in LEVELS:
        raise ConfigError(f"level={level!r} is not an optimization level; use one of {', '.join(LEVELS)}.")
    source = check_onnx_dir(onnx_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == source.resolve():
        raise ConfigError(f"output_dir {str(output_dir)!r} is the source folder; write the optimized graph elsewhere.")
    config = AutoConfig.from_pretrained(source)
    if model_type is None:
        model_type = _OPTIMIZER_MODEL_TYPE.get(config.model_type, "gpt2")
    elif model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r} is not an ONNX Runtime optimizer type; use one of "
                          f"{', '.join(sorted(MODEL_TYPES))} (gpt2 suits GPT-2 and Llama-style decoders).")
    opt_level, fusions, approximate = LEVELS[level]
    approximate = approximate if gelu_approximation is None else gelu_approximation
    if approximate and not fusions:
        raise ConfigError(f"gelu_approximation needs the transformer fusions of O2/O3, not level={level!r}.")
    atol = atol if atol is not None else (LEVEL_ATOL[level] if not approximate else LEVEL_ATOL["O3"])

    options = FusionOptions(model_type)
    options.enable_gelu_approximation = approximate
    source_report = read_report(source, VALIDATION_FILE)
    with staged_directory(output_dir) as staging:
        started = time.perf_counter()
        import onnx

        before = op_counts(onnx.load(str(source / ONNX_FILE), load_external_data=False).graph)
        optimized = optimize_model(
            str(source / ONNX_FILE), model_type=model_type,
            num_heads=getattr(config, "num_attention_heads", 0) or 0, hidden_size=getattr(config, "hidden_size", 0) or 0,
            optimization_options=options, opt_level=opt_level, use_gpu=False, only_onnxruntime=not fusions,
        )
        external = (source / EXTERNAL_DATA_FILE).exists()
        optimized.save_model_to_file(str(staging / ONNX_FILE), use_external_data_format=external)
        seconds = time.perf_counter() - started
        copy_side_files(source, staging)
        runtime_ref = load_reference(source, reference_model)
        with_past = any(i.name.startswith("past_key_values.") for i in optimized.model.graph.input)
        validation = _validate(runtime_ref, staging, with_past, atol, new_tokens=5)
        report: dict[str, Any] = {
            "level": level, "optimizer_model_type": model_type, "ort_opt_level": opt_level,
            "transformer_fusions": fusions, "gelu_approximation": approximate,
            "source": str(source), "source_model_type": config.model_type, "with_past": with_past,
            "reference": "pytorch" if reference_model is not None else "source onnx export",
            "fused_operators": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
            "op_counts_before": before, "op_counts_after": op_counts(optimized.model.graph),
            "optimize_seconds": round(seconds, 3), "validation": validation,
        }
        if source_report:
            report["source_validation"] = {k: source_report.get(k) for k in ("max_abs_diff_no_past",
                                                                            "max_abs_diff_with_past", "greedy_match")}
        if not validation["passed"]:
            raise OnnxValidationError(
                f"the {level}-optimized graph disagrees with the {report['reference']}: "
                f"{'; '.join(validation['failures'])}. Nothing was written; try a lower level (O1)."
            )
        (staging / OPTIMIZATION_FILE).write_text(json.dumps(report, indent=2))
    report["output_dir"] = str(output_dir)
    return report
