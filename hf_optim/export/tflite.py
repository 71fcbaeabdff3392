"""Export a causal LM to a TFLite (LiteRT) flatbuffer with litert-torch, validated with ai-edge-litert's interpreter.

The graph has one input, ``input_ids`` int32 of the fixed shape (1, sequence_length) (LiteRT runtimes favour int32
and static shapes; it is cast to int64 inside), and one output, the logits (1, sequence_length, vocab). No KV cache.

litert-torch is an optional extra (``pip install 'hf-optim[tflite]'``). As of litert-torch 0.10.0 it cannot be
installed beside this project's pins: it needs litert-converter 0.5 → xdsl 0.28.0 → typing-extensions < 4.13, while
pydantic 2.14 and anyio 4.16 need typing-extensions >= 4.16 (and litert-torch <= 0.9.3 needs torch < 2.13).

Example:
    >>> report = export_tflite("path/to/model", "model.tflite", sequence_length=64, quantize="dynamic-int8")
    >>> report["max_abs_diff"]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_optim.core.errors import ConfigError, HfOptimError

QUANTIZE_MODES = ("none", "dynamic-int8", "weight-only-int8")
INSTALL_HINT = (
    "litert-torch and ai-edge-litert are not installed: pip install 'hf-optim[tflite]' "
    "(litert-torch 0.10 needs typing-extensions < 4.13, which conflicts with pydantic >= 2.12; use a separate venv)."
)


class TFLiteValidationError(HfOptimError):
    """The TFLite model's logits disagree with PyTorch beyond the tolerance."""


class _Int32LogitsLM(nn.Module):
    """``model`` as ``input_ids`` (int32) → logits: the one-input, one-output signature a LiteRT runtime expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.long(), use_cache=False).logits


def _import_litert() -> tuple[Any, Any]:
    try:
        import litert_torch
        from ai_edge_litert import interpreter
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return litert_torch, interpreter


def _quant_config(quantize: str) -> Any:
    if quantize == "none":
        return None
    from litert_torch.generative.quantize import quant_recipes

    # per-channel int8 weights; dynamic also quantizes activations at run time
    return quant_recipes.full_dynamic_recipe() if quantize == "dynamic-int8" else quant_recipes.full_weight_only_recipe()


def _run_tflite(interpreter_module: Any, path: Path, ids: torch.Tensor, threads: int) -> torch.Tensor:
    interpreter = interpreter_module.Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(source["index"], ids.numpy().astype(source["dtype"]))
    interpreter.invoke()
    return torch.from_numpy(interpreter.get_tensor(target["index"]).copy())


def export_tflite(
    model_or_dir: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    sequence_length: int = 128,
    quantize: str = "none",
    atol: float = 1e-4,
) -> dict:
    """Convert to ``output`` (.tflite) and write ``<output>.json`` with max |logits − PyTorch|.

    fp32 (``quantize="none"``) must agree to ``atol`` or :class:`TFLiteValidationError` is raised and nothing is
    written; quantized models report their difference and top-1 agreement without a limit. Written atomically.

    Example:
        >>> export_tflite(model, "tiny.tflite", sequence_length=32)["max_abs_diff"] < 1e-4
        True
    """
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={quantize!r} is not supported; use one of {', '.join(QUANTIZE_MODES)}.")
    if not isinstance(sequence_length, int) or sequence_length < 1:
        raise ConfigError(f"sequence_length={sequence_length!r} must be a positive integer (the fixed input length).")
    output = Path(output)
    if output.suffix != ".tflite":
        raise ConfigError(f"output={str(output)!r} must end in .tflite.")
    from hf_optim.export.onnx import _check_supported, _load

    model, _ = _load(model_or_dir)
    _check_supported(model)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and sequence_length > limit:
        raise ConfigError(f"sequence_length={sequence_length} exceeds the model's {limit} positions.")
    litert_torch, interpreter = _import_litert()  # after the input checks, so those errors show without the extra

    was_training = model.training
    model.eval()
    wrapper = _Int32LogitsLM(model).eval()
    ids = torch.randint(2, model.config.vocab_size, (1, sequence_length), dtype=torch.int32,
                        generator=torch.Generator().manual_seed(0))
    try:
        started = time.perf_counter()
        with torch.no_grad():
            edge = litert_torch.convert(wrapper, (ids,), quant_config=_quant_config(quantize))
            reference = wrapper(ids)
        convert_seconds = time.perf_counter() - started
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = output.with_name(f".{output.name}.{os.getpid()}.tflite")
        edge.export(str(staging))
        try:
            logits = _run_tflite(interpreter, staging, ids, torch.get_num_threads())
            diff = float((logits - reference).abs().max())
            report = {
                "output": str(output), "quantize": quantize, "sequence_length": sequence_length,
                "input": {"name": "input_ids", "dtype": "int32", "shape": [1, sequence_length]},
                "logits_shape": list(logits.shape), "max_abs_diff": diff,
                "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                "atol": atol if quantize == "none" else None, "size_bytes": staging.stat().st_size,
                "convert_seconds": round(convert_seconds, 3), "litert_torch_version": litert_torch.__version__,
            }
            if quantize == "none" and not diff <= atol:  # `not <=` also catches NaN
                raise TFLiteValidationError(
                    f"TFLite logits differ from PyTorch by {diff:.3g} > atol={atol}; nothing was written."
                )
            report_staging = staging.with_suffix(".json")
            report_staging.write_text(json.dumps(report, indent=2))
            os.replace(staging, output)
            os.replace(report_staging, output.with_suffix(".tflite.json"))
        finally:
            staging.unlink(missing_ok=True)
            staging.with_suffix(".json").unlink(missing_ok=True)
    finally:
        model.train(was_training)
    return report
