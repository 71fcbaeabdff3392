"""The training recipe's configuration: one flat dataclass, loaded from YAML plus ``key=value`` overrides.

Example:
    >>> from hf_optim.training.config import TrainConfig
    >>> cfg = TrainConfig.load(None, ["model_config.model_type=llama", "train_files=[a.txt]", "max_steps=10"])
    >>> cfg.max_steps
    10
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from hf_optim.core.config import config_to_yaml, load_config
from hf_optim.core.errors import ConfigError

MixedPrecision = Literal["no", "bf16", "fp16", "fp8"]
CheckpointingMode = Literal["off", "full", "selective"]


@dataclasses.dataclass
class TrainConfig:
    """Everything ``recipes/train_clm.py`` needs; the distributed strategy comes from the Accelerate config."""

    # --- model: a Hub id or local folder, or a config dict for random initialisation ---
    model: str | None = None
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None  # defaults to `model`
    trust_remote_code: bool = False
    # --- data: local text/JSON(L) files or a Hub dataset ---
    train_files: list[str] = dataclasses.field(default_factory=list)
    dataset_name: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"
    validation_split: float = 0.05
    block_size: int = 256
    # --- optimisation ---
    seed: int = 42
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None  # if set, gradient_accumulation_steps is derived from it
    max_steps: int = 100
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 10
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0  # 0 disables clipping
    # --- memory ---
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: CheckpointingMode = "off"
    checkpoint_every_n_layers: int = 2  # with gradient_checkpointing=selective
    activation_offload: bool = False
    # --- gradual magnitude pruning during training (off unless pruning_final_sparsity is set) ---
    pruning_final_sparsity: float | None = None
    pruning_initial_sparsity: float = 0.0
    pruning_begin_step: int = 0
    pruning_end_step: int | None = None  # defaults to 80% of max_steps, so the last steps heal the pruned model
    pruning_frequency: int = 10  # steps between mask updates; masks stay fixed in between
    pruning_pattern: str | None = None  # e.g. "2:4"
    # --- checkpoints, evaluation, logging ---
    output_dir: str = "outputs/train_clm"
    save_every_n_steps: int = 0  # 0 = only at the end
    keep_last_k: int = 2
    resume_from: str | None = None  # a checkpoint folder or "latest"
    eval_every_n_steps: int = 0  # 0 = only at the end
    eval_max_batches: int = 50
    log_every_n_steps: int = 10

    def __post_init__(self) -> None:
        if (self.model is None) == (self.model_config is None):
            raise ConfigError("Set exactly one of `model` (Hub id or folder) and `model_config` (random init).")
        if self.model_config is not None and "model_type" not in self.model_config:
            raise ConfigError("model_config needs a model_type, e.g. model_config.model_type=llama.")
        if not self.train_files and self.dataset_name is None:
            raise ConfigError("No training data: set `train_files=[...]` or `dataset_name=...`.")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "block_size", "keep_last_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping).")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"validation_split={self.validation_split} must be in [0, 1).")
        if self.checkpoint_every_n_layers < 1:
            raise ConfigError(f"checkpoint_every_n_layers={self.checkpoint_every_n_layers} must be >= 1.")

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
        """Read a recipe YAML (or nothing) and apply ``key=value`` overrides."""
        return load_config(cls, path, overrides)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank, derived from ``global_batch_size`` when that is set."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size "
                f"({self.micro_batch_size}) x processes ({world_size}) = {per_step}; pick a multiple of {per_step}."
            )
        return self.global_batch_size // per_step

    def to_yaml(self) -> str:
        """YAML text that :meth:`load` turns back into an equal config."""
        return config_to_yaml(self)
