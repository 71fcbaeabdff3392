"""Quantization handlers: hf_optim's own int8/int4 weight-only formats, bitsandbytes and torchao.

Native (no extra dependency) — ``Int8WeightOnlyConfig`` and ``Int4WeightOnlyConfig``:
    int8 is symmetric (``[-127, 127]``, one fp16 scale per output channel or per group); int4 is asymmetric
    (codes ``[0, 15]``, per group of ``group_size`` inputs an fp16 scale and a 4-bit integer zero point), computed by
    round to nearest (``method="rtn"``) or by GPTQ with calibration data (``method="gptq"``, our own implementation in
    :mod:`~hf_optim.compression.algorithms.gptq`: no maintained GPTQ package installs beside torch 2.13 on CPU).
    The layer is stored as an ``"intn"`` :class:`~hf_optim.compression.storage.PackedWeight` (packed codes, fp16
    scales, packed zero points), so a saved int4 layer takes ~1/8 of its fp32 bytes plus the scales; the module's
    dense weight is set to exactly what the packed form decodes to, so the model keeps running in its own dtype
    (good for measuring quality; the speed comes from the backends below) and reloads bitwise equal.

bitsandbytes — ``BnbInt8Config`` (LLM.int8 with outlier threshold) and ``BnbInt4Config`` (NF4/FP4, double quant):
    the selected ``nn.Linear`` layers are replaced in place by ``bnb.nn.Linear8bitLt``/``Linear4bit`` and the model
    gets the matching ``transformers.BitsAndBytesConfig`` (+ its quantizer), so ``save_pretrained`` writes a folder
    that plain ``AutoModelForCausalLM.from_pretrained`` reloads quantized.

torchao — ``TorchAoInt8WeightOnlyConfig``, ``TorchAoInt8DynamicConfig``, ``TorchAoInt4WeightOnlyConfig``:
    ``torchao.quantization.quantize_`` with the configs that run on CPU (``Int8WeightOnlyConfig``,
    ``Int8DynamicActivationInt8WeightConfig``, ``IntxWeightOnlyConfig(int4, PerGroup)``; torchao's own
    ``Int4WeightOnlyConfig`` needs CUDA) and a ``transformers.TorchAoConfig`` on the model, so the folder reloads
    through ``from_pretrained`` (safetensors). ``Int8WeightOnlyConfig(backend="torchao")`` routes here too.

Layers not selected (``lm_head`` and embeddings by default) are listed in the backend config's skip list, so a
reload quantizes exactly the same layers.

Example:
    >>> import hf_optim
    >>> hf_optim.quantize(model, hf_optim.Int4WeightOnlyConfig(group_size=32, method="gptq"),
    ...                   tokenizer=tokenizer, calibration_texts=texts)  # doctest: +SKIP
    >>> hf_optim.save_optimized(model, "out/gptq-int4-g32")  # doctest: +SKIP
    >>> hf_optim.quantize(model, hf_optim.BnbInt4Config(quant_type="nf4"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from hf_optim.compression.algorithms import gptq, rtn
from hf_optim.compression.api import register_handler
from hf_optim.compression.calibration import InputStats, compress_layerwise
from hf_optim.compression.configs import (
    CompressionConfig,
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    register_config,
)
from hf_optim.compression.storage import PackedWeight, attach_packed, pack_bits, register_codec, unpack_bits
from hf_optim.compression.targets import linear_weight, target_linears
from hf_optim.core.errors import ConfigError

CODEC = "intn"
_INSTALL = {"bitsandbytes": "bitsandbytes==0.50.2", "torchao": "torchao==0.18.0"}
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------- optional-backend configs
@dataclasses.dataclass
class BnbInt8Config(CompressionConfig):
    """bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights, input features above ``threshold`` kept in fp16.

    Example:
        >>> BnbInt8Config(threshold=6.0).to_dict()["method"]
        'bnb_int8'
    """

    threshold: float = 6.0  # outlier threshold; 0 turns the mixed-precision decomposition off

    kind: ClassVar[str] = "quantize"
    method: ClassVar[str] = "bnb_int8"

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ConfigError(
                f"threshold={self.threshold} must be >= 0 (6.0 is LLM.int8's default; 0 disables outliers).")


@dataclasses.dataclass
class BnbInt4Config(CompressionConfig):
    """bitsandbytes 4-bit weights (``"nf4"`` or ``"fp4"``, blocks of 64), optionally double-quantized scales.

    Example:
        >>> BnbInt4Config(quant_type="fp4", double_quant=False).quant_type
        'fp4'
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"  # dtype of the matmul: "float32" | "bfloat16" | "float16"

    kind: ClassVar[str] = "quantize"
    method: ClassVar[str] = "bnb_int4"

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant_type={self.quant_type!r} must be 'nf4' or 'fp4'.")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype={self.compute_dtype!r} must be one of {list(_COMPUTE_DTYPES)}.")


@dataclasses.dataclass
class TorchAoInt8WeightOnlyConfig(CompressionConfig):
    """torchao int8 weight-only (per output channel, or per group of ``group_size`` inputs).

    Example:
        >>> TorchAoInt8WeightOnlyConfig().to_dict()["method"]
        'torchao_int8_weight_only'
    """

    group_size: int | None = None

    kind: ClassVar[str] = "quantize"
    method: ClassVar[str] = "torchao_int8_weight_only"

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size} must be >= 1 or None (per channel).")


@dataclasses.dataclass
class TorchAoInt8DynamicConfig(CompressionConfig):
    """torchao int8 dynamic activations (per token) times int8 weights (per channel): an int8 matmul.

    Example:
        >>> TorchAoInt8DynamicConfig().to_dict()["method"]
        'torchao_int8_dynamic'
    """

    kind: ClassVar[str] = "quantize"
    method: ClassVar[str] = "torchao_int8_dynamic"


@dataclasses.dataclass
class TorchAoInt4WeightOnlyConfig(CompressionConfig):
    """torchao int4 weight-only in groups of ``group_size`` inputs (``IntxWeightOnlyConfig``, runs on CPU).

    Example:
        >>> TorchAoInt4WeightOnlyConfig(group_size=32, symmetric=False).group_size
        32
    """

    group_size: int = 32
    symmetric: bool = True

    kind: ClassVar[str] = "quantize"
    method: ClassVar[str] = "torchao_int4_weight_only"

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size} must be >= 1.")


for _cls in (BnbInt8Config, BnbInt4Config, TorchAoInt8WeightOnlyConfig, TorchAoInt8DynamicConfig,
             TorchAoInt4WeightOnlyConfig):
    register_config(_cls.method, _cls)


# ---------------------------------------------------------------- shared checks
def _check_not_backend_quantized(model: nn.Module, config: CompressionConfig) -> None:
    # bnb's Linear8bitLt/Linear4bit subclass nn.Linear: quantizing them again would read packed integers as weights
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None or existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        raise ConfigError(
            f"{type(config).__name__}: the model is already quantized with {getattr(method, 'value', method)}; "
            "quantize the unquantized model instead (each quantization step needs float weights)."
        )


def _check_groups(targets: list[tuple[str, nn.Module]], group_size: int | None) -> None:
    for name, module in targets:
        in_features = linear_weight(module).shape[1]
        if group_size is not None and in_features % group_size:
            divisors = [d for d in range(2, in_features + 1) if in_features % d == 0]
            raise ConfigError(
                f"group_size={group_size} does not divide in_features={in_features} of layer {name!r}; use a "
                f"divisor of {in_features} (e.g. {divisors[:8]}) or exclude the layer."
            )


def _skip_list(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of the linear layers left alone, for the backend config (a reload then converts the same layers)."""
    chosen = {id(m) for _, m in targets}
    return [name for name, m in model.named_modules()
            if name and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and id(m) not in chosen]


# ---------------------------------------------------------------- native: "intn" codec
@register_codec(CODEC)
def decode_intn(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The float32 ``[out, in]`` weight of an ``"intn"`` packed weight: ``(q - zero) * scale`` per group."""
    out, cols = meta["shape"]
    bits, symmetric = meta["bits"], meta["symmetric"]
    offset = rtn.qrange(bits, symmetric)[0]  # codes are stored shifted to start at 0
    values = unpack_bits(tensors["values"].cpu(), bits, out * cols).reshape(out, cols) + offset
    zero = None if symmetric else unpack_bits(tensors["zero"].cpu(), bits, tensors["scale"].numel())
    return rtn.dequantize(rtn.QuantizedWeight(
        values, tensors["scale"].cpu(), None if zero is None else zero.reshape(tensors["scale"].shape), bits,
        meta["group_size"]))


def pack_quantized(q: rtn.QuantizedWeight) -> PackedWeight:
    """The ``"intn"`` packed form of quantized codes: ``bits``-bit codes and zero points, fp16 scales.

    Example:
        >>> packed = pack_quantized(rtn.quantize(torch.randn(8, 64), bits=4, group_size=32, symmetric=False))
        >>> {k: tuple(t.shape) for k, t in packed.tensors.items()}
        {'values': (256,), 'scale': (8, 2), 'zero': (8,)}
    """
    qmin = rtn.qrange(q.bits, q.symmetric)[0]
    tensors = {"values": pack_bits(q.values.cpu() - qmin, q.bits), "scale": q.scale.cpu().contiguous()}
    if q.zero is not None:
        tensors["zero"] = pack_bits(q.zero.cpu(), q.bits)
    meta = {"shape": list(q.values.shape), "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric}
    return PackedWeight(CODEC, tensors, meta)


@torch.no_grad()
def _store(module: nn.Module, q: rtn.QuantizedWeight) -> None:
    packed = pack_quantized(q)
    weight = linear_weight(module)
    weight.copy_(decode_intn(packed.tensors, packed.meta).to(weight.device))  # exactly what a reload decodes
    attach_packed(module, packed)


def _native_targets(model: nn.Module, config: CompressionConfig, group_size: int | None) -> list[tuple[str, nn.Module]]:
    _check_not_backend_quantized(model, config)
    targets = target_linears(model, config.include, config.exclude)
    _check_groups(targets, group_size)
    return targets


@register_handler(Int8WeightOnlyConfig)
def quantize_int8(model: nn.Module, config: Int8WeightOnlyConfig, batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """Handler of ``Int8WeightOnlyConfig``: symmetric int8 per channel/group (native), or torchao's int8."""
    if config.backend == "torchao":
        return _torchao_apply(model, TorchAoInt8WeightOnlyConfig(config.include, config.exclude, config.group_size))
    targets = _native_targets(model, config, config.group_size)
    for _, module in targets:
        _store(module, rtn.quantize(linear_weight(module), 8, config.group_size, symmetric=True))
    return {"quantized_layers": len(targets)}


@register_handler(Int4WeightOnlyConfig)
def quantize_int4(model: nn.Module, config: Int4WeightOnlyConfig, batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """Handler of ``Int4WeightOnlyConfig``: asymmetric int4 per group by round to nearest or GPTQ."""
    targets = _native_targets(model, config, config.group_size)
    if config.method == "rtn":
        for _, module in targets:
            _store(module, rtn.quantize(linear_weight(module), 4, config.group_size, symmetric=False))
        return {"quantized_layers": len(targets)}
    if not batches:
        raise ConfigError("Int4WeightOnlyConfig(method='gptq') needs calibration data: pass tokenizer=... and "
                          "calibration_texts=[...].")
    if not 0 < config.dampening < 1 or config.block_size < 1:
        raise ConfigError(f"dampening={config.dampening} must be in (0, 1) and block_size={config.block_size} >= 1.")

    def compress(name: str, module: nn.Module, stats: InputStats) -> None:
        try:
            q = gptq.gptq_quantize(linear_weight(module), stats.hessian.to(module.weight.device), 4, config.group_size,
                                   symmetric=False, block_size=config.block_size, dampening=config.dampening,
                                   act_order=config.act_order)
        except ValueError as exc:
            raise ConfigError(f"GPTQ on layer {name!r}: {exc}.") from exc
        _store(module, q)

    compress_layerwise(model, batches, targets, compress, hessian=True)
    return {"quantized_layers": len(targets)}


# ---------------------------------------------------------------- optional backends
@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    # the backends log import-time notes about CUDA libraries and Hub kernels that cannot exist on a CPU box
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _import_backend(package: str, config: CompressionConfig):
    try:
        with _quiet(package, f"{package}.backends.cpu.ops"):
            return importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(
            f"{type(config).__name__} needs the {package} package ({exc}); install it with "
            f"`pip install {_INSTALL[package]}` or `pip install 'hf-optim[quantization]'`."
        ) from exc


def _attach_quantizer(model: nn.Module, quantization_config: Any) -> None:
    """Give ``model`` what ``from_pretrained(..., quantization_config=...)`` would: the config and its quantizer."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # sets config.quantization_config and the is_quantized flags


class _DropFp16CastNote(logging.Filter):
    # LLM.int8 casts its inputs to fp16 by design; bitsandbytes logs that on every call of every layer
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


_FP16_CAST_NOTE = _DropFp16CastNote()


def _backend_targets(model: nn.Module, config: CompressionConfig) -> list[tuple[str, nn.Module]]:
    _check_not_backend_quantized(model, config)
    return target_linears(model, config.include, config.exclude)


@register_handler(BnbInt8Config)
@register_handler(BnbInt4Config)
@torch.no_grad()
def quantize_bnb(model: nn.Module, config: BnbInt8Config | BnbInt4Config, batches: list[torch.Tensor] | None
                 ) -> dict[str, Any]:
    """Handler of the bitsandbytes configs: swap the selected linears for bnb modules in place."""
    bnb = _import_backend("bitsandbytes", config)
    from transformers import BitsAndBytesConfig

    targets = _backend_targets(model, config)
    skip = _skip_list(model, targets)
    if isinstance(config, BnbInt8Config):
        qconfig = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.threshold, llm_int8_skip_modules=skip)
    else:
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=config.quant_type, bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype), llm_int8_skip_modules=skip,
        )
    for name, module in targets:
        weight = linear_weight(module).detach().contiguous()
        out_features, in_features = weight.shape
        device = weight.device
        has_bias = module.bias is not None
        if isinstance(config, BnbInt8Config):
            new = bnb.nn.Linear8bitLt(in_features, out_features, has_bias, has_fp16_weights=False,
                                      threshold=config.threshold, device="meta")
            new.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        else:
            new = bnb.nn.Linear4bit(in_features, out_features, has_bias, qconfig.bnb_4bit_compute_dtype,
                                    compress_statistics=config.double_quant, quant_type=config.quant_type,
                                    quant_storage=torch.uint8, device="meta")
            new.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=config.double_quant,
                                           quant_type=config.quant_type, quant_storage=torch.uint8,
                                           module=new).to(device)
        if has_bias:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        new.source_cls = type(module)  # what transformers records, for GPT-2's Conv1D
        new.train(module.training)  # bnb takes a different (dequantizing) path in training mode
        model.set_submodule(name, new)
    prepare_bnb_model(model)
    _attach_quantizer(model, qconfig)
    return {"quantized_layers": len(targets)}


def prepare_bnb_model(model: nn.Module) -> int:
    """Make a model with bitsandbytes layers run on CPU; return how many 4-bit layers left the AVX512-BF16 kernel.

    bitsandbytes 0.50 converts a ``Linear4bit`` to its AVX512-BF16 kernel's layout on the first eval forward on such
    a CPU and asserts ``out_features % 32 == 0`` and whole blocks per row — stories260K's 172-wide MLP crashes it;
    those layers take bitsandbytes' generic path instead. LLM.int8's per-call note about casting inputs to fp16 is
    silenced. Called after quantizing and by :func:`hf_optim.load_optimized` (plain ``from_pretrained`` does not).

    Example:
        >>> prepare_bnb_model(model)  # doctest: +SKIP
        10
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_FP16_CAST_NOTE)  # idempotent
        if getattr(module, "support_avx512bf16_for_cpu", False):
            if module.out_features % 32 or module.in_features % module.weight.blocksize:
                module.support_avx512bf16_for_cpu = False
                changed += 1
    return changed


def _torchao_apply(model: nn.Module, config: CompressionConfig) -> dict[str, Any]:
    ao = _import_backend("torchao", config)
    from torchao.quantization import granularity
    from transformers import TorchAoConfig

    targets = _backend_targets(model, config)
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"{type(config).__name__}: layer {name!r} is a {type(module).__name__}, and torchao quantizes "
                "nn.Linear only; use the native Int8WeightOnlyConfig/Int4WeightOnlyConfig or bitsandbytes for it."
            )
    q = ao.quantization
    if isinstance(config, TorchAoInt8WeightOnlyConfig):
        _check_groups(targets, config.group_size)
        ao_config = (q.Int8WeightOnlyConfig() if config.group_size is None
                     else q.Int8WeightOnlyConfig(granularity=granularity.PerGroup(config.group_size)))
    elif isinstance(config, TorchAoInt8DynamicConfig):
        ao_config = q.Int8DynamicActivationInt8WeightConfig()
    else:
        _check_groups(targets, config.group_size)
        mapping = q.MappingType.SYMMETRIC if config.symmetric else q.MappingType.ASYMMETRIC
        ao_config = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity.PerGroup(config.group_size),
                                           mapping_type=mapping)
    chosen = {id(m) for _, m in targets}
    q.quantize_(model, ao_config, filter_fn=lambda module, _fqn: id(module) in chosen)
    _attach_quantizer(model, TorchAoConfig(ao_config, modules_to_not_convert=_skip_list(model, targets)))
    return {"quantized_layers": len(targets)}


@register_handler(TorchAoInt8WeightOnlyConfig)
@register_handler(TorchAoInt8DynamicConfig)
@register_handler(TorchAoInt4WeightOnlyConfig)
def quantize_torchao(model: nn.Module, config: CompressionConfig, batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """Handler of the torchao configs: ``torchao.quantization.quantize_`` on the selected linears."""
    return _torchao_apply(model, config)
