"""Building one variant folder from the base model and a list of explicit recipe steps, and loading it back to measure.

- Compression steps only: the steps run on a copy of the base model, written with :func:`hf_optim.save_optimized`
  (packed weights, ``hf_optim.json``, model card) and measured after :func:`hf_optim.load_optimized`.
- ``export: onnx`` (after any compression steps): :func:`hf_optim.export_onnx` writes the folder (validated against
  PyTorch); with ``export: onnx_quantize`` the fp32 graph goes to a scratch folder and
  :func:`hf_optim.quantize_onnx` writes the variant. Measured with :class:`hf_optim.OnnxCausalLM`.
- ``export: tflite``: :func:`hf_optim.export_tflite` writes ``model.tflite`` (its fixed length defaults to the
  recipe's perplexity window) and the tokenizer and config beside it; measured with ``TFLiteCausalLM``, which has
  no KV cache, so its decode speed is that of a full-window recompute per token.

:func:`hf_optim.save_optimized` writes the model card of a PyTorch variant; the pipeline writes (or completes) every
card with :func:`hf_optim.update_model_card`.

Example:
    >>> kind = build_variant(model, tokenizer, steps, "out/wanda-50", base_model="path/to/model",
    ...                      calibration_texts=texts)  # doctest: +SKIP
    >>> runtime = load_variant("out/wanda-50", kind)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hf_optim.compression.configs import config_from_dict
from hf_optim.compression.recipe import CompressionRecipe

# optional packages a step needs: without them the variant is skipped, with this reason
_REQUIREMENTS = {
    "bnb_int8": ("bitsandbytes",),
    "bnb_int4": ("bitsandbytes",),
    "torchao_int8_weight_only": ("torchao",),
    "torchao_int8_dynamic": ("torchao",),
    "torchao_int4_weight_only": ("torchao",),
    "onnx": ("onnx", "onnxruntime"),
    "onnx_quantize": ("onnx", "onnxruntime"),
    "tflite": ("litert_torch", "ai_edge_litert"),
}
TFLITE_FILE = "model.tflite"
_EXTRAS = {"bitsandbytes": "quantization", "torchao": "quantization", "onnx": "onnx", "onnxruntime": "onnx",
           "litert_torch": "tflite", "ai_edge_litert": "tflite"}


def missing_requirement(steps: Sequence[dict[str, Any]]) -> str | None:
    """Why these steps cannot run here (a package that is not installed), or None when they can."""
    for step in steps:
        for package in _REQUIREMENTS.get(step.get("method") or step.get("export"), ()):
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed (pip install 'hf-optim[{_EXTRAS[package]}]')"
    return None


def variant_kind(steps: Sequence[dict[str, Any]]) -> str:
    """``"torch"``, ``"onnx"`` or ``"tflite"``: the format the variant is shipped (and measured) in."""
    exports = [step["export"] for step in steps if "export" in step]
    return "tflite" if "tflite" in exports else "onnx" if exports else "torch"


def folder_name(name: str) -> str:
    """A folder (and Hub repo) friendly name: ``wanda-2:4+int8`` → ``wanda-2of4_int8``."""
    safe = name.replace(":", "of").replace("+", "_")
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in safe).strip(".") or "variant"


def _compress(model: nn.Module, tokenizer, steps: list[dict[str, Any]], calibration_texts, recipe) -> nn.Module:
    configs = [config_from_dict(step) for step in steps if "method" in step]
    if configs:
        CompressionRecipe(
            configs, num_calibration_samples=recipe.num_calibration_samples,
            calibration_seq_len=recipe.calibration_seq_len,
        ).apply(model, tokenizer, calibration_texts)
    return model


def _options(step: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in step.items() if key != "export"}


def build_variant(
    base: nn.Module,
    tokenizer,
    steps: list[dict[str, Any]],
    folder: str | Path,
    base_model: str | None,
    calibration_texts: Sequence[str] | None,
    recipe,
) -> None:
    """Apply ``steps`` to a copy of ``base`` and write the variant to ``folder`` (the exporters' parity reports too).

    ``recipe`` supplies the calibration sampling (``num_calibration_samples``, ``calibration_seq_len``) and the
    perplexity window a TFLite graph must hold.
    """
    folder = Path(folder)
    kind = variant_kind(steps)
    model = _compress(copy.deepcopy(base), tokenizer, steps, calibration_texts, recipe)
    exports = [step for step in steps if "export" in step]
    if kind == "torch":
        from hf_optim.compression.storage import save_optimized

        save_optimized(model, folder, tokenizer=tokenizer, base_model=base_model)
        return
    model = model.float().cpu()
    if kind == "onnx":
        from hf_optim.export.onnx import export_onnx

        if len(exports) == 1:
            export_onnx(model, folder, tokenizer=tokenizer, **_options(exports[0]))
        else:
            from hf_optim.export.ort_quantize import quantize_onnx

            with tempfile.TemporaryDirectory(prefix=".onnx-fp32-", dir=folder.parent) as scratch:
                export_onnx(model, Path(scratch) / "onnx", tokenizer=tokenizer, **_options(exports[0]))
                quantize_onnx(
                    Path(scratch) / "onnx", folder, calibration_texts=calibration_texts, tokenizer=tokenizer,
                    **_options(exports[1]),
                )
        return
    from hf_optim.export.tflite import export_tflite

    folder.mkdir(parents=True, exist_ok=True)
    # the graph's fixed length must hold the perplexity windows (and the prompts of the speed test)
    context = getattr(model.config, "max_position_embeddings", None) or recipe.max_length
    options = {"sequence_length": min(recipe.max_length, int(context)), **_options(exports[0])}
    export_tflite(model, folder / TFLITE_FILE, **options)
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)


def load_variant(folder: str | Path, kind: str, threads: int | None = None) -> Any:
    """What the folder ships, ready to measure: a PyTorch model, an :class:`OnnxCausalLM` or a ``TFLiteCausalLM``."""
    folder = Path(folder)
    if kind == "torch":
        from hf_optim.compression.storage import load_optimized

        return load_optimized(folder)
    if kind == "onnx":
        from hf_optim.export.runtime import OnnxCausalLM

        # the CPU, like the PyTorch variants, so that latencies compare
        return OnnxCausalLM.from_pretrained(folder, providers=["CPUExecutionProvider"], num_threads=threads)
    from hf_optim.export.tflite import TFLiteCausalLM

    return TFLiteCausalLM.from_pretrained(folder / TFLITE_FILE, num_threads=threads)
