"""The compression verbs: ``prune``, ``quantize``, ``cluster`` — each takes a config object and edits the model in place.

A small registry maps config type to the handler that applies it (torchao's ``quantize_`` style); handlers live in
``pruning.py``, ``quantization.py`` and ``clustering.py`` and are imported on first use. What was done is recorded on
the model so that :func:`hf_optim.save_optimized` can write it beside the weights.

Example:
    >>> import hf_optim
    >>> model = hf_optim.prune(model, hf_optim.WandaConfig(sparsity=0.5, pattern="2:4"),
    ...                        tokenizer=tokenizer, calibration_texts=texts)  # doctest: +SKIP
    >>> model = hf_optim.quantize(model, hf_optim.Int4WeightOnlyConfig(group_size=32))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hf_optim.compression.calibration import calibration_batches
from hf_optim.compression.configs import CompressionConfig
from hf_optim.core.errors import ConfigError

# a handler may return a mapping of what it measured (e.g. achieved sparsity); it is recorded with the step
Handler = Callable[[nn.Module, Any, "list[torch.Tensor] | None"], "dict[str, Any] | None"]
_HANDLERS: dict[type, Handler] = {}
_HANDLER_MODULES = {
    "prune": "hf_optim.compression.pruning",
    "quantize": "hf_optim.compression.quantization",
    "cluster": "hf_optim.compression.clustering",
}
HISTORY_ATTR = "_hf_optim_compression"  # list of applied steps, kept on the model object


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(model, config, calibration_batches)`` applies ``config_type`` to a model."""

    def wrap(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return wrap


def _handler_for(config: CompressionConfig) -> Handler:
    if type(config) not in _HANDLERS:
        importlib.import_module(_HANDLER_MODULES[config.kind])
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise ConfigError(f"No handler is registered for {type(config).__name__}.")
    return handler


def compression_history(model: nn.Module) -> list[dict[str, Any]]:
    """The steps applied to ``model`` so far, oldest first (each a recipe-style mapping plus timing)."""
    return list(getattr(model, HISTORY_ATTR, []))


def _apply(
    verb: str,
    model: nn.Module,
    config: CompressionConfig,
    tokenizer=None,
    calibration_texts: Sequence[str] | None = None,
    num_calibration_samples: int = 64,
    calibration_seq_len: int = 256,
) -> nn.Module:
    if not isinstance(config, CompressionConfig):
        raise ConfigError(f"hf_optim.{verb} takes a config object (e.g. WandaConfig(...)), got {type(config).__name__}.")
    if config.kind != verb:
        raise ConfigError(f"{type(config).__name__} is a {config.kind} config; call hf_optim.{config.kind}(model, config).")
    batches = None
    if config.needs_calibration:
        if tokenizer is None or calibration_texts is None:
            raise ConfigError(
                f"{type(config).__name__} needs calibration data: pass tokenizer=... and calibration_texts=[...] "
                "(or --calibration-data on the command line)."
            )
        seq_len = min(calibration_seq_len, getattr(model.config, "max_position_embeddings", calibration_seq_len))
        batches = calibration_batches(tokenizer, calibration_texts, num_calibration_samples, seq_len)
    handler = _handler_for(config)
    start = time.perf_counter()
    measured = handler(model, config, batches)
    step = {"kind": config.kind, **config.to_dict(), **(measured or {}), "seconds": round(time.perf_counter() - start, 3)}
    if batches is not None:
        step["calibration"] = {"samples": sum(len(b) for b in batches), "seq_len": int(batches[0].shape[1])}
    setattr(model, HISTORY_ATTR, [*compression_history(model), step])
    return model


def prune(model: nn.Module, config: CompressionConfig, tokenizer=None, calibration_texts: Sequence[str] | None = None,
          **calibration: int) -> nn.Module:
    """Prune ``model`` in place with a Magnitude/Wanda/SparseGPT/StructuredPrune config; return it.

    Example:
        >>> hf_optim.prune(model, MagnitudeConfig(sparsity=0.5))  # doctest: +SKIP
    """
    return _apply("prune", model, config, tokenizer, calibration_texts, **calibration)


def quantize(model: nn.Module, config: CompressionConfig, tokenizer=None, calibration_texts: Sequence[str] | None = None,
             **calibration: int) -> nn.Module:
    """Quantize the weights of ``model`` in place (Int8/Int4 weight-only, bitsandbytes, torchao); return it.

    Example:
        >>> hf_optim.quantize(model, Int4WeightOnlyConfig(group_size=32, method="gptq"), tokenizer, texts)  # doctest: +SKIP
    """
    return _apply("quantize", model, config, tokenizer, calibration_texts, **calibration)


def cluster(model: nn.Module, config: CompressionConfig, tokenizer=None, calibration_texts: Sequence[str] | None = None,
            **calibration: int) -> nn.Module:
    """Replace each selected weight by one of ``n_clusters`` shared values (k-means); return the model.

    Example:
        >>> hf_optim.cluster(model, ClusterConfig(n_clusters=16))  # doctest: +SKIP
    """
    return _apply("cluster", model, config, tokenizer, calibration_texts, **calibration)
