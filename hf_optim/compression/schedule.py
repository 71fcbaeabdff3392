"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta 2017, "To prune, or not to prune").

A schedule says which sparsity is in force at each optimizer step; :class:`GradualPruner` recomputes the magnitude
masks at the schedule's update steps and re-applies the fixed masks after every other optimizer step, so pruned
weights stay exactly zero while the rest train (and after training). Hook it in either way:

- ``Trainer``: ``Trainer(..., callbacks=[GradualPruningCallback(pruner)])``.
- a hand-written loop: call ``pruner.step(step)`` right after ``optimizer.step()``, with ``step`` the number of
  optimizer steps done so far (and ``pruner.step(0)`` before the first one, for a schedule that begins at 0).

Masks index the full weights, so this runs in one process or under DDP, not with sharded parameters (ZeRO-3, FSDP).

Example:
    >>> schedule = PolynomialDecay(initial_sparsity=0.0, final_sparsity=0.5, begin_step=0, end_step=1000, frequency=100)
    >>> round(schedule.sparsity_at(500), 4), schedule.sparsity_at(2000)
    (0.4375, 0.5)
    >>> pruner = GradualPruner(model, MagnitudeConfig(sparsity=0.5), schedule)  # doctest: +SKIP
    >>> for step in range(1, 1001):  # doctest: +SKIP
    ...     loss = model(**next(batches)).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    ...     pruner.step(step)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import TrainerCallback

from hf_optim.compression.algorithms.magnitude import global_magnitude_masks, magnitude_mask
from hf_optim.compression.algorithms.nm import nm_mask
from hf_optim.compression.configs import MagnitudeConfig
from hf_optim.compression.pruning import _prune_targets
from hf_optim.compression.targets import linear_weight
from hf_optim.core.errors import ConfigError


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}={value} must be in [0, 1).")


@dataclasses.dataclass(frozen=True)
class ConstantSparsity:
    """Prune to ``sparsity`` once at ``begin_step``; the masks then stay fixed."""

    sparsity: float
    begin_step: int = 0

    def __post_init__(self) -> None:
        _check_fraction(self.sparsity, "sparsity")
        if self.begin_step < 0:
            raise ConfigError(f"begin_step={self.begin_step} must be >= 0.")

    @property
    def final_sparsity(self) -> float:
        return self.sparsity

    def is_update_step(self, step: int) -> bool:
        """Whether the masks are recomputed after optimizer step ``step``."""
        return step == self.begin_step

    def sparsity_at(self, step: int) -> float:
        """The sparsity in force after optimizer step ``step`` (0 before pruning begins)."""
        return self.sparsity if step >= self.begin_step else 0.0


@dataclasses.dataclass(frozen=True)
class PolynomialDecay:
    """``s_t = s1 + (s0 − s1)(1 − (t − begin)/(end − begin))^power``, updated every ``frequency`` steps (cubic default).

    The sparsity rises fast at first, while the network has redundant weights to spare, and slowly near the end.
    Between updates the sparsity of the last update holds; from ``end_step`` on it is ``final_sparsity``.
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 100
    power: float = 3.0

    def __post_init__(self) -> None:
        _check_fraction(self.initial_sparsity, "initial_sparsity")
        _check_fraction(self.final_sparsity, "final_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError(
                f"initial_sparsity={self.initial_sparsity} > final_sparsity={self.final_sparsity}: pruned weights "
                "never grow back, so the sparsity can only rise."
            )
        if not 0 <= self.begin_step < self.end_step:
            raise ConfigError(
                f"Need 0 <= begin_step < end_step, got begin_step={self.begin_step} end_step={self.end_step}."
            )
        if self.frequency < 1 or self.power <= 0:
            raise ConfigError(f"frequency={self.frequency} must be >= 1 and power={self.power} > 0.")

    def is_update_step(self, step: int) -> bool:
        """Whether the masks are recomputed after optimizer step ``step``."""
        if not self.begin_step <= step <= self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def sparsity_at(self, step: int) -> float:
        """The sparsity in force after optimizer step ``step``: that of the last update step at or before it."""
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        last_update = step - (step - self.begin_step) % self.frequency
        progress = (last_update - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power


Schedule = ConstantSparsity | PolynomialDecay


class GradualPruner:
    """Magnitude masks that follow ``schedule`` up to ``config``'s sparsity and stay fixed between updates.

    With an N:M pattern, every group of M loses ``round(s_t · M)`` weights at an update, so the sparsity follows
    the schedule to the nearest 1/M and the final masks are exactly N:M.

    Example:
        >>> pruner = GradualPruner(model, MagnitudeConfig(sparsity=0.5, pattern="2:4"),
        ...                        PolynomialDecay(0.0, 0.5, begin_step=0, end_step=300, frequency=50))  # doctest: +SKIP
        >>> pruner.step(0)  # doctest: +SKIP
        0.0
    """

    def __init__(self, model: nn.Module, config: MagnitudeConfig, schedule: Schedule) -> None:
        if not isinstance(config, MagnitudeConfig):
            raise ConfigError(
                f"Gradual pruning ranks weights by magnitude while they train; got {type(config).__name__}, "
                "use MagnitudeConfig(sparsity=..., pattern=..., scope=...)."
            )
        if abs(schedule.final_sparsity - config.target_sparsity) > 1e-9:
            raise ConfigError(
                f"The schedule ends at sparsity {schedule.final_sparsity} but {type(config).__name__} asks for "
                f"{config.target_sparsity}; make them equal."
            )
        self.config = config
        self.schedule = schedule
        self.targets = _prune_targets(model, config)
        empty = [name for name, module in self.targets if linear_weight(module).numel() == 0]
        if empty:
            raise ConfigError(
                f"{empty[0]} holds no weight here (sharded by ZeRO-3/FSDP?); gradual pruning needs full weights."
            )
        self.masks: list[torch.Tensor] | None = None
        self.sparsity = 0.0

    def step(self, step: int) -> float:
        """Call after optimizer step ``step``: re-apply the masks, then update them if it is an update step.

        Returns the sparsity in force. A pruner created mid-way (e.g. on resume) first rebuilds its masks.
        """
        self.apply_masks()  # first, so that an update ranks the weights with the pruned ones back at zero
        if self.schedule.is_update_step(step) or (self.masks is None and self.schedule.sparsity_at(step) > 0):
            self.update_masks(self.schedule.sparsity_at(step))
        return self.sparsity

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Rank the current weights by |w| and prune them to ``sparsity`` (pruned ones, being zero, stay pruned)."""
        weights = [linear_weight(module) for _, module in self.targets]
        if self.config.nm:
            m = self.config.nm[1]
            removed = int(round(sparsity * m))
            self.masks = [nm_mask(w.abs().float(), m - removed, m) for w in weights]
        elif self.config.scope == "global":
            self.masks = global_magnitude_masks(weights, sparsity)
        else:
            self.masks = [magnitude_mask(w, sparsity) for w in weights]
        self.sparsity = sparsity
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights again (the optimizer step moved them)."""
        for (_, module), keep in zip(self.targets, self.masks or []):
            linear_weight(module).masked_fill_(~keep, 0.0)


class GradualPruningCallback(TrainerCallback):
    """Runs a :class:`GradualPruner` inside ``transformers.Trainer``: at the start and after every optimizer step.

    Example:
        >>> pruner = GradualPruner(model, MagnitudeConfig(sparsity=0.5), PolynomialDecay(0.0, 0.5, 0, 100, 10))  # doctest: +SKIP
        >>> Trainer(model=model, args=args, train_dataset=data, callbacks=[GradualPruningCallback(pruner)]).train()  # doctest: +SKIP
    """

    def __init__(self, pruner: GradualPruner) -> None:
        self.pruner = pruner

    def on_train_begin(self, args, state, control, **kwargs):
        self.pruner.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.step(state.global_step)
