"""Weight clustering (weight sharing): each weight of a layer becomes one of k shared values, stored compactly.

``hf_optim.cluster(model, ClusterConfig(...))`` runs k-means on every selected linear layer — one codebook per
tensor or per output channel (``per_channel``) — optionally keeping the exact zeros of a pruned layer as their own
cluster (``preserve_sparsity``), weighting each weight's error by its input's activation energy
(``weighting="activation"``) or assigning weights GPTQ-style so that the layer's output error is compensated
(``compensation="gptq"``); both need calibration data. A layer is saved as a ``"kmeans"`` :class:`PackedWeight`:
the codebook (fp16 where that is precise enough) and ⌈log2 k⌉-bit packed indices, so 16 clusters cost about 1/8
of the fp32 bytes with one codebook per tensor.

Cluster-preserving fine-tuning: :func:`make_cluster_trainable` turns each clustered weight into
``codebook[indices]`` with the codebook as the trainable parameter — the assignments never change, and each
centroid's gradient is the sum of its weights' gradients. :func:`finalize_clusters` turns them back into dense
weights with a fresh packed form, ready for :func:`hf_optim.save_optimized`.

Example:
    >>> hf_optim.cluster(model, ClusterConfig(n_clusters=16, per_channel=False, compensation="gptq"),
    ...                  tokenizer=tokenizer, calibration_texts=texts)  # doctest: +SKIP
    >>> optimizer = torch.optim.Adam(make_cluster_trainable(model), lr=1e-4)  # doctest: +SKIP
    >>> ...  # train as usual
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


@register_codec(CODEC)
def decode_kmeans(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a ``"kmeans"`` packed weight: ``codebook[row or 0, index]``."""
    out, cols = meta["shape"]
    codebook = tensors["codebook"].to(getattr(torch, meta["dtype"]))
    idx = unpack_bits(tensors["indices"].cpu(), meta["bits"], out * cols).reshape(out, cols).to(codebook.device)
    return codebook[0][idx] if codebook.shape[0] == 1 else codebook.gather(1, idx)


def _stored_codebook(codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # fp16 halves the codebook; keep the weight's own dtype where fp16 would overflow or lose small values
    half = codebook.to(torch.float16)
    error = (half.float() - codebook.float()).abs().max()
    if dtype != torch.float16 and bool(error <= _FP16_TOLERANCE * codebook.float().abs().max()):
        return half
    return codebook.to(dtype)


@torch.no_grad()
def _pack(module: nn.Module, codebook: torch.Tensor, idx: torch.Tensor, zero_cluster: bool) -> None:
    """Store ``codebook`` ``[R, k]`` + ``idx`` ``[out, in]`` as the layer's packed form and set the weight to its decode."""
    weight = linear_weight(module)
    k = codebook.shape[1]
    meta = {"shape": list(weight.shape), "bits": _bits(k), "k": k, "dtype": str(weight.dtype).removeprefix("torch."),
            "zero_cluster": zero_cluster}
    tensors = {"codebook": _stored_codebook(codebook, weight.dtype).cpu(), "indices": pack_bits(idx.cpu(), meta["bits"])}
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
def cluster_weight(weight: torch.Tensor, config: ClusterConfig, stats: InputStats | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster one ``[out, in]`` weight: the codebook ``[R, k]`` (R = out or 1) and indices ``[out, in]``.

    With ``preserve_sparsity`` the codebook's entry 0 is an exact zero that holds the zero weights, and k - 1
    clusters share the non-zeros. ``stats`` (from calibration) feeds activation weighting and GPTQ assignment.

    Example:
        >>> codebook, idx = cluster_weight(torch.randn(8, 32), ClusterConfig(n_clusters=4))
        >>> codebook.shape, idx.shape
        (torch.Size([8, 4]), torch.Size([8, 32]))
    """
    w = weight.detach().float()
    out, cols = w.shape
    rows = w if config.per_channel else w.reshape(1, -1)
    mask = rows != 0 if config.preserve_sparsity else None
    k = config.n_clusters - 1 if config.preserve_sparsity else config.n_clusters
    if config.needs_calibration and stats is None:
        raise ConfigError(f"weighting={config.weighting!r} / compensation={config.compensation!r} need calibration data.")
    weights = None
    if config.weighting == "activation":
        weights = stats.sq_norm.to(w.device, torch.float32).expand(out, cols).reshape(rows.shape)
    centroids = kmeans_1d(rows, k, config.init, weights, mask, config.max_iter, config.seed)
    if config.compensation == "gptq":
        idx = gptq_assign(w, stats.hessian.to(w.device), centroids, None if mask is None else mask.reshape(out, cols))
    else:
        idx = assign(rows, centroids, mask).reshape(out, cols)
    if config.preserve_sparsity:
        centroids = torch.cat([torch.zeros_like(centroids[:, :1]), centroids], 1)
        idx = idx + 1  # -1 ("stays zero") becomes the zero cluster
    return centroids, idx


@register_handler(ClusterConfig)
def cluster_model(model: nn.Module, config: ClusterConfig, batches: list[torch.Tensor] | None) -> None:
    """Handler of ``hf_optim.cluster``: cluster every selected linear layer and attach its packed form."""
    targets = target_linears(model, config.include, config.exclude)
    _check_sizes(targets, config)

    def compress(_name: str, module: nn.Module, stats: InputStats | None) -> None:
        codebook, idx = cluster_weight(linear_weight(module), config, stats)
        _pack(module, codebook, idx, config.preserve_sparsity)

    if config.needs_calibration:
        if not batches:
            raise ConfigError(f"{config} needs calibration data: pass tokenizer=... and calibration_texts=[...].")
        compress_layerwise(model, batches, targets, compress, hessian=config.compensation == "gptq")
    else:
        for name, module in targets:
            compress(name, module, None)


class ClusteredWeight(nn.Module):
    """Parametrization ``weight = codebook[indices]``: the codebook ``[R, k]`` trains, the assignment is fixed.

    Registered by :func:`make_cluster_trainable`; ``parametrizations.weight.original`` is then the codebook. Its
    gradient is, through the indexing, the sum of the gradients of the weights in each cluster.
    """

    def __init__(self, indices: torch.Tensor, k: int, rows: int, zero_cluster: bool, transpose: bool) -> None:
        super().__init__()
        # the smallest dtype that holds k indices (an int64 copy per weight would double a model's memory)
        self.register_buffer("indices", indices.to(torch.uint8 if k <= 256 else torch.int32))
        keep = torch.ones(1, k)
        keep[0, 0] = 0.0 if zero_cluster else 1.0
        self.register_buffer("keep", keep)  # pins the zero cluster of a sparsity-preserving codebook at 0
        self.k, self.rows, self.zero_cluster, self.transpose = k, rows, zero_cluster, transpose

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        codebook = codebook * self.keep.to(codebook.dtype)
        idx = self.indices.long()
        weight = codebook[0][idx] if self.rows == 1 else codebook.gather(1, idx)
        return weight.t() if self.transpose else weight

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The codebook closest to a dense ``weight`` under the fixed assignment: each cluster's mean."""
        w = (weight.t() if self.transpose else weight).double()
        idx = self.indices.long()
        flat = (idx + torch.arange(self.rows, device=idx.device).unsqueeze(1) * self.k).reshape(-1)
        sums = torch.zeros(self.rows * self.k, dtype=torch.float64, device=w.device).index_add_(0, flat, w.reshape(-1))
        counts = torch.zeros_like(sums).index_add_(0, flat, torch.ones_like(w.reshape(-1)))
        # float64 sums of equal fp32 values are exact, so a weight that is already clustered maps to its codebook
        return (sums / counts.clamp_min(1)).reshape(self.rows, self.k).to(weight.dtype)


def _clustered(model: nn.Module) -> list[tuple[str, nn.Module, ClusteredWeight]]:
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            found += [(name, module, p) for p in module.parametrizations.weight if isinstance(p, ClusteredWeight)]
    return found


def make_cluster_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Make every clustered layer's codebook trainable with its assignment frozen; return the codebooks.

    Works on a model clustered by :func:`hf_optim.cluster` or loaded with :func:`hf_optim.load_optimized`. Pass
    the returned parameters to an optimizer (alone, or with other parameters such as norms). The packed form is
    dropped while training (it would go stale); call :func:`finalize_clusters` before saving.

    Example:
        >>> codebooks = make_cluster_trainable(model)  # doctest: +SKIP
        >>> optimizer = torch.optim.Adam(codebooks, lr=1e-4)  # doctest: +SKIP
    """
    for _name, module in model.named_modules():
        packed = getattr(module, PACKED_ATTR, None)
        if packed is None or packed.codec != CODEC:
            continue
        meta = packed.meta
        out, cols = meta["shape"]
        idx = unpack_bits(packed.tensors["indices"].cpu(), meta["bits"], out * cols).reshape(out, cols)
        rows = packed.tensors["codebook"].shape[0]
        clustered = ClusteredWeight(idx.to(module.weight.device), meta["k"], rows, meta["zero_cluster"], _is_conv1d(module))
        delattr(module, PACKED_ATTR)
        parametrize.register_parametrization(module, "weight", clustered)
    params = [module.parametrizations.weight.original for _name, module, _p in _clustered(model)]
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
        codebook = module.parametrizations.weight.original.detach() * clustered.keep.to(module.weight.dtype)
        idx = clustered.indices.long()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        _pack(module, codebook, idx, clustered.zero_cluster)
        names.append(name)
    return names
