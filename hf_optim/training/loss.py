"""Exact token-weighted causal-LM loss under gradient accumulation and data parallelism.

The loss of one optimizer step is the mean over *all* non-padding target tokens of all its micro-batches on all
ranks. Averaging per-micro-batch means instead over-weights short (heavily padded) micro-batches; this module
computes the exact mean by counting the step's tokens first and scaling each micro-batch's summed loss.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 5)
    >>> labels = torch.tensor([[1, 2, IGNORE_INDEX]])
    >>> round(summed_cross_entropy(logits, labels).item(), 4)  # one target token: ln(5)
    1.6094
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def labels_from_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for causal LM training: the input ids, with padding positions set to ``IGNORE_INDEX``."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = IGNORE_INDEX
    return labels


def count_target_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (labels are shifted by one inside the loss)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over non-ignored targets, computed in fp32."""
    shift_logits = logits[..., :-1, :].float().reshape(-1, logits.size(-1))
    shift_labels = labels[..., 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def backward_scale(global_target_tokens: int, gradient_accumulation_steps: int, world_size: int) -> float:
    """Factor turning a micro-batch's *summed* loss into the loss to pass to ``accelerator.backward``.

    Accelerate (and DeepSpeed's engine) divide the backward loss by ``gradient_accumulation_steps`` and every
    data-parallel backend averages gradients over ``world_size`` ranks; multiplying both back and dividing by the
    step's global token count leaves exactly ∇(Σ token losses / global tokens) in ``.grad``.
    """
    if global_target_tokens <= 0:
        raise ValueError("The optimizer step holds no target tokens (every label is padding).")
    return gradient_accumulation_steps * world_size / global_target_tokens
