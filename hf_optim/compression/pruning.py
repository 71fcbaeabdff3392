"""Pruning handlers: magnitude, Wanda, SparseGPT (unstructured or N:M) and structured head/MLP-channel removal.

Each handler validates everything (targets, N:M divisibility of every layer, calibration, model structure) before it
touches a weight, applies its algorithm from :mod:`hf_optim.compression.algorithms`, and returns what it achieved;
the verb records that with the step. Pruned weights are exactly zero. Structured pruning really removes rows and
columns and updates the config, so ``save_pretrained``/``from_pretrained`` give a smaller model.

Example:
    >>> import hf_optim
    >>> hf_optim.prune(model, hf_optim.MagnitudeConfig(sparsity=0.5, scope="global"))  # doctest: +SKIP
    >>> sparsity_report(model)["sparsity"]  # doctest: +SKIP
    0.5
    >>> hf_optim.prune(model, hf_optim.StructuredPruneConfig(mlp_fraction=0.25, heads_fraction=0.25))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_optim.compression.algorithms.magnitude import global_magnitude_masks, magnitude_mask
from hf_optim.compression.algorithms.nm import check_nm_divisible
from hf_optim.compression.algorithms.sparsegpt import sparsegpt_prune
from hf_optim.compression.algorithms.structured import expand_units, head_group_scores, keep_indices, mlp_channel_scores
from hf_optim.compression.algorithms.wanda import wanda_mask
from hf_optim.compression.api import register_handler
from hf_optim.compression.calibration import InputStats, compress_layerwise
from hf_optim.compression.configs import (
    DEFAULT_EXCLUDE,
    MagnitudeConfig,
    SparseGPTConfig,
    StructuredPruneConfig,
    WandaConfig,
    _PruneConfig,
)
from hf_optim.compression.targets import linear_weight, target_linears
from hf_optim.core.errors import ConfigError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- shared
def sparsity_report(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> dict[str, Any]:
    """Share of exactly-zero weights over the selected linear layers, overall and per layer.

    Example:
        >>> sparsity_report(model)["layers"]["model.layers.0.mlp.up_proj"]  # doctest: +SKIP
        0.5
    """
    layers, zeros, total = {}, 0, 0
    for name, module in target_linears(model, include, exclude):
        weight = linear_weight(module)
        layer_zeros = int((weight == 0).sum())
        layers[name] = layer_zeros / weight.numel()
        zeros, total = zeros + layer_zeros, total + weight.numel()
    return {"sparsity": zeros / total, "zeros": zeros, "weights": total, "layers": layers}


def _prune_targets(model: nn.Module, config: _PruneConfig) -> list[tuple[str, nn.Module]]:
    targets = target_linears(model, config.include, config.exclude)
    if config.nm:
        for name, module in targets:
            check_nm_divisible(linear_weight(module).shape[1], *config.nm, name)
    return targets


def _require_calibration(config: Any, batches: list[torch.Tensor] | None) -> None:
    if not batches:
        raise ConfigError(
            f"{type(config).__name__} needs calibration data: pass tokenizer=... and calibration_texts=[...]."
        )


@torch.no_grad()
def _apply_mask(module: nn.Module, keep: torch.Tensor) -> None:
    linear_weight(module).masked_fill_(~keep.to(module.weight.device), 0.0)


def _achieved(targets: Sequence[tuple[str, nn.Module]]) -> dict[str, Any]:
    zeros = sum(int((linear_weight(m) == 0).sum()) for _, m in targets)
    total = sum(linear_weight(m).numel() for _, m in targets)
    logger.info("pruned %d layers to %.4f sparsity", len(targets), zeros / total)
    return {"achieved_sparsity": round(zeros / total, 6), "pruned_layers": len(targets)}


# ---------------------------------------------------------------- unstructured / N:M
@register_handler(MagnitudeConfig)
def prune_magnitude(model: nn.Module, config: MagnitudeConfig, batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """Zero the smallest-|w| weights of each layer, of all layers at once (``scope="global"``), or per N:M group."""
    targets = _prune_targets(model, config)
    weights = [linear_weight(module) for _, module in targets]
    if config.scope == "global":
        masks = global_magnitude_masks(weights, config.sparsity)
    else:
        masks = [magnitude_mask(weight, config.sparsity, config.nm) for weight in weights]
    for (_, module), keep in zip(targets, masks):
        _apply_mask(module, keep)
    return _achieved(targets)


@register_handler(WandaConfig)
def prune_wanda(model: nn.Module, config: WandaConfig, batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """Wanda, layer by layer on the calibration activations of the already-pruned layers before it."""
    targets = _prune_targets(model, config)
    _require_calibration(config, batches)

    def compress(name: str, module: nn.Module, stats: InputStats) -> None:
        _apply_mask(module, wanda_mask(linear_weight(module), stats.feature_norm, config.sparsity, config.nm))

    compress_layerwise(model, batches, targets, compress)
    return _achieved(targets)


@register_handler(SparseGPTConfig)
def prune_sparsegpt(model: nn.Module, config: SparseGPTConfig, batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """SparseGPT, layer by layer, with each layer's Hessian ``Σ x xᵀ`` from the calibration inputs."""
    targets = _prune_targets(model, config)
    if config.nm and config.block_size % config.nm[1]:
        raise ConfigError(
            f"block_size={config.block_size} must be a multiple of M={config.nm[1]} for pattern {config.pattern!r}."
        )
    _require_calibration(config, batches)

    @torch.no_grad()
    def compress(name: str, module: nn.Module, stats: InputStats) -> None:
        weight = linear_weight(module)
        new_weight, _ = sparsegpt_prune(
            weight, stats.hessian, config.sparsity, config.nm, config.block_size, config.dampening
        )
        weight.copy_(new_weight)

    compress_layerwise(model, batches, targets, compress, hessian=True)
    return _achieved(targets)


# ---------------------------------------------------------------- structured
_STRUCTURED_TYPES = ("llama", "mistral", "qwen2", "gpt2")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = {"gpt2": ("c_fc", "c_proj")}
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")


def _blocks(model: nn.Module, parts: Sequence[str]) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if all(hasattr(m, p) for p in parts)]


def _selected(model: nn.Module, config: StructuredPruneConfig, blocks, parts: Sequence[str], what: str) -> bool:
    """Whether include/exclude select these blocks: all of them wholly, or none (the config must stay uniform)."""
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no block with {'/'.join(parts)}; cannot prune its {what}.")
    chosen = {id(m) for _, m in target_linears(model, config.include, config.exclude)}
    counts = [sum(id(getattr(block, p)) in chosen for p in parts) for _, block in blocks]
    if all(c == len(parts) for c in counts):
        return True
    if not any(counts):
        return False
    raise ConfigError(
        f"Structured pruning of {what} needs every layer's {'/'.join(parts)} selected, or none (the config must stay "
        f"uniform); include={config.include} exclude={config.exclude} select only some of them."
    )


def _removal_count(fraction: float, units: int, what: str, field: str) -> int:
    count = int(round(fraction * units))
    if fraction and count == 0:
        raise ConfigError(f"{field}={fraction} removes no {what} of {units}; use at least {1 / units:.4f}.")
    if count >= units:
        raise ConfigError(f"{field}={fraction} would remove every {what} ({count} of {units}); use a smaller fraction.")
    return count


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


@torch.no_grad()
def _keep_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the output features ``index`` (rows of the ``[out, in]`` view) and their biases."""
    index = index.to(module.weight.device)
    if _is_conv1d(module):
        module.weight = nn.Parameter(module.weight[:, index].contiguous())
        module.nf = index.numel()
    else:
        module.weight = nn.Parameter(module.weight[index].contiguous())
        module.out_features = index.numel()
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias[index].contiguous())


@torch.no_grad()
def _keep_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the input features ``index`` (columns of the ``[out, in]`` view); the bias is per output."""
    index = index.to(module.weight.device)
    if _is_conv1d(module):
        module.weight = nn.Parameter(module.weight[index].contiguous())
        module.nx = index.numel()
    else:
        module.weight = nn.Parameter(module.weight[:, index].contiguous())
        module.in_features = index.numel()


def _input_norms(
    model: nn.Module, consumers: dict[str, nn.Module], batches: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Σ x² per input feature of each consumer layer over the calibration tokens (nothing is changed)."""
    sq_norms: dict[str, torch.Tensor] = {}

    def record(name: str, module: nn.Module, stats: InputStats) -> None:
        sq_norms[name] = stats.sq_norm

    compress_layerwise(model, batches, list(consumers.items()), record)
    return sq_norms


def _remove_mlp_channels(mlp_blocks, parts: Sequence[str], remove: int, norms: dict[int, torch.Tensor]) -> None:
    for _, block in mlp_blocks:
        producers = [getattr(block, p) for p in parts[:-1]]
        consumer = getattr(block, parts[-1])
        scores = mlp_channel_scores(
            [linear_weight(p) for p in producers], linear_weight(consumer), norms.get(id(consumer))
        )
        keep = keep_indices(scores, remove)
        for producer in producers:
            _keep_outputs(producer, keep)
        _keep_inputs(consumer, keep)


def _remove_kv_groups(
    attn_blocks, num_kv: int, per_group: int, head_dim: int, remove: int, norms: dict[int, torch.Tensor]
) -> None:
    for _, block in attn_blocks:
        o_weight = linear_weight(block.o_proj)
        scores = head_group_scores(linear_weight(block.v_proj), o_weight, num_kv, head_dim, norms.get(id(block.o_proj)))
        groups = keep_indices(scores, remove)
        kv_rows = expand_units(groups, head_dim)
        q_rows = expand_units(expand_units(groups, per_group), head_dim)  # query heads g*r … g*r+r-1 share KV head g
        _keep_outputs(block.q_proj, q_rows)
        _keep_outputs(block.k_proj, kv_rows)
        _keep_outputs(block.v_proj, kv_rows)
        _keep_inputs(block.o_proj, q_rows)


@register_handler(StructuredPruneConfig)
def prune_structured(
    model: nn.Module, config: StructuredPruneConfig, batches: list[torch.Tensor] | None
) -> dict[str, Any]:
    """Remove the least important KV groups (with their query heads) and MLP channels, the same count per layer."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _STRUCTURED_TYPES:
        raise ConfigError(
            f"Structured pruning knows the layer structure of {list(_STRUCTURED_TYPES)}, not model_type={model_type!r}."
        )
    if not config.mlp_fraction and not config.heads_fraction:
        raise ConfigError("StructuredPruneConfig removes nothing: set mlp_fraction and/or heads_fraction above 0.")
    if config.heads_fraction and model_type == "gpt2":
        raise ConfigError(
            "Removing attention heads is not supported for gpt2 (its config derives head_dim from n_embd / n_head); "
            "set heads_fraction=0 and prune MLP channels only."
        )
    mlp_parts = _MLP.get(model_type, _GATED_MLP)
    mlp_blocks = _blocks(model, mlp_parts)
    attn_blocks = _blocks(model, _ATTENTION)
    prune_mlp = bool(config.mlp_fraction) and _selected(model, config, mlp_blocks, mlp_parts, "MLP channels")
    prune_heads = bool(config.heads_fraction) and _selected(model, config, attn_blocks, _ATTENTION, "attention heads")
    if bool(config.mlp_fraction) != prune_mlp or bool(config.heads_fraction) != prune_heads:
        missing = "MLP" if bool(config.mlp_fraction) != prune_mlp else "attention"
        raise ConfigError(
            f"include={config.include} exclude={config.exclude} select no {missing} "
            f"block of {type(model).__name__}, but mlp_fraction={config.mlp_fraction} "
            f"heads_fraction={config.heads_fraction} ask to prune one; widen include or set that fraction to 0."
        )
    inter = mlp_remove = num_heads = num_kv = head_dim = kv_remove = 0
    if prune_mlp:
        inter = linear_weight(getattr(mlp_blocks[0][1], mlp_parts[-1])).shape[1]
        mlp_remove = _removal_count(config.mlp_fraction, inter, "MLP channel", "mlp_fraction")
    if prune_heads:
        num_heads = cfg.num_attention_heads
        num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
        head_dim = attn_blocks[0][1].q_proj.out_features // num_heads
        kv_remove = _removal_count(config.heads_fraction, num_kv, "KV-head group", "heads_fraction")
    norms: dict[int, torch.Tensor] = {}  # id(consumer layer) -> Σx² of its inputs
    if config.importance == "activation":
        _require_calibration(config, batches)
        names = {id(m): name for name, m in model.named_modules()}
        consumers = [getattr(b, mlp_parts[-1]) for _, b in mlp_blocks] if prune_mlp else []
        consumers += [b.o_proj for _, b in attn_blocks] if prune_heads else []
        by_name = _input_norms(model, {names[id(m)]: m for m in consumers}, batches)
        norms = {id(m): by_name[names[id(m)]] for m in consumers}
    params_before = sum(p.numel() for p in model.parameters())

    if prune_mlp:
        _remove_mlp_channels(mlp_blocks, mlp_parts, mlp_remove, norms)
        if model_type == "gpt2":
            cfg.n_inner = inter - mlp_remove
        else:
            cfg.intermediate_size = inter - mlp_remove
    if prune_heads:
        per_group = num_heads // num_kv
        _remove_kv_groups(attn_blocks, num_kv, per_group, head_dim, kv_remove, norms)
        cfg.head_dim = head_dim  # explicit: hidden_size / num_attention_heads no longer gives it
        cfg.num_attention_heads = num_heads - kv_remove * per_group
        cfg.num_key_value_heads = num_kv - kv_remove

    params_after = sum(p.numel() for p in model.parameters())
    logger.info("structured pruning: %d -> %d parameters", params_before, params_after)
    return {
        "parameters_before": params_before,
        "parameters_after": params_after,
        "mlp_channels_removed_per_layer": mlp_remove,
        "kv_groups_removed_per_layer": kv_remove,
    }
