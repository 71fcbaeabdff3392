"""Activation checkpointing: same loss and gradients, fewer bytes saved for backward."""

from __future__ import annotations

import pytest
import torch

from hf_optim.core.errors import ConfigError
from hf_optim.training.activations import apply_activation_checkpointing
from tests.helpers import tiny_model


def _loss_grads_and_saved_bytes(mode: str, every_n: int = 2, offload: bool = False, device: str = "cpu"):
    model = tiny_model("llama", seed=0, layers=4, hidden=64).to(device)
    apply_activation_checkpointing(model, mode, every_n_layers=every_n, offload=offload)
    model.train()
    input_ids = torch.randint(2, 512, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()  # views of one storage are counted once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()
    return loss.item(), grads, sum(storages.values())


def test_checkpointing_keeps_loss_and_gradients_and_saves_memory():
    loss_off, grads_off, bytes_off = _loss_grads_and_saved_bytes("off")
    loss_sel, grads_sel, bytes_sel = _loss_grads_and_saved_bytes("selective", every_n=2)
    loss_full, grads_full, bytes_full = _loss_grads_and_saved_bytes("full")

    assert loss_sel == pytest.approx(loss_off, abs=1e-6) and loss_full == pytest.approx(loss_off, abs=1e-6)
    torch.testing.assert_close(grads_sel, grads_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_full, grads_off, rtol=1e-5, atol=1e-6)
    # parameters are saved for backward in every mode; the activations are what checkpointing removes
    assert bytes_full < bytes_sel < bytes_off, (bytes_off, bytes_sel, bytes_full)


def test_selective_checkpoints_every_nth_layer():
    model = tiny_model("llama", layers=5)
    assert apply_activation_checkpointing(model, "selective", every_n_layers=2) == [0, 2, 4]
    assert apply_activation_checkpointing(model, "full") == [0, 1, 2, 3, 4]
    assert apply_activation_checkpointing(model, "off") == []


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("partial", {}, "'partial' is not one of"),
        ("selective", {"every_n_layers": 0}, "checkpoint_every_n_layers=0"),
        ("off", {"offload": True}, "needs gradient_checkpointing=full or selective"),
    ],
)
def test_checkpointing_bad_input(mode, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        apply_activation_checkpointing(tiny_model("llama"), mode, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_activation_offload_needs_a_gpu():
    with pytest.raises(ConfigError, match="no GPU here"):
        apply_activation_checkpointing(tiny_model("llama"), "full", offload=True)


@pytest.mark.gpu
def test_activation_offload_on_gpu_keeps_loss_and_gradients():
    loss_off, grads_off, _ = _loss_grads_and_saved_bytes("off", device="cuda")
    loss_offload, grads_offload, _ = _loss_grads_and_saved_bytes("full", offload=True, device="cuda")
    assert loss_offload == pytest.approx(loss_off, abs=1e-5)
    torch.testing.assert_close(grads_offload, grads_off, rtol=1e-4, atol=1e-5)
