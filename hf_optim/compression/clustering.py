"""Weight clustering (weight sharing): each weight of a layer becomes one of k shared values, stored compactly.

``hf_optim.cluster(model, ClusterConfig(...))`` runs k-means on every selected linear layer — one codebook per
tensor, one per output channel (``per_channel``), or one per tensor scaled per output channel (``row_scale``) —
optionally keeping the exact zeros of a pruned layer as their own cluster (``preserve_sparsity``), weighting each
weight's error by its input's activation energy (``weighting="activation"``) or assigning weights GPTQ-style so
that the layer's output error is compensated (``compensation="gptq"``); both need calibration data. A layer is
saved as a ``"kmeans"`` :class:`PackedWeight`: the codebook (fp16 where that is precise enough), the row scales
if any, and ⌈log2 k⌉-bit packed indices — with 16 clusters about 0.13× the fp32 bytes for a shared codebook,
0.125 + 8/in_features for one per row.

Cluster-preserving fine-tuning: :func:`make_cluster_trainable` turns each clustered weight into
``codebook[indices]`` with the codebook as the trainable parameter — the assignments never change, and each
centroid's gradient is the sum of its weights' gradients. :func:`finalize_clusters` turns them back into dense
weights with a fresh packed form, ready for :func:`hf_optim.save_optimized`.

Example:
    >>> config = ClusterConfig(n_clusters=16, init="density", per_channel=False, row_scale=True, compensation="gptq")
    >>> hf_optim.cluster(model, config, tokenizer=tokenizer, calibration_texts=texts)  # doctest: +SKIP
    >>> optimizer = torch.optim.Adam(make_cluster_trainable(model), lr=3e-3)  # doctest: +SKIP
    >>> train(model, optimizer)  # doctest: +SKIP
    >>> finalize_clusters(model); hf_optim.save_optimized(model, "out/kmeans16")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from hf_optim.compression.algorithms.kmeans import assign, gptq_assign, kmeans_1d
from hf_optim.compression.api import register_handler
from hf_optim.compression.calibration import InputStats, compress_layerwise
from hf_optim.compression.configs import ClusterConfig
from hf_optim.compression.storage import PACKED_ATTR, PackedWeight, attach_packed, pack_bits, register_codec, unpack_bits
from hf_optim.compression.targets import linear_weight, target_linears
from hf_optim.core.errors import ConfigError

CODEC = "kmeans"
_FP16_TOLERANCE = 2.0**-10  # fp16 codebook error allowed, relative to the largest centroid (fp16 rounds to 2**-11)


def _bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return table[0][idx] if table.shape[0] == 1 else table.gather(1, idx)


@register_codec(CODEC)
def decode_kmeans(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a ``"kmeans"`` packed weight: ``(scale ·) codebook[row or 0, index]``."""
    out, cols = meta["shape"]
    dtype = getattr(torch, meta["dtype"])
    table = tensors["codebook"].to(dtype)
    if "scale" in tensors:
        table = tensors["scale"].to(dtype) * table  # [out, 1] * [1, k]: the shared codebook scaled per row
    idx = unpack_bits(tensors["indices"].cpu(), meta["bits"], out * cols).reshape(out, cols).to(table.device)
    return _lookup(table, idx)


def _stored(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # fp16 halves a codebook; keep the weight's own dtype where fp16 would overflow or lose small values
    half = values.to(torch.float16)
    error = (half.float() - values.float()).abs().max()
    if dtype != torch.float16 and bool(error <= _FP16_TOLERANCE * values.float().abs().max()):
        return half
    return values.to(dtype)


@torch.no_grad()
def _pack(module: nn.Module, codebook: torch.Tensor, idx: torch.Tensor, zero_cluster: bool,
          scale: torch.Tensor | None = None) -> None:
    """Store ``codebook`` ``[R, k]`` (+ ``scale`` ``[out, 1]``) and ``idx`` ``[out, in]`` as the layer's packed
    form, and set the weight to exactly what that decodes to."""
    weight = linear_weight(module)
    k = codebook.shape[1]
    meta = {"shape": list(weight.shape), "bits": _bits(k), "k": k, "dtype": str(weight.dtype).removeprefix("torch."),
            "zero_cluster": zero_cluster}
    tensors = {"codebook": _stored(codebook, weight.dtype).cpu(), "indices": pack_bits(idx.cpu(), meta["bits"])}
    if scale is not None:
        tensors["scale"] = _stored(scale, weight.dtype).cpu()
    packed = PackedWeight(CODEC, tensors, meta)
    weight.copy_(decode_kmeans(packed.tensors, meta).to(weight.device))  # the model runs on exactly what reloads
    attach_packed(module, packed)


def _check_sizes(targets: list[tuple[str, nn.Module]], config: ClusterConfig) -> None:
    for name, module in targets:
        out, cols = linear_weight(module).shape
        count = cols if config.per_channel else out * cols
        if config.n_clusters > count:
            where = f"each row of {name!r} has {cols} weights" if config.per_channel else f"{name!r} has {count} weights"
            raise ConfigError(
                f"n_clusters={config.n_clusters} is larger than the number of weights to cluster: {where}. "
                "Use fewer clusters, per_channel=False, or exclude the layer."
            )


@torch.no_grad()
def cluster_weight(
    weight: torch.Tensor, config: ClusterConfig, stats: InputStats | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cluster one ``[out, in]`` weight: codebook ``[R, k]`` (R = out or 1), indices ``[out, in]``, row scale or None.

    The weight becomes ``codebook[row or 0, index]``, times ``scale[row]`` with ``row_scale``. With
    ``preserve_sparsity`` the codebook's entry 0 is an exact zero that holds the zero weights and k - 1 clusters
    share the non-zeros. ``stats`` (from calibration) feeds activation weighting and GPTQ assignment.

    Example:
        >>> codebook, idx, scale = cluster_weight(torch.randn(8, 32), ClusterConfig(n_clusters=4))
        >>> codebook.shape, idx.shape, scale
        (torch.Size([8, 4]), torch.Size([8, 32]), None)
    """
    if config.needs_calibration and stats is None:
        raise ConfigError(f"weighting={config.weighting!r} / compensation={config.compensation!r} need calibration data.")
    w = weight.detach().float().contiguous()  # GPT-2's Conv1D hands over a transposed view
    out, cols = w.shape
    scale = None
    if config.row_scale:
        scale = w.abs().amax(1, keepdim=True)
        scale = _stored(torch.where(scale > 0, scale, 1.0), weight.dtype).float()  # cluster what will be stored
    normalized = w if scale is None else w / scale
    rows = normalized if config.per_channel else normalized.reshape(1, -1)
    mask = rows != 0 if config.preserve_sparsity else None
    k = config.n_clusters - 1 if config.preserve_sparsity else config.n_clusters
    weights = None
    if config.weighting == "activation":
        weights = stats.sq_norm.to(w.device, torch.float32).expand(out, cols)
        weights = (weights if scale is None else weights * scale.square()).reshape(rows.shape)
    centroids = kmeans_1d(rows, k, config.init, weights, mask, config.max_iter, config.seed)
    table = centroids if scale is None else scale * centroids  # each row's codebook, still sorted (scale > 0)
    row_mask = None if mask is None else mask.reshape(out, cols)
    if config.compensation == "gptq":
        idx = gptq_assign(w, stats.hessian.to(w.device), table, row_mask)
    else:
        idx = assign(w, table, row_mask) if table.shape[0] == out else assign(rows, table, mask).reshape(out, cols)
    if config.preserve_sparsity:
        centroids = torch.cat([torch.zeros_like(centroids[:, :1]), centroids], 1)
        idx = idx + 1  # -1 ("stays zero") becomes the zero cluster
    return centroids, idx, scale


@register_handler(ClusterConfig)
def cluster_model(model: nn.Module, config: ClusterConfig, batches: list[torch.Tensor] | None) -> None:
    """Handler of ``hf_optim.cluster``: cluster every selected linear layer and attach its packed form."""
    targets = target_linears(model, config.include, config.exclude)
    _check_sizes(targets, config)
    if config.needs_calibration and not batches:
        raise ConfigError(f"{config} needs calibration data: pass tokenizer=... and calibration_texts=[...].")

    def compress(_name: str, module: nn.Module, stats: InputStats | None) -> None:
        codebook, idx, scale = cluster_weight(linear_weight(module), config, stats)
        _pack(module, codebook, idx, config.preserve_sparsity, scale)

    if config.needs_calibration:
        compress_layerwise(model, batches, targets, compress, hessian=config.compensation == "gptq")
    else:
        for name, module in targets:
            compress(name, module, None)


class ClusteredWeight(nn.Module):
    """Parametrization ``weight = (scale ·) codebook[indices]``: the codebook (and row scale) train, the assignment
    is fixed.

    Registered by :func:`make_cluster_trainable`; ``parametrizations.weight.original0`` is then the codebook
    ``[R, k]`` and ``original1`` the row scale ``[out, 1]`` if the layer has one. Through the indexing, each
    centroid's gradient is the sum of the gradients of the weights in its cluster.
    """

    def __init__(self, indices: torch.Tensor, factors: tuple[torch.Tensor, ...], zero_cluster: bool,
                 transpose: bool) -> None:
        super().__init__()
        k = factors[0].shape[1]
        # the smallest dtype that holds k indices (an int64 copy per weight would double a model's memory)
        self.register_buffer("indices", indices.to(torch.uint8 if k <= 256 else torch.int32))
        keep = torch.ones(1, k)
        keep[0, 0] = 0.0 if zero_cluster else 1.0
        self.register_buffer("keep", keep)  # pins the zero cluster of a sparsity-preserving codebook at 0
        self.zero_cluster, self.transpose = zero_cluster, transpose
        self._factors: tuple[torch.Tensor, ...] | None = factors  # handed over once, at registration

    def forward(self, codebook: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        table = codebook * self.keep.to(codebook.dtype)
        if scale is not None:
            table = scale * table
        weight = _lookup(table, self.indices.long())
        return weight.t() if self.transpose else weight

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._factors is None:
            raise ConfigError(
                "A trainable clustered weight changes only through its codebook (parametrizations.weight.original*); "
                "call finalize_clusters(model) first to assign a dense weight."
            )
        factors, self._factors = self._factors, None
        return factors


def _clustered(model: nn.Module) -> list[tuple[str, nn.Module, ClusteredWeight]]:
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            found += [(name, module, p) for p in module.parametrizations.weight if isinstance(p, ClusteredWeight)]
    return found


def make_cluster_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Make every clustered layer's codebook (and row scale) trainable with its assignment frozen; return them.

    Works on a model clustered by :func:`hf_optim.cluster` or loaded with :func:`hf_optim.load_optimized`. Pass
    the returned parameters to an optimizer (alone, or with others such as norms): each weight stays
    ``codebook[its cluster]``, so a row never holds more than k values. The packed form is dropped while training
    (it would go stale); call :func:`finalize_clusters` before saving.

    Example:
        >>> codebooks = make_cluster_trainable(model)  # doctest: +SKIP
        >>> optimizer = torch.optim.Adam(codebooks, lr=1e-3)  # doctest: +SKIP
    """
    for module in list(model.modules()):  # a list: registering a parametrization adds submodules
        packed = getattr(module, PACKED_ATTR, None)
        if packed is None or packed.codec != CODEC:
            continue
        meta, tensors, dtype = packed.meta, packed.tensors, module.weight.dtype
        out, cols = meta["shape"]
        idx = unpack_bits(tensors["indices"].cpu(), meta["bits"], out * cols).reshape(out, cols)
        # the same casts as the decoder, so the parametrized weight starts bitwise equal to the current one
        factors = tuple(tensors[part].to(module.weight.device, dtype) for part in ("codebook", "scale") if part in tensors)
        clustered = ClusteredWeight(idx.to(module.weight.device), factors, meta["zero_cluster"], _is_conv1d(module))
        delattr(module, PACKED_ATTR)
        parametrize.register_parametrization(module, "weight", clustered)
    params = [p for _name, module, _c in _clustered(model) for p in module.parametrizations.weight.parameters()]
    if not params:
        raise ConfigError("The model has no clustered layers; run hf_optim.cluster(model, ClusterConfig(...)) first.")
    return params


@torch.no_grad()
def finalize_clusters(model: nn.Module) -> list[str]:
    """Turn trainable clustered layers back into plain dense weights with a packed form; return their names.

    Example:
        >>> finalize_clusters(model)  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj', ...]
    """
    names = []
    for name, module, clustered in _clustered(model):
        originals = module.parametrizations.weight.original0, getattr(module.parametrizations.weight, "original1", None)
        codebook = originals[0].detach() * clustered.keep.to(originals[0].dtype)
        scale = None if originals[1] is None else originals[1].detach()
        idx = clustered.indices.long()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        _pack(module, codebook, idx, clustered.zero_cluster, scale)
        names.append(name)
    return names
