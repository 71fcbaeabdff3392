"""Gradient accumulation gives exactly the gradients of one big batch (token-weighted), on 1 and 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from hf_optim.training.loss import count_target_tokens, labels_from_batch, summed_cross_entropy
from hf_optim.training.step import accumulate_gradients
from tests.helpers import REPO_ROOT, free_port, right_padded_batch, tiny_model, unevenly_padded_sequences


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _reference(sequences) -> tuple[float, dict[str, torch.Tensor]]:
    """One batch holding every sequence, mean loss over all its target tokens, plain autograd."""
    model = tiny_model("llama", seed=0)
    batch = right_padded_batch(sequences)
    labels = labels_from_batch(batch["input_ids"], batch["attention_mask"])
    loss = summed_cross_entropy(model(**batch).logits, labels) / count_target_tokens(labels)
    loss.backward()
    return loss.item(), _grads(model)


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    yield acc
    acc.gradient_accumulation_steps = 1


def _assert_same_grads(actual, expected, atol=1e-6):
    worst = max((actual[n] - expected[n]).abs().max().item() for n in expected)
    scale = max(expected[n].abs().max().item() for n in expected)
    assert worst <= atol + 1e-5 * scale, f"max |grad difference| {worst:.3g} (grad scale {scale:.3g})"


def test_accumulation_matches_one_big_batch_with_uneven_padding(accelerator):
    sequences = unevenly_padded_sequences(8, seed=1)
    ref_loss, ref_grads = _reference(sequences)

    accelerator.gradient_accumulation_steps = 4
    model = accelerator.prepare(tiny_model("llama", seed=0))
    # each micro-batch is padded only to its own longest sequence, so token counts differ a lot between them
    micro = [right_padded_batch(sequences[i : i + 2]) for i in range(0, 8, 2)]
    result = accumulate_gradients(accelerator, model, micro)

    assert result.target_tokens == sum(len(s) - 1 for s in sequences)
    assert result.loss == pytest.approx(ref_loss, rel=1e-6)
    _assert_same_grads(_grads(model), ref_grads)


def test_accumulation_naive_mean_of_means_would_differ(accelerator):
    """The check above can fail: averaging per-micro-batch means (the common bug) gives other gradients."""
    sequences = unevenly_padded_sequences(8, seed=1)
    _, ref_grads = _reference(sequences)
    model = tiny_model("llama", seed=0)
    for i in range(0, 8, 2):
        batch = right_padded_batch(sequences[i : i + 2])
        labels = labels_from_batch(batch["input_ids"], batch["attention_mask"])
        (summed_cross_entropy(model(**batch).logits, labels) / count_target_tokens(labels) / 4).backward()
    with pytest.raises(AssertionError, match="grad difference"):
        _assert_same_grads(_grads(model), ref_grads)


def test_accumulation_rejects_wrong_number_of_micro_batches(accelerator):
    accelerator.gradient_accumulation_steps = 2
    model = accelerator.prepare(tiny_model("llama", seed=0))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        accumulate_gradients(accelerator, model, [right_padded_batch(unevenly_padded_sequences(2))])


@pytest.mark.multiprocess
def test_accumulation_on_two_processes_matches_one_big_batch(tmp_path):
    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO_ROOT / "tests" / "workers" / "accumulation_worker.py"), str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sequences = unevenly_padded_sequences(8, seed=1)
    ref_loss, ref_grads = _reference(sequences)
    saved = torch.load(out, weights_only=True)
    assert saved["tokens"] == sum(len(s) - 1 for s in sequences)
    assert saved["loss"] == pytest.approx(ref_loss, rel=1e-6)
    _assert_same_grads(saved["grads"], ref_grads)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_accumulation_is_exact_for_every_model_family(accelerator, family):
    sequences = unevenly_padded_sequences(4, seed=2)
    reference = tiny_model(family, seed=0)
    batch = right_padded_batch(sequences)
    labels = labels_from_batch(batch["input_ids"], batch["attention_mask"])
    (summed_cross_entropy(reference(**batch).logits, labels) / count_target_tokens(labels)).backward()

    accelerator.gradient_accumulation_steps = 2
    model = accelerator.prepare(tiny_model(family, seed=0))
    accumulate_gradients(accelerator, model, [right_padded_batch(sequences[:1]), right_padded_batch(sequences[1:])])
    _assert_same_grads(_grads(model), _grads(reference))
