"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

Algorithm 1 of the paper: with ``H = Σ x xᵀ`` over the calibration inputs of a layer (dampened by ``λ·mean(diag H)``
on the diagonal), take the upper Cholesky factor ``U`` of ``H⁻¹``. Columns are processed left to right in blocks of
``block_size``: at the start of each block the mask of the block is chosen from the OBS saliency ``w² / U_cc²``
(for N:M, every M columns within the block, per row); then each column is pruned and its error ``(w − q) / U_cc``
is spread over the not-yet-processed columns of the same rows (``W[:, c:] -= err · U[c, c:]``), so the remaining
weights compensate for what was removed. Blocks are updated lazily: the block's accumulated errors reach the later
columns in one matrix product.

Example:
    >>> x = torch.randn(256, 16)
    >>> w = torch.randn(8, 16)
    >>> new_w, keep = sparsegpt_prune(w, x.t() @ x, sparsity=0.5)
    >>> int((new_w == 0).sum()), int(keep.sum())
    (64, 64)
"""

from __future__ import annotations

import torch

from hf_optim.compression.algorithms.magnitude import prune_count
from hf_optim.core.errors import ConfigError


def _inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H⁻¹`` (its rows are the OBS update directions)."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: any weight there is free to go
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    try:
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(h_inv, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ConfigError(
            f"SparseGPT: the dampened Hessian is not positive definite (dampening={dampening}); raise dampening "
            "(e.g. 0.1) or pass more calibration text."
        ) from exc


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a ``[out, in]`` weight with OBS error compensation; return ``(new_weight, keep_mask)``.

    ``hessian`` is ``Σ x xᵀ`` (``[in, in]``; any positive scale). Unstructured: exactly
    ``round(sparsity * numel)`` weights go, spread over the blocks in proportion to their width. ``nm=(n, m)``:
    ``n`` of every ``m`` consecutive inputs of each row are kept (``sparsity`` is then ignored).
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; expected ({cols}, {cols}).")
    if nm and block_size % nm[1]:
        raise ConfigError(
            f"SparseGPT block_size={block_size} must be a multiple of M={nm[1]} for pattern {nm[0]}:{nm[1]}."
        )
    w = weight.detach().float().clone()
    u = _inverse_hessian_factor(hessian.to(w.device), dampening).float()
    keep = torch.ones_like(w, dtype=torch.bool)
    pruned_so_far = 0
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        diag = u_block.diagonal()
        pruned = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            # cumulative target, so that the whole layer removes exactly round(sparsity * numel)
            count = prune_count(rows * end, sparsity) - pruned_so_far
            if count:
                saliency = block.pow(2) / diag.pow(2).unsqueeze(0)
                pruned.view(-1)[saliency.reshape(-1).topk(count, largest=False, sorted=False).indices] = True
            pruned_so_far += count
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if nm and i % nm[1] == 0:
                n, m = nm
                saliency = block[:, i : i + m].pow(2) / diag[i : i + m].pow(2).unsqueeze(0)
                pruned[:, i : i + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
            column = block[:, i]
            kept = column.masked_fill(pruned[:, i], 0.0)
            err = (column - kept) / diag[i]
            block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            block[:, i] = kept  # exactly zero where pruned (the line above only approximates it)
            errors[:, i] = err
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
        keep[:, start:end] = ~pruned
    return w.to(weight.dtype), keep
