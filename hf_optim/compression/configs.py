"""Config objects of every compression technique: one dataclass per method, validated before any weight is touched.

Each verb takes one of these (``hf_optim.prune(model, WandaConfig(sparsity=0.5, pattern="2:4"))``); a small registry
in :mod:`hf_optim.compression.api` maps the config type to the code that applies it. Every config carries
``include``/``exclude`` glob patterns over module names; by default ``lm_head`` and embeddings are left alone.

Example:
    >>> cfg = WandaConfig(sparsity=0.5, pattern="2:4")
    >>> cfg.nm
    (2, 4)
    >>> config_from_dict({"method": "wanda", "sparsity": 0.5}) == WandaConfig(sparsity=0.5)
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from hf_optim.core.errors import ConfigError

DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*wte", "*wpe")


@dataclasses.dataclass
class CompressionConfig:
    """Fields shared by every technique: which modules it touches."""

    include: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    exclude: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_EXCLUDE))

    kind: ClassVar[str] = ""  # "prune" | "quantize" | "cluster": which verb applies it
    method: ClassVar[str] = ""  # the name used in recipes
    needs_calibration: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping with ``method`` first, as it appears in a recipe YAML."""
        return {"method": self.method, **dataclasses.asdict(self)}


def _check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"{name}={sparsity} must be in [0, 1); e.g. 0.5 removes half the weights.")


def _parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    if pattern is None:
        return None
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise ConfigError(f"pattern={pattern!r} is not an N:M pattern like '2:4' or '4:8'.") from None
    if not 0 < n < m:
        raise ConfigError(f"pattern={pattern!r} needs 0 < N < M (keep N of every M weights), e.g. '2:4'.")
    return n, m


@dataclasses.dataclass
class _PruneConfig(CompressionConfig):
    sparsity: float = 0.5
    pattern: str | None = None  # semi-structured "N:M": keep N of every M consecutive input weights

    kind: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        self.nm = _parse_pattern(self.pattern)
        if self.nm is None:
            _check_sparsity(self.sparsity)

    @property
    def target_sparsity(self) -> float:
        """The fraction of weights removed: ``1 - N/M`` for an N:M pattern, else ``sparsity``."""
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else self.sparsity


@dataclasses.dataclass
class MagnitudeConfig(_PruneConfig):
    """Remove the smallest-|w| weights, per layer (``scope="layer"``) or in one global ranking (``"global"``)."""

    scope: str = "layer"
    method: ClassVar[str] = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope={self.scope!r} must be 'layer' or 'global'.")
        if self.scope == "global" and self.nm:
            raise ConfigError("An N:M pattern is per row by definition; use scope='layer' with it.")


@dataclasses.dataclass
class WandaConfig(_PruneConfig):
    """Wanda (Sun et al. 2023): remove weights with the smallest |W|·‖X‖ per output row; needs calibration data."""

    method: ClassVar[str] = "wanda"
    needs_calibration: ClassVar[bool] = True


@dataclasses.dataclass
class SparseGPTConfig(_PruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): prune with second-order (OBS) error compensation; needs calibration."""

    block_size: int = 128
    dampening: float = 0.01

    method: ClassVar[str] = "sparsegpt"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1 or not 0 < self.dampening < 1:
            raise ConfigError(f"block_size={self.block_size} must be >= 1 and dampening={self.dampening} in (0, 1).")


@dataclasses.dataclass
class StructuredPruneConfig(CompressionConfig):
    """Remove whole attention heads (whole KV groups under GQA) and MLP channels; the model really shrinks."""

    heads_fraction: float = 0.0  # share of KV-head groups removed in every layer
    mlp_fraction: float = 0.25  # share of MLP intermediate channels removed in every layer
    importance: str = "magnitude"  # "magnitude" (weight norms) or "activation" (needs calibration data)

    kind: ClassVar[str] = "prune"
    method: ClassVar[str] = "structured"

    def __post_init__(self) -> None:
        _check_sparsity(self.heads_fraction, "heads_fraction")
        _check_sparsity(self.mlp_fraction, "mlp_fraction")
        if self.importance not in ("magnitude", "activation"):
            raise ConfigError(f"importance={self.importance!r} must be 'magnitude' or 'activation'.")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.importance == "activation"


@dataclasses.dataclass
class ClusterConfig(CompressionConfig):
    """k-means weight sharing: each weight becomes one of ``n_clusters`` centroids (per tensor or per output row)."""

    n_clusters: int = 16
    init: str = "kmeans++"  # "linear" | "density" | "random" | "kmeans++"
    per_channel: bool = True
    row_scale: bool = False  # with per_channel=False: the shared codebook is scaled per output row (+2 bytes a row)
    preserve_sparsity: bool = False  # zeros stay exactly zero (their own cluster)
    max_iter: int = 30
    seed: int = 0
    weighting: str = "none"  # "activation": weigh each weight's error by ‖X_j‖² of its input (needs calibration)
    compensation: str = "none"  # "gptq": assign columns in turn, spreading errors over the rest (needs calibration)

    kind: ClassVar[str] = "cluster"
    method: ClassVar[str] = "kmeans"

    def __post_init__(self) -> None:
        if not 2 <= self.n_clusters <= 65536:
            raise ConfigError(f"n_clusters={self.n_clusters} must be in [2, 65536].")
        if self.init not in ("linear", "density", "random", "kmeans++"):
            raise ConfigError(f"init={self.init!r} must be one of 'linear', 'density', 'random', 'kmeans++'.")
        if self.max_iter < 1:
            raise ConfigError(f"max_iter={self.max_iter} must be >= 1.")
        if self.weighting not in ("none", "activation"):
            raise ConfigError(f"weighting={self.weighting!r} must be 'none' or 'activation'.")
        if self.compensation not in ("none", "gptq"):
            raise ConfigError(f"compensation={self.compensation!r} must be 'none' or 'gptq'.")
        if self.row_scale and self.per_channel:
            raise ConfigError("row_scale=True scales one shared codebook per row; set per_channel=False with it.")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.weighting != "none" or self.compensation != "none"


@dataclasses.dataclass
class Int8WeightOnlyConfig(CompressionConfig):
    """Symmetric int8 weights, one scale per output channel (``group_size=None``) or per group of inputs."""

    group_size: int | None = None
    backend: str = "native"  # "native" (hf_optim's packed format) or "torchao"

    kind: ClassVar[str] = "quantize"
    method: ClassVar[str] = "int8_weight_only"

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size} must be >= 1 or None (per channel).")
        if self.backend not in ("native", "torchao"):
            raise ConfigError(f"backend={self.backend!r} must be 'native' or 'torchao'.")


@dataclasses.dataclass
class Int4WeightOnlyConfig(CompressionConfig):
    """Asymmetric int4 weights in groups of ``group_size`` inputs; ``method="rtn"`` or calibrated ``"gptq"``."""

    group_size: int = 128
    method: str = "rtn"  # "rtn" (round to nearest) | "gptq" (needs calibration data)
    dampening: float = 0.01
    block_size: int = 128
    act_order: bool = False  # GPTQ only: quantize inputs by decreasing Hessian diagonal (with static groups)

    kind: ClassVar[str] = "quantize"

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size} must be >= 1.")
        if self.method not in ("rtn", "gptq"):
            raise ConfigError(f"method={self.method!r} must be 'rtn' or 'gptq'.")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method == "gptq"

    def to_dict(self) -> dict[str, Any]:
        return {"method": "int4_weight_only", "algorithm": self.method, **{
            k: v for k, v in dataclasses.asdict(self).items() if k != "method"}}


CONFIG_TYPES: dict[str, type[CompressionConfig]] = {
    cls.method: cls
    for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig, StructuredPruneConfig, ClusterConfig, Int8WeightOnlyConfig)
}
CONFIG_TYPES["int4_weight_only"] = Int4WeightOnlyConfig


def register_config(name: str, cls: type[CompressionConfig]) -> None:
    """Make ``cls`` reachable from recipes as ``method: name`` (used by optional backends such as bitsandbytes)."""
    CONFIG_TYPES[name] = cls


def config_from_dict(data: dict[str, Any]) -> CompressionConfig:
    """Build a config from a recipe step mapping ``{"method": "wanda", "sparsity": 0.5, ...}``."""
    data = dict(data)
    name = data.pop("method", None)
    cls = CONFIG_TYPES.get(name)
    if cls is None and name is not None:
        import importlib

        importlib.import_module("hf_optim.compression.quantization")  # registers the bitsandbytes/torchao configs
        cls = CONFIG_TYPES.get(name)
    if cls is None:
        raise ConfigError(f"Unknown compression method {name!r}; known: {sorted(CONFIG_TYPES)}.")
    if cls is Int4WeightOnlyConfig and "algorithm" in data:
        data["method"] = data.pop("algorithm")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no option(s) {unknown}; options are {sorted(fields)}.")
    return cls(**data)
