"""The distributed-strategy layer: turn what ``accelerate launch --config_file X.yaml`` put in the environment into an
``Accelerator`` that really runs that strategy (DDP, FSDP2, DeepSpeed ZeRO 0-3, with or without offload), on GPUs and
on a CPU-only machine (gloo), and save a consolidated Hugging Face folder from any of them.

Accelerate silently degrades several strategies on CPU (FSDP becomes DDP, DeepSpeed gets a broken process group, fp16
becomes fp32, a MULTI_GPU config becomes N independent single-process jobs); :func:`build_accelerator` fixes what can
be fixed, refuses what cannot with a :class:`~hf_optim.core.errors.ConfigError`, and logs a warning wherever the run
differs from what the launch config says.

Example (inside a script started with ``accelerate launch --config_file accelerate_configs/zero3.yaml train.py``):
    >>> from hf_optim.training.accelerator import build_accelerator, check_model, save_consolidated_model
    >>> accelerator = build_accelerator(mixed_precision="bf16", gradient_accumulation_steps=4, max_grad_norm=1.0)
    >>> check_model(model, accelerator)                       # before prepare: bf16 trap, FSDP layer classes
    >>> model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    >>> ...                                                   # train
    >>> save_consolidated_model(accelerator, model, "outputs/final", tokenizer=tokenizer)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)

from hf_optim.core.errors import ConfigError, HfOptimError

logger = logging.getLogger(__name__)

MIXED_PRECISIONS = ("no", "bf16", "fp16", "fp8")
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# distributed_type values of an Accelerate config that hf_optim runs (MULTI_CPU starts one process, see cpu_multi.yaml).
SUPPORTED_DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")
STRATEGIES = (
    "single", "ddp", "fsdp2-full-shard", "fsdp2-no-reshard", "fsdp2-offload", "fsdp2-no-reshard-offload",
    "zero0", "zero1", "zero1-offload", "zero2", "zero2-offload", "zero3", "zero3-offload",
)
_CPU_MULTI_HINT = (
    "For N gloo ranks on CPU use `accelerate launch --config_file accelerate_configs/cpu_multi.yaml ...` "
    "(distributed_type MULTI_GPU + use_cpu) or `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
    "...`; `--cpu --num_processes N` and distributed_type MULTI_CPU start only one process without mpirun."
)

_DS_CONFIG_FILE_MESSAGE = (
    "{where}: hf_optim takes DeepSpeed settings from the accelerate config's deepspeed_config keys (zero_stage, "
    "offload_optimizer_device, offload_param_device, zero3_save_16bit_model) so that the recipe controls "
    "accumulation, clipping and precision; a separate DeepSpeed JSON is not supported "
    "(see accelerate_configs/zero2.yaml)."
)


class ConsolidationError(HfOptimError, RuntimeError):
    """Gathering the full model for saving produced missing or empty weights (the classic ZeRO-3 symptom)."""


@dataclasses.dataclass(frozen=True)
class _Strategy:
    """The strategy a launch asked for, normalised from the environment or from a config file."""

    kind: str  # "plain", "fsdp" or "deepspeed"
    zero_stage: int | None = None
    reshard_after_forward: bool = True
    offload: bool = False

    def name(self, world_size: int) -> str:
        if self.kind == "deepspeed":
            return f"zero{self.zero_stage}" + ("-offload" if self.offload else "")
        if self.kind == "fsdp":
            base = "fsdp2-full-shard" if self.reshard_after_forward else "fsdp2-no-reshard"
            if self.offload:
                return "fsdp2-offload" if self.reshard_after_forward else "fsdp2-no-reshard-offload"
            return base
        return "ddp" if world_size > 1 else "single"


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def _env_flag(name: str) -> bool:
    return _flag(os.environ.get(name, "false"))


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _warn(message: str) -> None:
    # Before the Accelerator exists only the env tells ranks apart; one copy of each warning is enough.
    if _is_main_rank():
        logger.warning(message)


def _has_gpu() -> bool:
    """A device Accelerate would pick for a multi-process run (MPS cannot run a process group)."""
    if not torch.accelerator.is_available():
        return False
    device = torch.accelerator.current_accelerator()
    return device is not None and device.type != "mps"


def _zero_stage(value: Any, source: str) -> int:
    try:
        stage = int(str(value))
    except ValueError:
        stage = None
    if stage not in ZERO_STAGES:
        raise ConfigError(
            f"DeepSpeed zero_stage={value!r} ({source}) is not a ZeRO stage; valid stages: {list(ZERO_STAGES)} "
            "(see accelerate_configs/zero1.yaml, zero2.yaml, zero3.yaml)."
        )
    return stage


def _offload_device(value: Any, key: str, source: str) -> str:
    device = str(value or "none").lower()
    if device not in OFFLOAD_DEVICES:
        raise ConfigError(f"DeepSpeed {key}={value!r} ({source}) is invalid; valid values: {list(OFFLOAD_DEVICES)}.")
    return device


def _fsdp_version(value: Any, source: str) -> None:
    if str(value) != "2":
        raise ConfigError(
            f"fsdp_version={value!r} ({source}): hf_optim only runs FSDP2 (torch fully_shard). FSDP1 silently trains "
            "nothing when the optimizer is built before prepare() without use_orig_params. Set `fsdp_version: 2` in "
            "the fsdp_config (see accelerate_configs/fsdp2_full_shard.yaml)."
        )


def _strategy_from_env() -> _Strategy:
    """Read what ``accelerate launch`` exported; raise ConfigError for strategies hf_optim does not run."""
    source = "from the accelerate launch environment"
    if _env_flag("ACCELERATE_USE_MEGATRON_LM"):
        raise ConfigError(
            f"distributed_type MEGATRON_LM is not supported by hf_optim; valid: {list(SUPPORTED_DISTRIBUTED_TYPES)}."
        )
    if _env_flag("ACCELERATE_USE_PARALLELISM_CONFIG"):
        raise ConfigError(
            "parallelism_config (tensor/context parallel, HSDP) is not supported by hf_optim; remove it from the "
            f"accelerate config. Valid strategies: {list(STRATEGIES)}."
        )
    use_deepspeed, use_fsdp = _env_flag("ACCELERATE_USE_DEEPSPEED"), _env_flag("ACCELERATE_USE_FSDP")
    if use_deepspeed and use_fsdp:
        raise ConfigError("The environment asks for both DeepSpeed and FSDP; an accelerate config picks one.")
    if use_deepspeed:
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if config_file != "none":
            raise ConfigError(_DS_CONFIG_FILE_MESSAGE.format(where=f"deepspeed_config_file={config_file!r}"))
        stage = _zero_stage(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"), source)
        offload_opt = _offload_device(
            os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"), "offload_optimizer_device", source
        )
        offload_param = _offload_device(
            os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"), "offload_param_device", source
        )
        return _Strategy("deepspeed", zero_stage=stage, offload=offload_opt != "none" or offload_param != "none")
    if use_fsdp:
        _fsdp_version(os.environ.get("FSDP_VERSION", "1"), source)
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")
        if reshard.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(
                f"fsdp_reshard_after_forward={reshard!r} ({source}): FSDP2 takes true (full shard, ZeRO-3-like) or "
                "false (ZeRO-2-like); FSDP1 sharding strategy names do not apply."
            )
        return _Strategy("fsdp", reshard_after_forward=_flag(reshard), offload=_env_flag("FSDP_OFFLOAD_PARAMS"))
    return _Strategy("plain")


def strategy_from_config_file(path: str | os.PathLike) -> str:
    """The strategy name (see :data:`STRATEGIES`) an Accelerate config file asks for, validating what hf_optim runs.

    Raises ConfigError for an unknown or unsupported ``distributed_type``, a ZeRO stage outside 0-3, an FSDP version
    other than 2, or an unknown offload device.

    Example:
        >>> strategy_from_config_file("accelerate_configs/zero2_offload.yaml")
        'zero2-offload'
    """
    import yaml

    source = f"in {path}"
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    distributed_type = str(config.get("distributed_type", "")).upper()
    if distributed_type not in SUPPORTED_DISTRIBUTED_TYPES:
        raise ConfigError(
            f"distributed_type={config.get('distributed_type')!r} {source} is not a strategy hf_optim runs; "
            f"valid: {list(SUPPORTED_DISTRIBUTED_TYPES)}."
        )
    if config.get("parallelism_config"):
        raise ConfigError(f"parallelism_config {source} (tensor/context parallel, HSDP) is not supported by hf_optim.")
    num_processes = int(config.get("num_processes", 1) or 1) * int(config.get("num_machines", 1) or 1)
    if distributed_type == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            where = f"deepspeed_config_file={ds['deepspeed_config_file']!r} {source}"
            raise ConfigError(_DS_CONFIG_FILE_MESSAGE.format(where=where))
        stage = _zero_stage(ds.get("zero_stage", 2), source)
        offload = (
            _offload_device(ds.get("offload_optimizer_device"), "offload_optimizer_device", source) != "none"
            or _offload_device(ds.get("offload_param_device"), "offload_param_device", source) != "none"
        )
        return _Strategy("deepspeed", zero_stage=stage, offload=offload).name(num_processes)
    if distributed_type == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        _fsdp_version(fsdp.get("fsdp_version", 1), source)
        reshard = fsdp.get("fsdp_reshard_after_forward", True)
        offload = _flag(fsdp.get("fsdp_offload_params"))
        return _Strategy("fsdp", reshard_after_forward=_flag(reshard), offload=offload).name(num_processes)
    return _Strategy("plain").name(num_processes)


def _check_mixed_precision(mixed_precision: str, on_cpu: bool) -> str:
    mixed_precision = str(mixed_precision).lower()
    if mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"mixed_precision={mixed_precision!r} is unknown; valid: {list(MIXED_PRECISIONS)}.")
    if mixed_precision == "fp16" and on_cpu:
        raise ConfigError(
            "mixed_precision='fp16' on CPU: Accelerate would silently train in fp32 (and DeepSpeed refuses it). "
            "Use mixed_precision='bf16' on CPU, or run on a GPU for fp16."
        )
    if mixed_precision == "fp8":
        if on_cpu or not torch.cuda.is_available():
            raise ConfigError(
                "mixed_precision='fp8' needs an NVIDIA GPU of compute capability >= 8.9 (Ada/Hopper); none is used "
                "here. Use mixed_precision='bf16'."
            )
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise ConfigError(
                f"mixed_precision='fp8' needs compute capability >= 8.9 (Ada/Hopper); this GPU has "
                f"{capability[0]}.{capability[1]} (Accelerate would silently fall back to fp16). Use 'bf16'."
            )
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(
                "mixed_precision='fp8' uses torchao's float8 training: `pip install torchao`, or use 'bf16'."
            )
    launch_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launch_precision not in ("no", mixed_precision):
        _warn(
            f"The accelerate config asks for mixed_precision={launch_precision!r}; the recipe's "
            f"mixed_precision={mixed_precision!r} is used instead."
        )
    return mixed_precision


def _deepspeed_plugin(gradient_accumulation_steps: int, max_grad_norm: float | None) -> DeepSpeedPlugin:
    # The recipe owns accumulation and clipping; values from the accelerate config that disagree are overridden.
    launch_accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launch_accum not in (None, "auto", str(gradient_accumulation_steps)):
        _warn(
            f"The accelerate config sets gradient_accumulation_steps={launch_accum}; the recipe's "
            f"{gradient_accumulation_steps} is used instead."
        )
    launch_clip = os.environ.get("ACCELERATE_GRADIENT_CLIPPING")
    if max_grad_norm is not None and launch_clip not in (None, "auto") and float(launch_clip) != float(max_grad_norm):
        _warn(
            f"The accelerate config sets gradient_clipping={launch_clip}; the recipe's {max_grad_norm} is used instead."
        )
    plugin = DeepSpeedPlugin(
        gradient_accumulation_steps=gradient_accumulation_steps,
        # 0 disables clipping in DeepSpeed; left None, Accelerate fills "auto" with 1.0.
        gradient_clipping=float(max_grad_norm) if max_grad_norm is not None else None,
    )
    if max_grad_norm is not None:
        plugin.deepspeed_config["gradient_clipping"] = float(max_grad_norm)
    zero = plugin.deepspeed_config["zero_optimization"]  # stage and devices were validated from the env already
    stage = int(zero["stage"])
    offload_param = str(zero.get("offload_param", {}).get("device", "none")).lower()
    if offload_param != "none" and stage != 3:
        raise ConfigError(
            f"offload_param_device={offload_param!r} needs zero_stage 3 (got {stage}); use offload_optimizer_device "
            "with stage 1/2, or zero3_offload.yaml."
        )
    if stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        _warn(
            "ZeRO-3 config has zero3_save_16bit_model false: turning it on, save_consolidated_model needs DeepSpeed to "
            "gather the partitioned weights (otherwise the saved weights are empty)."
        )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True
    return plugin


def build_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    seed: int = 42,
    project_dir: str | None = None,
    max_grad_norm: float | None = None,
) -> Accelerator:
    """An ``Accelerator`` that runs the strategy ``accelerate launch --config_file ...`` asked for, also on CPU.

    The recipe's ``mixed_precision`` and ``gradient_accumulation_steps`` (and, under DeepSpeed, ``max_grad_norm``,
    which DeepSpeed applies inside its engine; 0 disables clipping) win over the launch config, with a warning when
    they differ. Gradient accumulation uses ``GradientAccumulationPlugin(sync_with_dataloader=False)``, and the LR
    scheduler is NOT stepped by Accelerate (``step_scheduler_with_optimizer=False``): step it once per optimizer step,
    under ``if accelerator.sync_gradients:``, so a schedule of ``max_steps`` means the same on any number of ranks.
    ``seed`` is set identically on every rank so that every rank builds the same initial weights (FSDP2 shards each
    rank's local copy, it does not broadcast rank 0's).

    On a machine without GPUs: DDP and FSDP2 run over gloo (FSDP2 is forced; Accelerate would silently use DDP),
    DeepSpeed runs on its CPU accelerator with gloo; fp16 and fp8 raise ConfigError.

    Example:
        >>> accelerator = build_accelerator(mixed_precision="bf16", gradient_accumulation_steps=4, max_grad_norm=1.0)
        >>> strategy_name(accelerator)
        'fsdp2-full-shard'
    """
    if int(gradient_accumulation_steps) < 1:
        raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be >= 1.")
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ConfigError(f"max_grad_norm={max_grad_norm} must be >= 0 (0 disables clipping).")
    strategy = _strategy_from_env()
    launched = "LOCAL_RANK" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = _env_flag("ACCELERATE_USE_CPU") or not _has_gpu()
    mixed_precision = _check_mixed_precision(mixed_precision, on_cpu)

    kwargs: dict[str, Any] = dict(
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=int(gradient_accumulation_steps), sync_with_dataloader=False
        ),
        project_dir=project_dir,
        step_scheduler_with_optimizer=False,
        # seeded per epoch (set_epoch) so a resumed run sees the same batches in the same order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    force_fsdp = False
    if strategy.kind == "deepspeed":
        if not launched:
            raise ConfigError(
                "DeepSpeed is configured but the script was not started by a launcher (LOCAL_RANK is unset): run it "
                "with `accelerate launch --config_file accelerate_configs/zero2.yaml script.py`."
            )
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(int(gradient_accumulation_steps), max_grad_norm)
        if on_cpu:
            if _env_flag("ACCELERATE_USE_CPU"):
                # Accelerate drops DeepSpeed when cpu=True; DeepSpeed picks its CPU accelerator by itself.
                _warn("ACCELERATE_USE_CPU/--cpu is ignored under DeepSpeed (it runs on DeepSpeed's CPU accelerator).")
                os.environ.pop("ACCELERATE_USE_CPU")
            # Without gloo Accelerate finds no backend and every rank believes it is alone.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif strategy.kind == "fsdp":
        if not launched:
            raise ConfigError(
                "FSDP is configured but the script was not started by a launcher (LOCAL_RANK is unset): run it with "
                "`accelerate launch --config_file accelerate_configs/fsdp2_full_shard.yaml script.py`."
            )
        plugin = FullyShardedDataParallelPlugin()
        if on_cpu:
            kwargs["cpu"] = True
            force_fsdp = True
            if strategy.offload:
                from torch.distributed.fsdp import CPUOffloadPolicy

                # The default policy pins host memory, which needs a GPU ("Cannot access accelerator device").
                plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
                _warn(
                    "fsdp_offload_params on a CPU-only run: parameters already live in RAM, so offloading only moves "
                    "the optimizer step to the CPU path (unpinned memory)."
                )
        kwargs["fsdp_plugin"] = plugin
    elif on_cpu:
        kwargs["cpu"] = True
        if launched and world_size > 1 and not _env_flag("ACCELERATE_USE_CPU"):
            # A MULTI_GPU config on a machine without GPUs: a plain Accelerator() would run N unrelated processes.
            _warn(f"No GPU found: running the {world_size} launched processes as DDP over gloo on the CPU.")
        elif not launched and _env_flag("ACCELERATE_USE_CPU") and _is_main_rank():
            logger.info("Single CPU process. %s", _CPU_MULTI_HINT)

    if force_fsdp:
        # Accelerate only enters its FSDP branch for GPU-like distributed types; on CPU the state would say
        # MULTI_CPU and prepare() would wrap the model in DDP. Initialise the gloo process group as MULTI_CPU, then
        # present it as MULTI_GPU so AcceleratorState switches to FSDP (FSDP2's fully_shard runs fine on CPU/gloo).
        state = PartialState(cpu=True)
        if state.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        _warn("No GPU found: forcing Accelerate's FSDP2 path on the CPU over gloo (Accelerate alone would use DDP).")

    accelerator = Accelerator(**kwargs)
    if strategy.kind == "fsdp" and accelerator.distributed_type != DistributedType.FSDP:
        raise HfOptimError(f"FSDP was configured but Accelerate set up {accelerator.distributed_type}; please report.")
    if strategy.kind == "deepspeed" and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise HfOptimError(
            f"DeepSpeed was configured but Accelerate set up {accelerator.distributed_type}; please report."
        )
    if launched and accelerator.num_processes != world_size:
        raise HfOptimError(
            f"The launcher started {world_size} processes but Accelerate joined {accelerator.num_processes}. "
            + _CPU_MULTI_HINT
        )
    set_seed(seed, device_specific=False)
    if accelerator.is_main_process:
        logger.info(
            "Strategy %s on %d process(es), device %s, mixed_precision=%s, gradient_accumulation_steps=%d",
            strategy_name(accelerator), accelerator.num_processes, accelerator.device.type, mixed_precision,
            gradient_accumulation_steps,
        )
    return accelerator


def strategy_name(accelerator: Accelerator) -> str:
    """A short name of the running strategy for logs and benchmarks (one of :data:`STRATEGIES`).

    Example:
        >>> strategy_name(build_accelerator())  # under accelerate_configs/zero2_offload.yaml
        'zero2-offload'
    """
    distributed_type = accelerator.distributed_type
    if distributed_type == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offload = any(
            str(zero.get(key, {}).get("device", "none")).lower() != "none"
            for key in ("offload_optimizer", "offload_param")
        )
        strategy = _Strategy("deepspeed", zero_stage=int(zero.get("stage", 0)), offload=offload)
        return strategy.name(accelerator.num_processes)
    if distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        offload = plugin.cpu_offload is not None and type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
        return _Strategy("fsdp", reshard_after_forward=bool(plugin.reshard_after_forward), offload=offload).name(
            accelerator.num_processes
        )
    if distributed_type == DistributedType.NO or accelerator.num_processes == 1:
        return "single"
    return "ddp"


def _repeated_layer_classes(model: torch.nn.Module) -> list[str]:
    """Class names of the blocks stacked in the model's ModuleLists: the candidates for per-layer wrapping."""
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for child in module:
                names[type(child).__name__] = None
    return list(names)


def resolve_layer_classes(model: torch.nn.Module, names: list[str] | str | None = None) -> list[type[torch.nn.Module]]:
    """The module classes to wrap one FSDP unit each: ``names`` (class names; a comma-separated string is accepted),
    or else the model's ``_no_split_modules`` (entries absent from this model are dropped, as some architectures
    list variants). Raises ConfigError naming the missing class and the model's layer classes.

    Example:
        >>> resolve_layer_classes(llama_model)
        [<class 'transformers.models.llama.modeling_llama.LlamaDecoderLayer'>]
    """
    classes = {type(module).__name__: type(module) for module in model.modules()}
    candidates = _repeated_layer_classes(model)
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if names:
        missing = [name for name in names if name not in classes]
        if missing:
            raise ConfigError(
                f"FSDP transformer layer class {', '.join(missing)} (fsdp_transformer_layer_cls_to_wrap) is not in "
                f"{type(model).__name__}; its layer classes are {candidates} "
                f"(_no_split_modules: {list(getattr(model, '_no_split_modules', None) or [])})."
            )
        return [classes[name] for name in names]
    declared = list(getattr(model, "_no_split_modules", None) or [])
    found = [classes[name] for name in declared if name in classes]
    if not found:
        raise ConfigError(
            f"Cannot find the transformer layer class to wrap for FSDP in {type(model).__name__}: _no_split_modules="
            f"{declared} matches none of its modules. Set fsdp_transformer_layer_cls_to_wrap in the accelerate config "
            f"to one of its layer classes: {candidates}."
        )
    return found


def check_model(
    model: torch.nn.Module, accelerator: Accelerator, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Checks to run before ``accelerator.prepare``: warns about the bf16-without-mixed-precision trap, under FSDP2
    resolves the layer classes to wrap (ConfigError if they are not in the model), and under DeepSpeed optimizer
    offload keeps an optimizer DeepSpeed has no CPU version of.

    A model loaded in bf16/fp16 with ``mixed_precision='no'`` trains with half-precision weights AND optimizer states
    (small AdamW updates round away); under FSDP2 Accelerate only upcasts to fp32 when mixed precision is on.
    With ``offload_optimizer_device: cpu`` Accelerate swaps the optimizer for DeepSpeedCPUAdam, so an SGD silently
    becomes Adam; for optimizers other than Adam/AdamW/Adagrad this runs the recipe's optimizer on the CPU instead.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        >>> check_model(model, accelerator, optimizer)
        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    """
    half = sorted(
        {str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)}
    )
    if half and accelerator.mixed_precision == "no":
        _warn(
            f"The model has trainable {'/'.join(half)} parameters and mixed_precision='no' under "
            f"{strategy_name(accelerator)}: weights AND optimizer states stay in half precision, so small updates "
            "are lost. Load the model in float32 (dtype=torch.float32) and set mixed_precision='bf16'."
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
        if getattr(policy, "__name__", "") == "transformer_auto_wrap_policy":
            classes = resolve_layer_classes(model, plugin.transformer_cls_names_to_wrap)
            plugin.transformer_cls_names_to_wrap = [cls.__name__ for cls in classes]
    if optimizer is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        mappable = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)
        forced = ds_config.get("zero_force_ds_cpu_optimizer", True)
        if offload != "none" and not isinstance(optimizer, mappable) and forced:
            ds_config["zero_force_ds_cpu_optimizer"] = False
            _warn(
                f"{type(optimizer).__name__} under DeepSpeed optimizer offload: Accelerate would replace it with "
                "DeepSpeedCPUAdam; keeping it instead (it steps on the CPU partitions, slower than DeepSpeedCPUAdam)."
            )


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrap tensor subclasses that wrap one plain tensor (torchao's fp8 training weights) so safetensors can write them.

    Example:
        >>> plain_tensors({"w": torch.ones(2)})["w"]
        tensor([1., 1.])
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    plain = {}
    for name, tensor in state_dict.items():
        while is_traceable_wrapper_subclass(tensor):
            inner_names, _ = tensor.__tensor_flatten__()
            if len(inner_names) != 1:  # e.g. a quantized tensor (data + scale): not a wrapper around one tensor
                break
            tensor = getattr(tensor, inner_names[0])
        plain[name] = tensor
    return plain


def _empty_or_missing(state_dict: dict[str, torch.Tensor] | None, model: torch.nn.Module) -> str | None:
    if not state_dict:
        return "the gathered state dict is empty"
    empty = [name for name, tensor in state_dict.items() if tensor.numel() == 0]
    if empty:
        return f"{len(empty)} tensors are empty (zero-size), e.g. {empty[:3]}"
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - set(state_dict))
    if missing:
        return f"{len(missing)} parameters are missing, e.g. {missing[:3]}"
    return None


def save_consolidated_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
) -> Path:
    """Write one full Hugging Face folder (safetensors, config, tokenizer) from a model prepared under any strategy.

    Every rank must call it (gathering is collective). The weights are gathered (FSDP2 full state dict, DeepSpeed
    ZeRO-3 16-bit gather, which keeps the training dtype), checked for missing and empty tensors (ConsolidationError
    on every rank, never a silently empty checkpoint), written by the main process into ``<output_dir>.tmp-save``
    (a stale one is removed first) and moved to ``output_dir`` only when complete.

    Example:
        >>> save_consolidated_model(accelerator, model, "outputs/final", tokenizer=tokenizer)
        PosixPath('outputs/final')
        >>> AutoModelForCausalLM.from_pretrained("outputs/final")
    """
    output_dir = Path(output_dir)
    tmp_dir = output_dir.with_name(output_dir.name + ".tmp-save")
    state_dict = accelerator.get_state_dict(model)  # collective: all ranks
    if state_dict is not None:
        state_dict = plain_tensors(state_dict)
    unwrapped = accelerator.unwrap_model(model)
    error = None
    if accelerator.is_main_process:
        error = _empty_or_missing(state_dict, unwrapped)
        if error is None:
            try:
                if tmp_dir.exists():
                    shutil.rmtree(tmp_dir)
                unwrapped.save_pretrained(tmp_dir, state_dict=state_dict, is_main_process=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp_dir)
            except Exception as exc:  # reported to every rank below, so none waits forever
                error = f"writing {tmp_dir} failed: {type(exc).__name__}: {exc}"
    # Share the verdict so that all ranks raise together instead of the others hanging in a barrier.
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise ConsolidationError(
            f"Could not save a consolidated model to {output_dir} under {strategy_name(accelerator)}: {error}. Under "
            "ZeRO-3 the weights must be gathered (zero3_save_16bit_model: true); under FSDP2 pass the prepared model."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old_dir = output_dir.with_name(output_dir.name + ".old-save")
        if old_dir.exists():
            shutil.rmtree(old_dir)
        if output_dir.exists():
            os.replace(output_dir, old_dir)
        os.replace(tmp_dir, output_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return output_dir
