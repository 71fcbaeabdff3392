"""How closely a variant follows the base model: top-1 agreement and KL divergence of next-token distributions.

Both are measured teacher-forced on the same windows of evaluation text: at every position, does the variant's most
likely next token equal the base model's (the token greedy decoding would pick), and how far is its next-token
distribution from the base model's, ``KL(p_base || p_variant)`` in nats.

Example:
    >>> import torch
    >>> logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    >>> token_agreement(logits, logits)
    {'top1_agreement': 1.0, 'kl_divergence': 0.0, 'positions': 2}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float | int]:
    """Top-1 agreement and mean ``KL(reference || candidate)`` over all positions of ``[..., vocab]`` logits."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}.")
    reference = reference_logits.reshape(-1, reference_logits.shape[-1]).float()
    candidate = logits.reshape(-1, logits.shape[-1]).float()
    ref_logp = torch.log_softmax(reference, dim=-1)
    cand_logp = torch.log_softmax(candidate, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).clamp_min(0.0)  # ≥ 0 up to rounding
    return {
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
        "kl_divergence": float(kl.mean()),
        "positions": int(reference.shape[0]),
    }


def combine(parts: Sequence[dict[str, float | int]]) -> dict[str, float | int]:
    """Position-weighted mean of several :func:`token_agreement` results (one per batch of windows)."""
    total = sum(int(p["positions"]) for p in parts)
    if total == 0:
        raise ValueError("no positions to combine.")
    return {
        "top1_agreement": sum(p["top1_agreement"] * p["positions"] for p in parts) / total,
        "kl_divergence": sum(p["kl_divergence"] * p["positions"] for p in parts) / total,
        "positions": total,
    }


def agreement_windows(ids: torch.Tensor, windows: int, length: int) -> torch.Tensor:
    """Up to ``windows`` consecutive, non-overlapping windows of ``length`` tokens from a 1-D id tensor: ``[n, length]``.

    A text shorter than one window gives a single window of all its tokens.
    """
    length = min(length, int(ids.numel()))
    count = max(1, min(windows, int(ids.numel()) // length))
    return ids[: count * length].reshape(count, length)
