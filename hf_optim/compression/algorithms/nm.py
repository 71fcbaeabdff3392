"""Semi-structured N:M sparsity: in every group of M consecutive input weights of a row, keep the N best.

The pattern is what sparse tensor cores accelerate (2:4 on Ampere and later); any score (|W|, Wanda's
|W|·‖X‖, SparseGPT's w²/[H⁻¹]²) picks which N survive.

Example:
    >>> scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 0.9]])
    >>> nm_mask(scores, 2, 4).int().tolist()
    [[1, 0, 1, 0, 1, 0, 0, 1]]
    >>> follows_nm(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
    True
"""

from __future__ import annotations

import torch

from hf_optim.core.errors import ConfigError


def check_nm_divisible(in_features: int, n: int, m: int, name: str) -> None:
    """Raise a ConfigError naming ``name`` when its ``in_features`` cannot be split into groups of ``m``."""
    if in_features % m:
        raise ConfigError(
            f"Pattern {n}:{m} needs in_features divisible by {m}, but layer {name!r} has in_features={in_features}; "
            f"exclude it (exclude=[{name!r}, ...]) or use a pattern whose M divides {in_features}."
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (True = kept) holding the ``n`` highest scores of every ``m`` consecutive entries of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"Pattern {n}:{m} needs a column count divisible by {m}, got {cols}.")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of each row holds at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(2) <= n).all())
