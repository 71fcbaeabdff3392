"""Training memory estimator: per-GPU and CPU bytes of a distributed strategy, and the cheapest one that fits.

Model states follow the ZeRO paper (Rajbhandari et al., 2020). With Ψ parameters, mixed-precision Adam keeps 2Ψ
bytes of 16-bit parameters, 2Ψ of 16-bit gradients and 12Ψ of optimizer states (fp32 master copy, m, v); fp32
training keeps 4Ψ + 4Ψ + 8Ψ. ZeRO-1 partitions the optimizer states over the Nd GPUs, ZeRO-2 the gradients too,
ZeRO-3 (and FSDP full shard) the parameters too. ``offload`` moves the optimizer states, and for ZeRO-3/FSDP the
parameters, to CPU memory. ``autocast`` (how Accelerate runs bf16/fp16 under DDP) instead keeps fp32 weights, fp32
gradients and 8Ψ of AdamW states, plus the 16-bit copies of the Linear weights autocast caches during the step.

Activations follow Korthikanti et al. (2022), whose GPT block stores s·b·h·(34 + 5·a·s/h) bytes at 16-bit,
recounted tensor by tensor for the Llama-style blocks of transformers 5 (RMSNorm, GQA attention, SwiGLU MLP, no
dropout) and checked against the tensors autograd really saves (tests/test_memory.py). Attention defaults to
transformers 5's default, ``sdpa``: with no padding mask its flash kernels keep q, k, v (at the KV heads' width), the
output and a logsumexp, never the a·s² scores that ``eager`` stores (fp32 softmax, plus a 16-bit copy in 16-bit
training). Activations are in the training dtype (a bf16 model, as DeepSpeed and FSDP mixed precision run it) with
transformers' fp32 upcasts (RMSNorm input, loss log-probabilities), plus the larger backward transient: the loss'
fp32 gradients or one block's recompute. Not counted: CUDA context, fragmentation, communication buckets and the
small per-block gradient buffers of backward; hence a strategy "fits" only under ``1 - HEADROOM`` of the GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_optim.core.config import load_yaml
from hf_optim.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
PRECISIONS = ("no", "bf16", "fp16", "fp8")
CHECKPOINTING = ("off", "selective", "full")  # weakest to strongest
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}  # fp32 tensors per parameter besides the master copy
ATTENTION = ("sdpa", "eager")
HEADROOM = 0.10
GIB = 1024**3
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the accounting needs to know about a causal LM; ``num_params`` counts tied weights once."""

    name: str
    model_type: str
    num_params: int
    linear_params: int  # parameters of nn.Linear modules: the weights autocast casts to 16-bit
    block_params: int  # parameters of the largest decoder block (what ZeRO-3/FSDP gathers at once)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool


def _choice(name: str, value: str, valid: tuple[str, ...] | dict) -> None:
    if value not in valid:
        raise ConfigError(f"Unknown {name} {value!r}; valid values: {', '.join(valid)}.")


def parse_memory_size(text: str) -> int:
    """Bytes in ``"80GiB"``, ``"24GB"``, ``"512 MiB"`` (GB = 10^9, GiB = 2^30).

    Example:
        >>> parse_memory_size("80GiB") == 80 * 2**30
        True
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"Cannot read GPU memory {text!r}: give a positive size with a unit, e.g. 80GiB or 24GB.")
    return int(float(match.group(1)) * _UNITS[unit])


def _load_config(spec: Any, trust_remote_code: bool) -> tuple[str, Any]:
    """(name, transformers config) from a config object, a config.json, a recipe YAML, a folder or a Hub id."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(spec, PretrainedConfig):
        return spec.model_type, spec
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"Recipe {str(path)!r} does not exist.")
        recipe = load_yaml(path.read_text()) or {}
        model, model_config = recipe.get("model"), recipe.get("model_config")
        if (model is None) == (model_config is None):
            raise ConfigError(f"Recipe {str(path)!r} must set exactly one of `model` and `model_config`.")
        trust_remote_code = trust_remote_code or bool(recipe.get("trust_remote_code", False))
        if model is not None:
            return _load_config(model, trust_remote_code)
        model_config = dict(model_config)
        if "model_type" not in model_config:
            raise ConfigError(f"`model_config` in {str(path)!r} needs a `model_type` (e.g. llama).")
        try:
            return f"{path.name}:model_config", AutoConfig.for_model(model_config.pop("model_type"), **model_config)
        except (ValueError, TypeError, StrictDataclassError) as exc:  # unknown model_type, or a badly typed field
            raise ConfigError(f"Bad `model_config` in {str(path)!r}: {exc}") from None
    try:
        return str(spec), AutoConfig.from_pretrained(str(spec), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Cannot load a model config from {str(spec)!r} ({exc}). Pass a Hub id, a model folder, a config.json "
            "or a recipe YAML with `model:` or `model_config:`."
        ) from None


def load_model_shape(spec: str | Path | PretrainedConfig, trust_remote_code: bool = False) -> ModelShape:
    """Count parameters exactly by building the model on the meta device (no weights are read or allocated).

    Example:
        >>> shape = load_model_shape("path/to/config.json")  # doctest: +SKIP
    """
    import torch

    from hf_optim.core.modeling import meta_model

    name, config = _load_config(spec, trust_remote_code)
    try:
        model = meta_model(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ConfigError(f"{name!r} is not a causal LM that transformers can build ({exc}).") from None
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    text = config.get_text_config()
    hidden, heads = text.hidden_size, text.num_attention_heads
    return ModelShape(
        name=name,
        model_type=config.model_type,
        num_params=sum(p.numel() for p in model.parameters()),  # parameters() yields a tied weight once
        linear_params=sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()),
        block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        num_layers=text.num_hidden_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        intermediate_size=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        vocab_size=text.vocab_size,
        gated_mlp=any(n.endswith(("gate_proj", "gate_up_proj", "w3")) for n, _ in model.named_modules()),
    )


def model_state_bytes(
    num_params: int, mixed_precision: str, optimizer: str, autocast: bool = False, linear_params: int = 0
) -> dict[str, int]:
    """Unpartitioned parameter, gradient and optimizer bytes of one replica (ZeRO paper accounting, or autocast).

    Example:
        >>> model_state_bytes(1000, "bf16", "adamw")
        {'parameters': 2000, 'gradients': 2000, 'optimizer_states': 12000}
    """
    states = OPTIMIZER_STATES[optimizer]
    if mixed_precision == "no" or autocast:  # autocast keeps fp32 weights plus a 16-bit copy of each Linear's
        return {"parameters": 4 * num_params + (2 * linear_params if autocast else 0), "gradients": 4 * num_params,
                "optimizer_states": 4 * states * num_params}
    # 16-bit (fp8 training keeps 16-bit weights and gradients too) + fp32 master copy + fp32 states
    return {"parameters": 2 * num_params, "gradients": 2 * num_params,
            "optimizer_states": 4 * (1 + states) * num_params}


def partition_states(
    states: dict[str, int], strategy: str, num_gpus: int, offload: bool, gathered_params: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(per-GPU, CPU per rank) model-state bytes; ``gathered_params`` is what ZeRO-3/FSDP unshards at once.

    Example:
        >>> gpu, cpu = partition_states({"parameters": 8, "gradients": 8, "optimizer_states": 48}, "zero2", 4, True, 0)
        >>> gpu, cpu["optimizer_states"]
        ({'parameters': 8, 'gradients': 2, 'optimizer_states': 0}, 12)
    """
    sharded = {"ddp": (), "zero1": ("optimizer_states",), "zero2": ("optimizer_states", "gradients")}.get(
        strategy, ("optimizer_states", "gradients", "parameters"))
    per_rank = {k: math.ceil(v / num_gpus) if k in sharded else v for k, v in states.items()}
    offloaded = ("optimizer_states", "parameters") if strategy in ("zero3", "fsdp") else ("optimizer_states",)
    offloaded = offloaded if offload else ()
    gpu = {k: 0 if k in offloaded else v for k, v in per_rank.items()}
    cpu = {k: v if k in offloaded else 0 for k, v in per_rank.items()}
    if "parameters" in sharded:  # the current and the prefetched block are gathered in full for compute
        gpu["parameters"] += min(states["parameters"] - gpu["parameters"], gathered_params)
    return gpu, cpu


def checkpointed_layers(num_layers: int, mode: str, every_n: int = 2) -> list[int]:
    """Indices of the decoder layers that recompute in backward: all for "full", every n-th (0, n, 2n...) for
    "selective", none for "off": Transformers' ``every_n_layers`` rule, which hf_optim.training.activations uses.

    Example:
        >>> checkpointed_layers(5, "selective", 2)
        [0, 2, 4]
    """
    return {"off": [], "full": list(range(num_layers)), "selective": list(range(0, num_layers, every_n))}[mode]


def activation_bytes(
    shape: ModelShape, batch_size: int, seq_len: int, mixed_precision: str = "bf16",
    checkpointing: str = "off", every_n: int = 2, attn_implementation: str = "sdpa", autocast: bool = False,
) -> dict[str, int]:
    """Activation bytes by part; their peak is :func:`peak_activations` (stored + the larger transient).

    Keys: ``layers`` and ``head`` (what the decoder blocks, resp. ids, rotary tables, final norm, logits and fp32
    log-probabilities keep for backward), ``loss_grad`` (fp32 gradients of log-probs and logits, alive together at
    the start of backward) and ``recompute`` (one checkpointed block re-run later in backward, after those are freed).
    """
    tokens = batch_size * seq_len
    a, f = (4 if mixed_precision == "no" else 2), 4  # stored activation dtype; fp32 upcasts of transformers
    h, hq, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    # RMSNorm: fp32 input, normalised x before the weight, output (the next Linear's input), fp32 1/rms. Under
    # autocast the residual stream stays fp32, so the norm keeps fp32 x and each Linear reading it saves its own cast.
    norm = 2 * f * h + f if autocast else f * h + 2 * a * h + f
    casts = a * h * (3 + (2 if shape.gated_mlp else 1)) if autocast else 0  # q, k, v, gate, up
    residual = f if autocast else a
    if attn_implementation == "sdpa":  # q, k, v, output (= o_proj input) and the fp32 logsumexp per head
        attn = a * (2 * hq + 2 * kv) + f * shape.num_heads
    else:  # q, repeated k and v (GQA), softmax in fp32 (+ 16-bit copy), o_proj input
        kv_used = hq if shape.num_kv_heads != shape.num_heads else kv
        attn = a * (2 * hq + 2 * kv_used) + (f + (a if a != f else 0)) * shape.num_heads * seq_len
    # SwiGLU: gate, act(gate), up, their product; plain MLP: fc output, act output
    mlp = (4 if shape.gated_mlp else 2) * a * shape.intermediate_size
    block = tokens * (2 * norm + casts + attn + mlp)
    checkpointed = len(checkpointed_layers(shape.num_layers, checkpointing, every_n))
    # a checkpointed block keeps only its input; an fp32 input *is* the first norm's saved input
    recompute = block - (tokens * f * h if residual == f else 0) if checkpointed else 0
    logits = f if autocast else a  # Accelerate's autocast wrapper returns fp32 outputs
    lm_head_cast = a * h if autocast else 0
    head = (tokens * (norm + lm_head_cast + shape.vocab_size * (logits + 4) + 2 * 8)  # logits, fp32 log-probs, ids
            + 2 * seq_len * shape.head_dim * residual)  # rotary cos/sin, shared by all blocks
    layers = checkpointed * tokens * residual * h + (shape.num_layers - checkpointed) * block
    return {"layers": layers, "head": head, "loss_grad": 2 * 4 * tokens * shape.vocab_size, "recompute": recompute}


def peak_activations(detail: dict[str, int]) -> int:
    """Peak of :func:`activation_bytes`: the stored activations plus the larger of the two backward transients."""
    return detail["layers"] + detail["head"] + max(detail["loss_grad"], detail["recompute"])


@dataclasses.dataclass
class MemoryEstimate:
    """Per-GPU and per-rank CPU bytes by category, with the settings and an optional recommendation."""

    model: ModelShape
    settings: dict[str, Any]
    gpu: dict[str, int]
    cpu: dict[str, int]
    activation_detail: dict[str, int]
    notes: list[str] = dataclasses.field(default_factory=list)
    recommendation: dict[str, Any] | None = None

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready structure (stable keys; all sizes in bytes)."""
        return {
            "inputs": dict(self.settings),
            "model": dataclasses.asdict(self.model),
            "per_gpu_bytes": {**self.gpu, "total": self.gpu_total},
            "cpu_per_rank_bytes": {**self.cpu, "total": self.cpu_total},
            "cpu_all_ranks_bytes": self.cpu_total * self.settings["num_gpus"],
            "activation_detail_bytes": dict(self.activation_detail),
            "notes": list(self.notes),
            "recommendation": self.recommendation,
        }

    def format_table(self) -> str:
        """Human-readable table in GiB."""
        s, m = self.settings, self.model
        label = s["strategy"] + (" + offload" if s["offload"] else "")
        lines = [
            f"Model: {m.name}  ({m.num_params:,} parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
            f"vocab {m.vocab_size})",
            f"Setup: {label} on {s['num_gpus']} GPU(s), micro-batch {s['batch_size']} x {s['seq_len']} tokens, "
            f"precision {s['mixed_precision']}, {s['optimizer']}, checkpointing {s['gradient_checkpointing']}, "
            f"{s['attn_implementation']} attention" + (", autocast" if s["autocast"] else ""),
            "",
            f"{'GiB':<18}{'per GPU':>12}{'CPU per rank':>14}",
        ]
        for key in CATEGORIES:
            lines.append(f"{key.replace('_', ' '):<18}{self.gpu[key] / GIB:>12.2f}{self.cpu[key] / GIB:>14.2f}")
        lines.append(f"{'total':<18}{self.gpu_total / GIB:>12.2f}{self.cpu_total / GIB:>14.2f}")
        if self.cpu_total:
            lines.append(f"CPU memory for all {s['num_gpus']} ranks: {self.cpu_total * s['num_gpus'] / GIB:.2f} GiB")
        lines.append("Not counted: CUDA context, fragmentation, communication buckets (keep the headroom).")
        lines += self.notes
        if self.recommendation is not None:
            lines += ["", self.recommendation["message"]]
        return "\n".join(lines)


def _validate(settings: dict[str, Any]) -> dict[str, Any]:
    s = dict(settings)
    s["mixed_precision"] = "no" if s["mixed_precision"] == "fp32" else s["mixed_precision"]
    _choice("strategy", s["strategy"], STRATEGIES)
    _choice("mixed precision", s["mixed_precision"], PRECISIONS)
    _choice("gradient checkpointing mode", s["gradient_checkpointing"], CHECKPOINTING)
    _choice("optimizer", s["optimizer"], OPTIMIZER_STATES)
    _choice("attention implementation", s["attn_implementation"], ATTENTION)
    for key in ("num_gpus", "batch_size", "seq_len", "checkpoint_every_n_layers"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise ConfigError(f"{key}={s[key]!r} must be an integer >= 1.")
    if s["autocast"] and (s["strategy"] != "ddp" or s["mixed_precision"] == "no"):
        raise ConfigError("autocast describes DDP with bf16/fp16 (DeepSpeed and FSDP run a 16-bit model copy); "
                          "use it with --strategy ddp --mixed-precision bf16, or drop it.")
    if s["offload"] and s["strategy"] == "ddp":
        raise ConfigError("Offload needs a ZeRO or FSDP strategy (ddp keeps everything on the GPU); "
                          "use e.g. --strategy zero2 --offload.")
    return s


def _estimate(shape: ModelShape, s: dict[str, Any]) -> MemoryEstimate:
    states = model_state_bytes(shape.num_params, s["mixed_precision"], s["optimizer"], s["autocast"],
                               shape.linear_params)
    param_bytes = states["parameters"] // max(shape.num_params, 1)  # 2 (16-bit) or 4 (fp32)
    gathered = 2 * shape.block_params * param_bytes
    gpu, cpu = partition_states(states, s["strategy"], s["num_gpus"], s["offload"], gathered)
    detail = activation_bytes(shape, s["batch_size"], s["seq_len"], s["mixed_precision"], s["gradient_checkpointing"],
                              s["checkpoint_every_n_layers"], s["attn_implementation"], s["autocast"])
    gpu["activations"], cpu["activations"] = peak_activations(detail), 0
    notes = [] if shape.gated_mlp else [  # the per-tensor count was checked on Llama, Mistral and Qwen2 blocks
        f"Activations are counted for Llama-style blocks (RMSNorm, gated MLP); for {shape.model_type} blocks they are "
        "only an approximation (e.g. GPT-2's python GELU saves more)."]
    return MemoryEstimate(shape, s, gpu, cpu, detail, notes)


def recommend(shape: ModelShape, settings: dict[str, Any], gpu_memory: int) -> dict[str, Any]:
    """The cheapest (strategy, offload, checkpointing) whose per-GPU estimate fits ``(1 - HEADROOM) * gpu_memory``.

    Speed order: ddp < zero1 < zero2 < zero3/fsdp < zero2+offload < zero3+offload; checkpointing at least as strong
    as requested is tried only when no strategy fits without it.
    """
    usable = int(gpu_memory * (1 - HEADROOM))
    full_shard = "fsdp" if settings["strategy"] == "fsdp" else "zero3"
    tiers = [("ddp", False), ("zero1", False), ("zero2", False), (full_shard, False), ("zero2", True),
             (full_shard, True)]
    modes = CHECKPOINTING[CHECKPOINTING.index(settings["gradient_checkpointing"]):]
    tried = []
    for mode in modes:
        for strategy, offload in tiers:
            s = {**settings, "strategy": strategy, "offload": offload, "gradient_checkpointing": mode,
                 "autocast": settings["autocast"] and strategy == "ddp"}
            total = _estimate(shape, s).gpu_total
            tried.append({"strategy": strategy, "offload": offload, "gradient_checkpointing": mode,
                          "gpu_bytes": total, "fits": total <= usable})
            if total <= usable:
                label = strategy + (" + offload" if offload else "")
                message = (f"Cheapest that fits {gpu_memory / GIB:.1f} GiB per GPU ({usable / GIB:.1f} GiB usable "
                           f"after {HEADROOM:.0%} headroom): {label}, checkpointing {mode}, "
                           f"{total / GIB:.2f} GiB per GPU.")
                return {"fits": True, "strategy": strategy, "offload": offload, "gradient_checkpointing": mode,
                        "gpu_bytes": total, "gpu_memory_bytes": gpu_memory, "usable_bytes": usable,
                        "message": message, "tried": tried}
    smallest = min(tried, key=lambda t: t["gpu_bytes"])
    label = smallest["strategy"] + (" + offload" if smallest["offload"] else "")
    message = (f"Nothing fits {gpu_memory / GIB:.1f} GiB per GPU ({usable / GIB:.1f} GiB usable): the smallest, "
               f"{label} with {smallest['gradient_checkpointing']} checkpointing, needs "
               f"{smallest['gpu_bytes'] / GIB:.2f} GiB. Use more GPUs, a smaller micro-batch or shorter sequences.")
    return {"fits": False, "strategy": None, "offload": None, "gradient_checkpointing": None, "gpu_bytes": None,
            "gpu_memory_bytes": gpu_memory, "usable_bytes": usable, "message": message, "tried": tried}


def estimate_memory(
    model: str | Path | PretrainedConfig, strategy: str = "ddp", *, offload: bool = False, num_gpus: int = 1,
    batch_size: int = 1, seq_len: int = 2048, gradient_checkpointing: str = "off", checkpoint_every_n_layers: int = 2,
    mixed_precision: str = "bf16", optimizer: str = "adamw", attn_implementation: str = "sdpa", autocast: bool = False,
    gpu_memory: str | int | None = None, trust_remote_code: bool = False,
) -> MemoryEstimate:
    """Estimate per-GPU and CPU training memory of ``model`` (Hub id, folder, config.json, recipe YAML or config).

    ``gpu_memory`` ("80GiB", "24GB" or bytes) adds a recommendation: the cheapest strategy that fits. ``autocast``
    models DDP under torch autocast (fp32 weights), as Accelerate runs it, instead of a 16-bit model copy.

    Example:
        >>> est = estimate_memory("path/to/config.json", "zero3", num_gpus=8, gpu_memory="80GiB")  # doctest: +SKIP
        >>> print(est.format_table())  # doctest: +SKIP
        >>> est.to_dict()["per_gpu_bytes"]["total"]  # doctest: +SKIP
    """
    settings = _validate({
        "strategy": strategy, "offload": offload, "num_gpus": num_gpus, "batch_size": batch_size,
        "seq_len": seq_len, "gradient_checkpointing": gradient_checkpointing,
        "checkpoint_every_n_layers": checkpoint_every_n_layers, "mixed_precision": mixed_precision,
        "optimizer": optimizer, "attn_implementation": attn_implementation, "autocast": autocast,
    })
    memory = gpu_memory if gpu_memory is None or isinstance(gpu_memory, int) else parse_memory_size(gpu_memory)
    if memory is not None and memory < 1:
        raise ConfigError(f"gpu_memory={gpu_memory!r} must be positive, e.g. 80GiB.")
    shape = load_model_shape(model, trust_remote_code)
    result = _estimate(shape, settings)
    result.settings["gpu_memory_bytes"] = memory
    if memory is not None:
        result.recommendation = recommend(shape, settings, memory)
    return result


def estimate_memory_cli(args: argparse.Namespace) -> int:
    """Handler of ``hf-optim estimate-memory``; exit code 1 when ``--gpu-memory`` is given and nothing fits.

    Example:
        $ hf-optim estimate-memory config.json --strategy zero2 --num-gpus 4 --gpu-memory 24GB --json
    """
    result = estimate_memory(
        args.model, args.strategy.lower(), offload=args.offload, num_gpus=args.num_gpus,
        batch_size=args.batch_size, seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every_n_layers=args.checkpoint_every_n_layers, mixed_precision=args.mixed_precision,
        optimizer=args.optimizer.lower(), attn_implementation=args.attn_implementation, autocast=args.autocast,
        gpu_memory=args.gpu_memory, trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_table())
    return 1 if result.recommendation is not None and not result.recommendation["fits"] else 0
