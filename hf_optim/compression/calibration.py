"""Calibration data and layer-by-layer statistics for data-aware compression (Wanda, SparseGPT, GPTQ, ...).

Decoder layers are processed one at a time, each with the inputs produced by the already-compressed layers before
it (as GPTQ and SparseGPT do), so errors are compensated downstream and only one layer's activations are live.

Example:
    >>> batches = calibration_batches(tokenizer, load_calibration_texts("calib.txt"), num_samples=32, seq_len=256)  # doctest: +SKIP
    >>> compress_layerwise(model, batches, targets, compress_one, hessian=True)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from hf_optim.compression.targets import _is_linear
from hf_optim.core.errors import ConfigError
from hf_optim.core.texts import load_texts


def load_calibration_texts(source: str | Path, text_column: str = "text") -> list[str]:
    """Calibration documents from a ``.txt``/``.jsonl`` file or a dataset name (see :func:`hf_optim.core.texts.load_texts`)."""
    return load_texts(source, text_column)


def calibration_batches(
    tokenizer, texts: Sequence[str], num_samples: int = 64, seq_len: int = 256, batch_size: int = 8, seed: int = 0
) -> list[torch.Tensor]:
    """``num_samples`` random windows of ``seq_len`` tokens from the concatenated texts, in batches of input ids."""
    if not texts:
        raise ConfigError("Calibration texts are empty; pass a file with text (--calibration-data).")
    ids = [tok for text in texts for tok in tokenizer(text)["input_ids"]]
    if len(ids) <= seq_len:
        seq_len = len(ids) - 1
    if seq_len < 8:
        raise ConfigError(f"Calibration texts hold only {len(ids)} tokens; give at least a few hundred.")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(num_samples)]
    windows = torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)
    return list(windows.split(batch_size))


@dataclasses.dataclass
class InputStats:
    """What a linear layer saw during calibration: per-input-feature squared norms and, optionally, X^T X."""

    sq_norm: torch.Tensor  # [in_features], sum over tokens of x_j^2
    hessian: torch.Tensor | None  # [in, in], sum over tokens of x x^T (SparseGPT/GPTQ use 2/n of it)
    tokens: int = 0

    @property
    def feature_norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature — Wanda's activation factor."""
        return self.sq_norm.sqrt()


class _StopForward(Exception):
    pass


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no known decoder-layer structure (no GradientCheckpointingLayer blocks); "
            "data-aware compression needs a Transformers decoder model."
        )
    return layers


def _stats_hooks(modules: dict[str, nn.Module], stats: dict[str, InputStats], hessian: bool) -> list:
    def make_hook(name: str, module: nn.Module):
        def hook(_module, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = InputStats(
                    torch.zeros(x.shape[1], dtype=torch.float64),
                    torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64) if hessian else None,
                )
            entry.sq_norm += (x * x).sum(0).cpu()
            if entry.hessian is not None:
                entry.hessian += (x.t() @ x).cpu()
            entry.tokens += x.shape[0]

        return hook

    return [module.register_forward_hook(make_hook(name, module)) for name, module in modules.items()]


@torch.no_grad()
def compress_layerwise(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    targets: Sequence[tuple[str, nn.Module]],
    compress: Callable[[str, nn.Module, InputStats], None],
    hessian: bool = False,
) -> None:
    """Gather input statistics of ``targets`` layer by layer and call ``compress(name, module, stats)`` on each.

    Targets outside the decoder layers (e.g. ``lm_head`` when included) are calibrated on the final hidden
    states after every decoder layer has been compressed.
    """
    layers = _decoder_layers(model)
    target_map = dict(targets)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    captured: list[tuple[tuple, dict]] = []

    def capture(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()

    def layer_targets(layer: nn.Module) -> dict[str, nn.Module]:
        inside = {id(m) for m in layer.modules() if _is_linear(m)}
        return {name: m for name, m in target_map.items() if id(m) in inside}

    for layer in layers:
        modules = layer_targets(layer)
        if modules:
            stats: dict[str, InputStats] = {}
            hooks = _stats_hooks(modules, stats, hessian)
            try:
                for args, kwargs in captured:
                    layer(*args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            for name, module in modules.items():
                compress(name, module, stats[name])
        # feed the compressed layer's outputs to the next one
        next_inputs = []
        for args, kwargs in captured:
            out = layer(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            next_inputs.append(((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
        captured = next_inputs

    in_layers = {id(m) for layer in layers for m in layer.modules()}
    remaining = {name: m for name, m in target_map.items() if id(m) not in in_layers}
    if remaining:
        stats = {}
        hooks = _stats_hooks(remaining, stats, hessian)
        try:
            for batch in batches:
                model(input_ids=batch.to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for name, module in remaining.items():
            compress(name, module, stats[name])
    model.train(was_training)
