"""PyTorch-level operator fusion for Llama-style decoder blocks: one QKV matmul and one gate/up matmul.

``fuse_projections`` concatenates ``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj`` and ``gate_proj``/``up_proj``
into ``gate_up_proj`` in place, and swaps each fused module's class for a subclass whose ``forward`` mirrors the
Transformers one but issues one matmul instead of two or three. The result is identical up to float reassociation,
works with ``generate`` (KV cache), GQA, every attention implementation and ``torch.compile``.

Saving: a fused model's ``state_dict`` holds the fused names, so ``fuse_projections`` gives the model an instance
``save_pretrained`` that unfuses, saves the ordinary Transformers folder and fuses again; ``unfuse_projections``
restores the original modules for any other use (``torch.save(model.state_dict())``, other libraries).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_optim.core.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj")
_MLP_NAMES = ("gate_proj", "up_proj")


def _sliding_window_none(module: nn.Module) -> dict[str, Any]:
    return {}


def _sliding_window_from_config(module: nn.Module) -> dict[str, Any]:
    return {"sliding_window": getattr(module.config, "sliding_window", None)}


def _sliding_window_from_module(module: nn.Module) -> dict[str, Any]:
    return {"sliding_window": module.sliding_window}


@functools.lru_cache(maxsize=1)
def _registry() -> tuple[dict[type, Callable[[nn.Module], dict[str, Any]]], tuple[type, ...]]:
    """Attention class -> extra kwargs its forward passes to the attention function; and the MLP classes.

    Exact classes only: the fused forwards below mirror these classes' forwards (checked by tests/test_fusion.py),
    and a subclass may have changed its forward.
    """
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
    from transformers.models.mistral.modeling_mistral import MistralAttention, MistralMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP

    attention = {
        LlamaAttention: _sliding_window_none,
        MistralAttention: _sliding_window_from_config,  # mirrors MistralAttention.forward
        Qwen2Attention: _sliding_window_from_module,  # mirrors Qwen2Attention.forward
    }
    return attention, (LlamaMLP, MistralMLP, Qwen2MLP)


class _FusedQKVAttention:
    """Mixin placed before a supported attention class: ``qkv_proj`` replaces ``q_proj``/``k_proj``/``v_proj``."""

    _unfused_class: type
    _extra_attention_kwargs: Callable[[nn.Module], dict[str, Any]]
    _qkv_sizes: tuple[int, int, int]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cache is None:  # the deprecated name the original forward still accepts
            cache = kwargs.pop("past_key_values", None)
        namespace = sys.modules[self._unfused_class.__module__]
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query, key, value = self.qkv_proj(hidden_states).split(self._qkv_sizes, dim=-1)
        query_states = query.view(hidden_shape).transpose(1, 2)
        key_states = key.view(hidden_shape).transpose(1, 2)
        value_states = value.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = namespace.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface = namespace.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, namespace.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **self._extra_attention_kwargs(self),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class _FusedGateUpMLP:
    """Mixin placed before a supported MLP class: ``gate_up_proj`` replaces ``gate_proj``/``up_proj``."""

    _unfused_class: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


@functools.lru_cache(maxsize=None)
def _fused_class(mixin: type, base: type) -> type:
    # A real subclass (not a per-instance forward) so isinstance checks in Transformers still hold and
    # torch.compile traces it like any module.
    # torch.compile traces this class attribute; an lru_cache lookup inside forward would warn there
    extra = {"_extra_attention_kwargs": staticmethod(_registry()[0][base])} if mixin is _FusedQKVAttention else {}
    return type(f"Fused{base.__name__}", (mixin, base), {"_unfused_class": base, "__module__": __name__, **extra})


def _linear_parts(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    parts = [getattr(module, name) for name in names]
    for name, part in zip(names, parts):
        if type(part) is not nn.Linear:
            raise ConfigError(
                f"{type(module).__name__}.{name} is a {type(part).__name__}, not a plain nn.Linear, so it cannot be "
                "fused; call fuse_projections before quantizing or otherwise replacing the projections"
            )
    return parts


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    has_bias = parts[0].bias is not None
    # meta device: no throwaway random initialisation of a large weight
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=parts[0].weight.requires_grad)
    if has_bias:
        bias = torch.cat([p.bias.detach() for p in parts], dim=0)
        fused.bias = nn.Parameter(bias, requires_grad=parts[0].bias.requires_grad)
    return fused


def _split_linear(fused: nn.Linear, sizes: tuple[int, ...]) -> list[nn.Linear]:
    weights = fused.weight.detach().split(sizes, dim=0)
    biases = fused.bias.detach().split(sizes, dim=0) if fused.bias is not None else [None] * len(sizes)
    parts = []
    for weight, bias in zip(weights, biases):
        part = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        # clone: each saved tensor must own its storage (safetensors refuses shared storage)
        part.weight = nn.Parameter(weight.clone(), requires_grad=fused.weight.requires_grad)
        if bias is not None:
            part.bias = nn.Parameter(bias.clone(), requires_grad=fused.bias.requires_grad)
        parts.append(part)
    return parts


def _replace_children(module: nn.Module, old: tuple[str, ...], new: dict[str, nn.Module]) -> None:
    """Swap children ``old`` for ``new`` at the position of the first old one, keeping the parameter order."""
    children: dict[str, nn.Module | None] = {}
    for name, child in module._modules.items():
        if name == old[0]:
            children.update(new)
        if name not in old:
            children[name] = child
    module._modules = children


def _check_supported(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"fuse_projections supports model_type in {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
            f"({type(model).__name__}); architectures such as GPT-2 already use a fused QKV projection (c_attn), "
            "so there is nothing to fuse"
        )


def fuse_projections(model: nn.Module, qkv: bool = True, gate_up: bool = True) -> nn.Module:
    """Fuse the QKV and gate/up projections of a Llama, Mistral or Qwen2 causal LM in place; returns the model.

    Parameter values and count are unchanged (weights are concatenated); outputs match the unfused model up to float
    reassociation. Modules already fused are left as they are, so calling it twice is harmless.
    ``model.save_pretrained`` still writes the ordinary Transformers folder (original key names).

    Example:
        >>> from hf_optim import fuse_projections
        >>> model = fuse_projections(AutoModelForCausalLM.from_pretrained("path/to/llama"))
        >>> model.model.layers[0].self_attn.qkv_proj  # one Linear instead of q_proj, k_proj, v_proj
        >>> model.save_pretrained("out")  # loadable by AutoModelForCausalLM.from_pretrained("out")
    """
    _check_supported(model)
    attention_classes, mlp_classes = _registry()
    targets = [
        m for m in model.modules() if (qkv and type(m) in attention_classes) or (gate_up and type(m) in mlp_classes)
    ]
    # validate every module before changing any, so a refusal never leaves the model half fused
    parts = [_linear_parts(m, _ATTENTION_NAMES if type(m) in attention_classes else _MLP_NAMES) for m in targets]
    for module, linears in zip(targets, parts):
        base = type(module)
        if base in attention_classes:
            module._qkv_sizes = tuple(linear.out_features for linear in linears)
            _replace_children(module, _ATTENTION_NAMES, {"qkv_proj": _concat_linear(linears)})
            module.__class__ = _fused_class(_FusedQKVAttention, base)
        else:
            _replace_children(module, _MLP_NAMES, {"gate_up_proj": _concat_linear(linears)})
            module.__class__ = _fused_class(_FusedGateUpMLP, base)
    if _fused_kinds(model) != (False, False):
        # bound method so that copy.deepcopy(model) rebinds it to the copy
        model.save_pretrained = types.MethodType(_save_pretrained_unfused, model)
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undo ``fuse_projections`` in place (separate ``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``).

    Example:
        >>> model = unfuse_projections(fuse_projections(model))
        >>> torch.save(model.state_dict(), "weights.pt")  # original key names
    """
    for module in model.modules():
        if isinstance(module, _FusedQKVAttention):
            parts = _split_linear(module.qkv_proj, module._qkv_sizes)
            _replace_children(module, ("qkv_proj",), dict(zip(_ATTENTION_NAMES, parts)))
            del module._qkv_sizes
            module.__class__ = module._unfused_class
        elif isinstance(module, _FusedGateUpMLP):
            half = module.gate_up_proj.out_features // 2
            parts = _split_linear(module.gate_up_proj, (half, half))
            _replace_children(module, ("gate_up_proj",), dict(zip(_MLP_NAMES, parts)))
            module.__class__ = module._unfused_class
    model.__dict__.pop("save_pretrained", None)
    return model


def _fused_kinds(model: nn.Module) -> tuple[bool, bool]:
    modules = list(model.modules())
    return (
        any(isinstance(m, _FusedQKVAttention) for m in modules),
        any(isinstance(m, _FusedGateUpMLP) for m in modules),
    )


def _save_pretrained_unfused(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a fused model: save the unfused (original) layout, then fuse back."""
    qkv, gate_up = _fused_kinds(model)
    unfuse_projections(model)
    try:
        return type(model).save_pretrained(model, *args, **kwargs)
    finally:
        fuse_projections(model, qkv=qkv, gate_up=gate_up)
