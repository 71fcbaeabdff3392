"""Fused QKV and gate/up projections: same logits, same generation, same saved folder as the unfused model."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hf_optim.compression.fusion import fuse_projections, unfuse_projections
from hf_optim.core.errors import ConfigError
from tests.helpers import tiny_model

FUSABLE = ("llama", "mistral", "qwen2")


def _randomize_biases(model: nn.Module) -> None:
    # Transformers initialises biases to zero, which would hide a bias mis-ordering in the concatenation.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _pair(family: str, **config_kwargs) -> tuple[nn.Module, nn.Module]:
    reference = tiny_model(family, **config_kwargs).eval()
    _randomize_biases(reference)
    return reference, fuse_projections(copy.deepcopy(reference))


def _ids(length: int = 12, batch: int = 2) -> torch.Tensor:
    return torch.randint(2, 512, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FUSABLE)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_logits_match(family: str, attn: str) -> None:
    reference, fused = _pair(family)
    for model in (reference, fused):
        model.config._attn_implementation = attn
    ids = _ids()
    with torch.no_grad():
        expected, got = reference(ids).logits, fused(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    attention, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert not any(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj"))
    assert not any(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
    assert attention.qkv_proj.out_features == 64 + 2 * 32  # GQA: 4 query heads, 2 kv heads of 16
    assert (attention.qkv_proj.bias is not None) == (family == "qwen2")
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in reference.parameters())


def test_biased_llama_and_sliding_window_mistral_match() -> None:
    cases = [("llama", {"attention_bias": True, "mlp_bias": True}), ("mistral", {"sliding_window": 4})]
    for family, overrides in cases:
        reference = tiny_model(family)
        for key, value in overrides.items():
            setattr(reference.config, key, value)
        reference = type(reference)(reference.config).eval()  # rebuild so the biases exist
        _randomize_biases(reference)
        fused = fuse_projections(copy.deepcopy(reference))
        ids = _ids(16)
        with torch.no_grad():
            torch.testing.assert_close(fused(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FUSABLE)
def test_greedy_generation_identical(family: str) -> None:
    reference, fused = _pair(family)
    ids = _ids(8, batch=1)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        expected, got = reference.generate(ids, **kwargs), fused.generate(ids, **kwargs)
    assert expected.shape[1] == 20
    assert torch.equal(got, expected)


def test_save_pretrained_writes_original_layout(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    reference, fused = _pair("qwen2")
    fused.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["model.layers.0.self_attn.k_proj.bias"], reference.model.layers[0].self_attn.k_proj.bias)
    assert not any("qkv_proj" in key or "gate_up_proj" in key for key in saved)
    assert hasattr(fused.model.layers[0].self_attn, "qkv_proj")  # still fused after saving

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)
        torch.testing.assert_close(fused(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_unfuse_restores_exact_state_dict() -> None:
    reference, fused = _pair("llama")
    restored = unfuse_projections(fused)
    assert type(restored.model.layers[0].self_attn) is type(reference.model.layers[0].self_attn)
    expected, got = reference.state_dict(), restored.state_dict()
    assert list(got) == list(expected)  # same keys in the same order
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert "save_pretrained" not in vars(restored)


def test_partial_fusion_and_idempotence() -> None:
    reference, _ = _pair("mistral")
    only_qkv = fuse_projections(copy.deepcopy(reference), gate_up=False)
    layer = only_qkv.model.layers[1]
    assert hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_proj")
    fuse_projections(only_qkv)  # fuses the rest, leaves the fused attention alone
    assert hasattr(layer.mlp, "gate_up_proj") and layer.self_attn.qkv_proj.out_features == 128
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(only_qkv(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_gpt2_is_refused() -> None:
    with pytest.raises(ConfigError, match="'gpt2'.*c_attn"):
        fuse_projections(tiny_model("gpt2"))


def test_non_linear_projection_is_refused() -> None:
    model = tiny_model("llama")
    model.model.layers[1].self_attn.k_proj = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ConfigError, match="k_proj is a Sequential"):
        fuse_projections(model)
    assert hasattr(model.model.layers[0].self_attn, "q_proj")  # nothing was fused before the refusal


def test_lazy_export() -> None:
    import hf_optim

    assert hf_optim.fuse_projections is fuse_projections
