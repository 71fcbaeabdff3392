"""One optimizer step of causal-LM training: exact token-weighted gradient accumulation across micro-batches and ranks.

Example:
    >>> result = accumulate_gradients(accelerator, model, micro_batches)  # doctest: +SKIP
    >>> result.loss, result.target_tokens  # step loss (mean over every target token) and its token count
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from hf_optim.training.loss import backward_scale, count_target_tokens, labels_from_batch, summed_cross_entropy


@dataclasses.dataclass
class StepResult:
    """What one optimizer step did, already reduced over all ranks."""

    loss: float  # mean cross-entropy over every target token of the step
    target_tokens: int  # tokens that carried a loss, all micro-batches and ranks
    input_tokens: int  # non-padding input tokens processed, all micro-batches and ranks (for throughput)


def _with_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "labels" in batch:
        return batch
    return {**batch, "labels": labels_from_batch(batch["input_ids"], batch.get("attention_mask"))}


def _non_padding(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def accumulate_gradients(
    accelerator,
    model: torch.nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    activation_context: contextlib.AbstractContextManager | None = None,
) -> StepResult:
    """Forward/backward every micro-batch of one optimizer step, leaving the exact step gradient in ``.grad``.

    ``len(micro_batches)`` must equal the accelerator's ``gradient_accumulation_steps``. The token count of the whole
    step is all-reduced first, so each micro-batch's summed loss is scaled by the same global denominator.
    """
    if len(micro_batches) != accelerator.gradient_accumulation_steps:
        raise ValueError(
            f"Got {len(micro_batches)} micro-batches for gradient_accumulation_steps="
            f"{accelerator.gradient_accumulation_steps}."
        )
    batches = [_with_labels(b) for b in micro_batches]
    counts = torch.tensor(
        [sum(count_target_tokens(b["labels"]) for b in batches), sum(_non_padding(b) for b in batches)],
        device=accelerator.device,
        dtype=torch.long,
    )
    global_targets, global_inputs = (int(v) for v in accelerator.reduce(counts, reduction="sum"))
    scale = backward_scale(global_targets, accelerator.gradient_accumulation_steps, accelerator.num_processes)

    local_loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in batches:
        with accelerator.accumulate(model), activation_context or contextlib.nullcontext():
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs, use_cache=False).logits
            loss_sum = summed_cross_entropy(logits, labels)
            accelerator.backward(loss_sum * scale)
        local_loss_sum += loss_sum.detach().double()
    global_loss_sum = accelerator.reduce(local_loss_sum, reduction="sum")
    return StepResult(loss=float(global_loss_sum) / global_targets, target_tokens=global_targets, input_tokens=global_inputs)


@torch.no_grad()
def evaluate_loss(accelerator, model: torch.nn.Module, dataloader, max_batches: int | None = None) -> float:
    """Token-weighted mean cross-entropy over (up to ``max_batches`` of) ``dataloader``, reduced over ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for index, batch in enumerate(dataloader):
        if max_batches is not None and index >= max_batches:
            break
        batch = _with_labels(batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
        totals[0] += summed_cross_entropy(logits, batch["labels"]).double()
        totals[1] += count_target_tokens(batch["labels"])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    if totals[1] == 0:
        raise ValueError("The evaluation data holds no target tokens.")
    return float(totals[0] / totals[1])
