"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Each weight is scored ``S_ij = |W_ij| · ‖X_j‖₂`` — its magnitude times the norm of the input feature it multiplies,
over the calibration tokens — and weights are compared *within each output row* (the paper's per-output
comparison group), so every row loses the same share. No weight update, no Hessian.

Example:
    >>> w = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    >>> wanda_mask(w, feature_norm=torch.tensor([4.0, 1.0, 3.0, 2.0]), sparsity=0.5).tolist()
    [[True, False, True, False]]
"""

from __future__ import annotations

import torch

from hf_optim.compression.algorithms.magnitude import prune_count
from hf_optim.compression.algorithms.nm import nm_mask


def wanda_scores(weight: torch.Tensor, feature_norm: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖X_j‖`` for a ``[out, in]`` weight and ``in`` input-feature norms."""
    if feature_norm.shape != (weight.shape[1],):
        raise ValueError(f"feature_norm has shape {tuple(feature_norm.shape)}; expected ({weight.shape[1]},).")
    return weight.detach().abs().float() * feature_norm.to(weight.device, torch.float32).unsqueeze(0)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``round(sparsity * in)`` lowest scores of every row."""
    count = prune_count(scores.shape[1], sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count:
        keep.scatter_(1, scores.topk(count, dim=1, largest=False, sorted=False).indices, False)
    return keep


def wanda_mask(
    weight: torch.Tensor, feature_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep-mask of Wanda: per-row ranking of ``|W|·‖X‖``, or N:M groups when ``nm`` is given."""
    scores = wanda_scores(weight, feature_norm)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)
