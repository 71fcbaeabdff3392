"""Which modules a compression step touches: the ``nn.Linear`` layers whose names match include/exclude globs.

Example:
    >>> names = [name for name, _ in target_linears(model, include=["*mlp*"], exclude=["lm_head"])]  # doctest: +SKIP
    >>> names[:2]
    ['model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from hf_optim.core.errors import ConfigError


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # a pattern matches the full dotted name or any dotted suffix of it ("lm_head" matches "model.lm_head")
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(candidate, pattern) for pattern in patterns for candidate in suffixes)


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 uses transformers' Conv1D (a Linear with a transposed weight); it is handled as a Linear
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view: GPT-2's Conv1D stores it transposed)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def target_linears(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Linear layers of ``model`` selected by the globs, in module order; raises if nothing matches."""
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if name and _is_linear(module) and _matches(name, include) and not _matches(name, exclude)
    ]
    if not selected:
        raise ConfigError(
            f"No linear layer of {type(model).__name__} matches include={list(include)} exclude={list(exclude)}."
        )
    return selected
