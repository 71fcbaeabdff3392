"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Quantize a linear layer's weight one input column at a time so that the layer's output on calibration inputs ``X``
changes as little as possible: ``min ‖WX − ŴX‖²``, whose Hessian is ``H = 2 X Xᵀ`` (any positive scale works).
With the upper Cholesky factor ``U`` of the dampened ``H⁻¹`` (``H + λ·mean(diag H)·I``), column ``c`` is rounded
and its error ``(w − q) / U_cc`` is spread over the columns not yet quantized (``W[:, c:] -= err · U[c, c:]``) —
Algorithm 1 of the paper. Columns go in blocks of ``block_size``: inside a block the updates are applied column by
column, the block's accumulated errors reach the later columns in one matrix product (lazy batch updates).

Groups: the scale/zero of a group of ``group_size`` inputs is computed from the *updated* weights when the first
column of the group is reached (so they fit the error-compensated values), or, with ``static_groups=True``, from
the original weights before anything is quantized. ``act_order=True`` processes columns by decreasing ``diag(H)``
(the inputs with the most energy first); it uses static groups so that each group still holds consecutive inputs
and the result has the same layout as round-to-nearest.

Example:
    >>> x = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs
    >>> w = torch.randn(16, 32)
    >>> q = gptq_quantize(w, x.t() @ x, bits=4, group_size=16)
    >>> err_gptq = ((w - rtn.dequantize(q)) @ x.t()).norm()
    >>> err_rtn = ((w - rtn.dequantize(rtn.quantize(w, 4, 16, symmetric=False))) @ x.t()).norm()
    >>> bool(err_gptq < err_rtn)
    True
"""

from __future__ import annotations

import torch

from hf_optim.compression.algorithms import rtn


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H⁻¹`` in float64; raises ValueError if it is not positive definite."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do not matter, keep H invertible
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"the dampened Hessian is not positive definite (dampening={dampening}); raise dampening (e.g. 0.1) "
            "or use more calibration text"
        ) from exc


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> rtn.QuantizedWeight:
    """GPTQ codes of a ``[out, in]`` weight given ``hessian = Σ x xᵀ`` (``[in, in]``) of the layer's inputs.

    Returns the same :class:`~hf_optim.compression.algorithms.rtn.QuantizedWeight` layout as round-to-nearest
    (``rtn.dequantize`` gives the new weight). ``group_size=None``: one group per output channel.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; expected ({cols}, {cols}).")
    group_size = rtn._check_groups(cols, group_size)
    static_groups = static_groups or act_order
    n_groups = cols // group_size
    w = weight.detach().float().clone()
    hessian = hessian.to(w.device)
    w[:, hessian.diagonal() == 0] = 0.0

    scale = torch.empty(rows, n_groups, dtype=torch.float16, device=w.device)
    zero = None if symmetric else torch.empty(rows, n_groups, dtype=torch.int64, device=w.device)
    if static_groups:
        for g in range(n_groups):
            s, z = rtn.group_params(w[:, g * group_size : (g + 1) * group_size], bits, symmetric)
            scale[:, g] = s
            if zero is not None:
                zero[:, g] = z

    perm = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(cols, device=w.device)
    order = perm.tolist()
    w = w[:, perm]
    u = inverse_hessian_factor(hessian[perm][:, perm], dampening).float()
    if not static_groups:
        # a group's parameters come from its columns' current values when its first column is reached; that needs
        # every group inside one block, or (groups wider than a block) every group starting on a block boundary
        if group_size <= block_size:
            block_size = block_size // group_size * group_size
        else:
            block_size = max(d for d in range(1, block_size + 1) if group_size % d == 0)
    codes = torch.zeros(rows, cols, dtype=torch.int64, device=w.device)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = order[start + i]
            g = column // group_size
            if not static_groups and column % group_size == 0:
                current = torch.cat([block[:, i : i + group_size], w[:, end : start + i + group_size]], 1)
                s, z = rtn.group_params(current, bits, symmetric)
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
            s, z = scale[:, g], None if zero is None else zero[:, g]
            q = rtn.quantize_values(block[:, i : i + 1], s, z, bits)
            codes[:, start + i] = q[:, 0]
            err = (block[:, i] - rtn.dequantize_values(q, s, z)[:, 0]) / u_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]

    codes[:, perm] = codes.clone()
    return rtn.QuantizedWeight(codes, scale, zero, bits, group_size)
