"""Round-to-nearest (RTN) integer quantization of a weight matrix, per output channel or per group of inputs.

A ``[out, in]`` weight is cut into groups of ``group_size`` consecutive inputs per row (``group_size=None``: the
whole row). Each group gets a scale (and, when asymmetric, an integer zero point) and every weight becomes
``q = clamp(round(w / scale) + zero, qmin, qmax)``; it stands for ``(q - zero) * scale``.

- symmetric: ``q`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the range is balanced, so -128 is never used at 8 bits),
  ``scale = max|w| / qmax``, no zero point;
- asymmetric: ``q`` in ``[0, 2^b - 1]``, the range ``[min(w, 0), max(w, 0)]`` is mapped onto it (0 stays exactly
  representable, as in GPTQ), ``zero = round(-min / scale)``.

Scales are stored as fp16 and rounded *up* to the next fp16 value, so the stored scale still covers the group's
range: every weight is then within ``scale / 2`` of its dequantized value. The same functions serve GPTQ
(:mod:`hf_optim.compression.algorithms.gptq`), which computes the group parameters as it reaches each group.

Example:
    >>> w = torch.tensor([[0.0, 1.875, -0.5, 1.375]])
    >>> q = quantize(w, bits=4, group_size=2, symmetric=False)
    >>> q.values.tolist(), q.scale.tolist(), q.zero.tolist()
    ([[0, 15, 0, 15]], [[0.125, 0.125]], [[0, 4]])
    >>> dequantize(q).tolist()
    [[0.0, 1.875, -0.5, 1.375]]
"""

from __future__ import annotations

import dataclasses

import torch

_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: the floor of a scale


@dataclasses.dataclass
class QuantizedWeight:
    """Integer codes of a ``[out, in]`` weight plus per-group fp16 scales (and integer zero points)."""

    values: torch.Tensor  # [out, in] int64 codes
    scale: torch.Tensor  # [out, groups] float16
    zero: torch.Tensor | None  # [out, groups] int64 (asymmetric) or None (symmetric)
    bits: int
    group_size: int  # inputs per group (== in_features for per-channel)

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer code range ``(qmin, qmax)``."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded up to a representable fp16 value (at least the smallest normal one)."""
    half = x.clamp(min=_FP16_TINY).to(torch.float16)
    low = half.float() < x
    return torch.where(low, torch.nextafter(half, torch.full_like(half, float("inf"))), half)


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp16) and zero point (int64, or None) of each row of ``w`` (``[rows, group]``), as ``[rows]``."""
    w = w.float()
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        return _fp16_ceil(w.abs().amax(1) / qmax), None
    low = w.amin(1).clamp(max=0.0)
    high = w.amax(1).clamp(min=0.0)
    scale = _fp16_ceil((high - low) / (qmax - qmin))
    zero = torch.round(-low / scale.float()).clamp(qmin, qmax).to(torch.int64)
    return scale, zero


def quantize_values(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Codes of ``w`` (``[rows, k]``) with per-row ``scale``/``zero`` (``[rows]``) — broadcast over columns."""
    qmin, qmax = qrange(bits, zero is None)
    q = torch.round(w.float() / scale.float().unsqueeze(1))
    if zero is not None:
        q = q + zero.unsqueeze(1)
    return q.clamp(qmin, qmax).to(torch.int64)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``(q - zero) * scale`` in float32, per row (``scale``/``zero`` are ``[rows]``)."""
    shifted = q if zero is None else q - zero.unsqueeze(1)
    return shifted.float() * scale.float().unsqueeze(1)


def _check_groups(in_features: int, group_size: int | None) -> int:
    group_size = group_size or in_features
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}.")
    return group_size


def quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest codes of a ``[out, in]`` weight; ``group_size=None`` is one group per output channel."""
    rows, cols = w.shape
    group_size = _check_groups(cols, group_size)
    groups = w.detach().float().reshape(rows * cols // group_size, group_size)
    scale, zero = group_params(groups, bits, symmetric)
    values = quantize_values(groups, scale, zero, bits).reshape(rows, cols)
    shape = (rows, cols // group_size)
    zero = None if zero is None else zero.reshape(shape)
    return QuantizedWeight(values, scale.reshape(shape), zero, bits, group_size)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """The float32 ``[out, in]`` weight the codes stand for."""
    rows, cols = q.values.shape
    groups = q.values.reshape(-1, q.group_size)
    zero = None if q.zero is None else q.zero.reshape(-1)
    return dequantize_values(groups, q.scale.reshape(-1), zero).reshape(rows, cols)
