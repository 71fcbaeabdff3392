"""Saving and reloading compressed variants: compact packed weights on disk, one call to load them back.

A handler that stores a weight compactly (k-means codebook + packed indices, int4 values + scales, ...) sets the
module's dense weight to the decoded values and attaches a :class:`PackedWeight`. :func:`save_optimized` writes those
packed tensors to ``packed_weights.safetensors`` instead of the dense ones, everything else as a normal Hugging Face
folder, plus ``hf_optim.json`` (steps, library versions, metrics) and a ``README.md`` model card.
:func:`load_optimized` decodes them back — bitwise the weights that were saved.

Example:
    >>> hf_optim.save_optimized(model, "out/wanda-2of4", tokenizer=tokenizer)  # doctest: +SKIP
    >>> model = hf_optim.load_optimized("out/wanda-2of4")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_optim.core.atomic import staged_directory
from hf_optim.core.errors import ConfigError

PACKED_FILE = "packed_weights.safetensors"
METADATA_FILE = "hf_optim.json"
PACKED_ATTR = "_hf_optim_packed"
_SEPARATOR = ".__"  # "<module>.weight.__<part>" keys in the packed file

Decoder = Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]
_DECODERS: dict[str, Decoder] = {}
_CODEC_MODULES = {"kmeans": "hf_optim.compression.clustering", "intn": "hf_optim.compression.quantization"}


@dataclasses.dataclass
class PackedWeight:
    """A weight stored compactly: the codec's tensors plus JSON-able metadata (shape, bits, ...)."""

    codec: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def register_codec(name: str) -> Callable[[Decoder], Decoder]:
    """Decorator registering ``decode(tensors, meta) -> dense weight [out, in]`` for codec ``name``."""

    def wrap(decode: Decoder) -> Decoder:
        _DECODERS[name] = decode
        return decode

    return wrap


def decode(packed: PackedWeight) -> torch.Tensor:
    """The dense ``[out, in]`` weight a packed weight stands for."""
    if packed.codec not in _DECODERS and packed.codec in _CODEC_MODULES:
        import importlib

        importlib.import_module(_CODEC_MODULES[packed.codec])
    if packed.codec not in _DECODERS:
        raise ConfigError(f"Unknown packed-weight codec {packed.codec!r}; this folder needs a newer hf_optim.")
    return _DECODERS[packed.codec](packed.tensors, packed.meta)


def attach_packed(module: nn.Module, packed: PackedWeight) -> None:
    """Record that ``module.weight`` is stored as ``packed`` (its dense value must already equal the decode)."""
    setattr(module, PACKED_ATTR, packed)


_CHUNK = 1 << 20  # values per chunk (a multiple of 8, so every chunk's bits end on a byte boundary)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits into a flat uint8 tensor, ``ceil(n * bits / 8)`` bytes.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3, 0]), bits=2).tolist()  # 0b00_11_10_01
        [57]
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} must be in [1, 16].")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values do not fit in {bits} bits.")
    chunks = []
    for chunk in flat.split(_CHUNK):
        planes = ((chunk.unsqueeze(1) >> torch.arange(bits)) & 1).reshape(-1)  # least significant bit first
        planes = torch.nn.functional.pad(planes, (0, (-planes.numel()) % 8))
        chunks.append((planes.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8))
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` integers, as int64."""
    out = []
    bytes_per_chunk = _CHUNK * bits // 8
    for index, chunk in enumerate(packed.split(bytes_per_chunk)):
        n = min(_CHUNK, count - index * _CHUNK)
        if n <= 0:
            break
        stream = ((chunk.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[: n * bits]
        out.append((stream.reshape(n, bits) << torch.arange(bits)).sum(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("hf-optim", "torch", "transformers", "safetensors", "bitsandbytes", "torchao"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _packed_modules(model: nn.Module) -> dict[str, PackedWeight]:
    return {name: getattr(m, PACKED_ATTR) for name, m in model.named_modules() if hasattr(m, PACKED_ATTR)}


def save_optimized(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer=None,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> Path:
    """Write ``model`` to ``output_dir`` atomically (a temporary folder renamed at the end); return the path.

    Packed weights go to ``packed_weights.safetensors``; ``hf_optim.json`` records the steps, versions and metrics;
    ``README.md`` is a model card with ``base_model``/``base_model_relation`` metadata.
    """
    from safetensors.torch import save_file

    from hf_optim.compression.api import compression_history
    from hf_optim.hub import CARD_FILE, build_model_card

    output_dir = Path(output_dir)
    with staged_directory(output_dir) as staging:
        packed = _packed_modules(model)
        state_dict = None
        if packed:
            state_dict = {k: v for k, v in model.state_dict().items()}
            for name in packed:
                state_dict.pop(f"{name}.weight")
        model.save_pretrained(staging, state_dict=state_dict)
        if packed:
            tensors = {f"{name}.weight{_SEPARATOR}{part}": t.contiguous() for name, p in packed.items() for part, t in p.tensors.items()}
            save_file(tensors, staging / PACKED_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        steps = compression_history(model)
        base_model = base_model or getattr(model.config, "_name_or_path", None) or None
        record = {
            "format_version": 1,
            "base_model": base_model,
            "steps": steps,
            "packed": {name: {"codec": p.codec, "meta": p.meta} for name, p in packed.items()},
            "versions": _versions(),
            "metrics": metrics or {},
        }
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2))
        build_model_card(staging).save(staging / CARD_FILE)
    return output_dir


def load_optimized(model_dir: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a folder written by :func:`save_optimized` (or any Transformers causal-LM folder) with its weights decoded."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{str(model_dir)!r} is not a model folder (no config.json).")
    record = json.loads((model_dir / METADATA_FILE).read_text()) if (model_dir / METADATA_FILE).is_file() else {}
    packed_info = record.get("packed", {})
    verbosity = hf_logging.get_verbosity()
    if packed_info:  # the packed weights are absent from model.safetensors on purpose: silence "newly initialized"
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device)
    finally:
        hf_logging.set_verbosity(verbosity)
    if packed_info:
        stored = load_file(model_dir / PACKED_FILE)
        modules = dict(model.named_modules())
        for name, info in packed_info.items():
            prefix = f"{name}.weight{_SEPARATOR}"
            parts = {key[len(prefix):]: t for key, t in stored.items() if key.startswith(prefix)}
            packed = PackedWeight(info["codec"], parts, info["meta"])
            module = modules[name]
            weight = decode(packed)
            target = module.weight
            with torch.no_grad():
                target.copy_(weight.t() if type(module).__name__ == "Conv1D" else weight)
            attach_packed(module, packed)
    if any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        from hf_optim.compression.quantization import prepare_bnb_model

        prepare_bnb_model(model)
    from hf_optim.compression.api import HISTORY_ATTR

    setattr(model, HISTORY_ATTR, record.get("steps", []))
    return model
