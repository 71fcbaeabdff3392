"""Magnitude pruning: remove the weights with the smallest |w|, per layer or in one ranking over many layers.

Exactly ``round(sparsity * numel)`` weights go (ties broken by position), so the achieved sparsity is the requested
one up to rounding of a single weight.

Example:
    >>> w = torch.tensor([[0.1, -2.0], [0.3, 0.05]])
    >>> magnitude_mask(w, 0.5).tolist()
    [[False, True], [True, False]]
    >>> [m.tolist() for m in global_magnitude_masks([w, torch.tensor([[5.0, 0.2]])], 0.5)]
    [[[False, True], [True, False]], [[True, False]]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_optim.compression.algorithms.nm import nm_mask


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` removes."""
    return int(round(numel * sparsity))


def smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of ``scores``' shape with the ``round(sparsity * numel)`` lowest scores removed (False)."""
    count = prune_count(scores.numel(), sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        keep[scores.reshape(-1).topk(count, largest=False, sorted=False).indices] = False
    return keep.reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of one ``[out, in]`` weight: smallest |w| of the whole layer, or N:M groups when ``nm`` is given."""
    scores = weight.detach().abs().float()
    return nm_mask(scores, *nm) if nm else smallest_mask(scores, sparsity)


def global_magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks for ``weights`` from one |w| ranking across all of them (layers end up with different sparsity)."""
    # rank on the CPU so that layers spread over several devices share one ranking
    scores = torch.cat([w.detach().abs().float().reshape(-1).cpu() for w in weights])
    keep = smallest_mask(scores, sparsity)
    sizes = [w.numel() for w in weights]
    return [k.reshape(w.shape).to(w.device) for k, w in zip(keep.split(sizes), weights)]
