"""Activation (gradient) checkpointing: off, full, or selective (every N-th decoder layer), with optional offload.

Built on Transformers' own ``activation_checkpointing_enable``, which checkpoints each decoder layer's ``forward``
(so FSDP2's module hooks stay outside the recompute) and can hold the saved inputs in pinned host memory.

Example:
    >>> checkpointed = apply_activation_checkpointing(model, "selective", every_n_layers=2)  # doctest: +SKIP
    >>> checkpointed  # indices of the decoder layers that recompute in backward
    [0, 2, 4]
"""

from __future__ import annotations

import torch

from hf_optim.core.errors import ConfigError

MODES = ("off", "full", "selective")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Transformers model, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_activation_checkpointing(
    model: torch.nn.Module, mode: str, every_n_layers: int = 2, offload: bool = False
) -> list[int]:
    """Configure checkpointing on ``model`` (before ``accelerator.prepare``); return the checkpointed layer indices.

    ``full`` recomputes every decoder layer in backward; ``selective`` only layers 0, N, 2N, … — a knob between
    memory and speed. ``offload`` keeps the checkpointed layers' inputs in pinned CPU memory; it needs a GPU.
    """
    if mode not in MODES:
        raise ConfigError(f"gradient_checkpointing={mode!r} is not one of {list(MODES)}.")
    if offload and mode == "off":
        raise ConfigError("activation_offload=true needs gradient_checkpointing=full or selective.")
    if offload and not torch.cuda.is_available():
        raise ConfigError("activation_offload=true moves activations from GPU to CPU memory; there is no GPU here.")
    if mode == "off":
        if getattr(model, "is_activation_checkpointing", False):
            model.activation_checkpointing_disable()
        return []
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support activation checkpointing; use gradient_checkpointing=off.")
    every = 1 if mode == "full" else every_n_layers
    if every < 1:
        raise ConfigError(f"checkpoint_every_n_layers={every_n_layers} must be >= 1.")
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every, offload=offload
    )
    return [i for i, layer in enumerate(decoder_layers(model)) if layer.gradient_checkpointing]
