"""hf_optim: carry one Hugging Face LLM through training, compression, export, monitoring and publishing.

Public names are imported lazily so that ``import hf_optim`` (and the ``hf-optim`` command line) stays fast.

Example:
    >>> import hf_optim
    >>> report = hf_optim.estimate_memory("path/to/model", strategy="zero3", num_gpus=8)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS = {
    "TrainConfig": "hf_optim.training.config",
    "estimate_memory": "hf_optim.training.memory",
    "MemoryEstimate": "hf_optim.training.memory",
    "collect_environment": "hf_optim.core.env",
    "evaluate_perplexity": "hf_optim.core.evaluation",
    "load_texts": "hf_optim.core.texts",
    # compression
    "prune": "hf_optim.compression.api",
    "quantize": "hf_optim.compression.api",
    "cluster": "hf_optim.compression.api",
    "save_optimized": "hf_optim.compression.storage",
    "load_optimized": "hf_optim.compression.storage",
    "MagnitudeConfig": "hf_optim.compression.configs",
    "WandaConfig": "hf_optim.compression.configs",
    "SparseGPTConfig": "hf_optim.compression.configs",
    "StructuredPruneConfig": "hf_optim.compression.configs",
    "ClusterConfig": "hf_optim.compression.configs",
    "Int8WeightOnlyConfig": "hf_optim.compression.configs",
    "Int4WeightOnlyConfig": "hf_optim.compression.configs",
    "sparsity_report": "hf_optim.compression.pruning",
    "make_cluster_trainable": "hf_optim.compression.clustering",
    "finalize_clusters": "hf_optim.compression.clustering",
    "GradualPruner": "hf_optim.compression.schedule",
    "GradualPruningCallback": "hf_optim.compression.schedule",
    "PolynomialDecay": "hf_optim.compression.schedule",
    "ConstantSparsity": "hf_optim.compression.schedule",
    "BnbInt8Config": "hf_optim.compression.quantization",
    "BnbInt4Config": "hf_optim.compression.quantization",
    "TorchAoInt8WeightOnlyConfig": "hf_optim.compression.quantization",
    "TorchAoInt8DynamicConfig": "hf_optim.compression.quantization",
    "TorchAoInt4WeightOnlyConfig": "hf_optim.compression.quantization",
    # export
    "export_onnx": "hf_optim.export.onnx",
    "OnnxCausalLM": "hf_optim.export.runtime",
    "optimize_onnx": "hf_optim.export.ort_optimize",
    "quantize_onnx": "hf_optim.export.ort_quantize",
    "build_engine": "hf_optim.export.tensorrt",
    "export_tflite": "hf_optim.export.tflite",
    "TFLiteCausalLM": "hf_optim.export.tflite",
    "fuse_projections": "hf_optim.compression.fusion",
    "unfuse_projections": "hf_optim.compression.fusion",
    # monitoring
    "ReferenceProfile": "hf_optim.monitoring.profile",
    "TextMonitor": "hf_optim.monitoring.monitor",
    "MonitoringResult": "hf_optim.monitoring.monitor",
    "MetricResult": "hf_optim.monitoring.monitor",
    # serving
    "serve": "hf_optim.monitoring.server",
    "create_app": "hf_optim.monitoring.server",
    "ServeConfig": "hf_optim.monitoring.server",
    # hub
    "push_to_hub": "hf_optim.hub",
    "build_model_card": "hf_optim.hub",
    "update_model_card": "hf_optim.hub",
    # pipeline
    "optimize": "hf_optim.pipeline.run",
    "OptimizeRecipe": "hf_optim.pipeline.recipe",
    "OptimizeResults": "hf_optim.pipeline.report",
    "CompressionScheduleCallback": "hf_optim.pipeline.callbacks",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
