"""Structured pruning scores: which MLP channels and which attention KV groups matter least.

An MLP channel ``c`` is the ``c``-th row of each producer (gate/up, or GPT-2's ``c_fc``) and the ``c``-th column of the
consumer (down, ``c_proj``). An attention KV group is one key/value head with the query heads that share it (GQA);
removing it whole keeps ``num_attention_heads / num_key_value_heads`` unchanged, so the model stays valid.

Two importance measures:
- ``"magnitude"``: the product of the unit's weight norms in every matrix it spans (its output is roughly
  bilinear in them), e.g. ``‖W_gate[c]‖·‖W_up[c]‖·‖W_down[:, c]‖``.
- ``"activation"``: the energy it adds to the output over calibration tokens, ``Σ_j ‖W_out[:, j]‖² · Σ_t x_tj²``
  over the consumer's input features ``j`` of the unit (Wanda's |W|·‖X‖ summed over the unit).

Example:
    >>> gate, up, down = torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8)
    >>> keep = keep_indices(mlp_channel_scores([gate, up], down), remove=2)
    >>> keep.numel()
    6
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mlp_channel_scores(
    producers: Sequence[torch.Tensor], consumer: torch.Tensor, consumer_sq_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """Importance of each intermediate channel; producers are ``[inter, hidden]``, consumer ``[hidden, inter]``."""
    consumer = consumer.detach().float()
    if consumer_sq_norm is not None:
        return consumer.pow(2).sum(0) * consumer_sq_norm.to(consumer.device, torch.float32)
    score = consumer.norm(dim=0)
    for producer in producers:
        score = score * producer.detach().float().norm(dim=1).to(score.device)
    return score


def head_group_scores(
    v_proj: torch.Tensor,
    o_proj: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
    o_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of each KV group; ``v_proj`` is ``[kv_heads*head_dim, hidden]``, ``o_proj`` ``[hidden, heads*head_dim]``.

    Query heads ``g*r … g*r+r-1`` use KV head ``g`` (``r`` = heads per group), as in Transformers' ``repeat_kv``,
    so the columns of ``o_proj`` of group ``g`` are one contiguous run.
    """
    o_proj = o_proj.detach().float()
    if o_sq_norm is not None:
        per_column = o_proj.pow(2).sum(0) * o_sq_norm.to(o_proj.device, torch.float32)
        return per_column.reshape(num_kv_heads, -1).sum(1)
    v_norm = v_proj.detach().float().reshape(num_kv_heads, head_dim, -1).pow(2).sum((1, 2)).sqrt()
    o_norm = o_proj.reshape(o_proj.shape[0], num_kv_heads, -1).pow(2).sum((0, 2)).sqrt()
    return v_norm.to(o_norm.device) * o_norm


def keep_indices(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices of all but the ``remove`` lowest scores, in ascending order (the original order of the units)."""
    if not 0 <= remove < scores.numel():
        raise ValueError(f"remove={remove} must be in [0, {scores.numel()}).")
    return scores.topk(scores.numel() - remove).indices.sort().values


def expand_units(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row/column indices covered by ``units`` of ``width`` consecutive entries each (e.g. heads of head_dim)."""
    return (units.unsqueeze(1) * width + torch.arange(width, device=units.device)).reshape(-1)
