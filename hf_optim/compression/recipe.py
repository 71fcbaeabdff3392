"""Compression recipes: an ordered list of steps (prune → cluster, prune → quantize, ...) that round-trips as YAML.

Example:
    >>> recipe = CompressionRecipe.from_yaml('''
    ... steps:
    ...   - {method: wanda, sparsity: 0.5, pattern: "2:4"}
    ...   - {method: int8_weight_only}
    ... ''')
    >>> [type(step).__name__ for step in recipe.steps]
    ['WandaConfig', 'Int8WeightOnlyConfig']
    >>> CompressionRecipe.from_yaml(recipe.to_yaml()) == recipe
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from hf_optim.compression.api import cluster, prune, quantize
from hf_optim.compression.configs import CompressionConfig, config_from_dict
from hf_optim.core.config import load_yaml
from hf_optim.core.errors import ConfigError

_VERBS = {"prune": prune, "quantize": quantize, "cluster": cluster}


@dataclasses.dataclass
class CompressionRecipe:
    """Steps applied in order, and how calibration data is sampled for the steps that need it."""

    steps: list[CompressionConfig]
    num_calibration_samples: int = 64
    calibration_seq_len: int = 256

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError("A compression recipe needs at least one step under `steps:`.")
        if self.num_calibration_samples < 1 or self.calibration_seq_len < 8:
            raise ConfigError("num_calibration_samples must be >= 1 and calibration_seq_len >= 8.")

    @property
    def needs_calibration(self) -> bool:
        return any(step.needs_calibration for step in self.steps)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionRecipe:
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ConfigError("A compression recipe is a mapping with a `steps:` list of {method: ..., ...} entries.")
        unknown = sorted(set(data) - {"steps", "num_calibration_samples", "calibration_seq_len"})
        if unknown:
            raise ConfigError(f"Unknown recipe key(s) {unknown}; use steps, num_calibration_samples, calibration_seq_len.")
        steps = []
        for index, step in enumerate(data["steps"], 1):
            if not isinstance(step, dict):
                raise ConfigError(f"Recipe step {index} must be a mapping like {{method: wanda, sparsity: 0.5}}, got {step!r}.")
            try:
                steps.append(config_from_dict(step))
            except ConfigError as exc:
                raise ConfigError(f"Recipe step {index}: {exc}") from exc
        rest = {k: v for k, v in data.items() if k != "steps"}
        return cls(steps=steps, **rest)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> CompressionRecipe:
        """Parse YAML text, or read it from a ``.yaml``/``.yml`` path."""
        text = str(text_or_path)
        if text.endswith((".yaml", ".yml")) and "\n" not in text:
            path = Path(text)
            if not path.is_file():
                raise ConfigError(f"Recipe file {text!r} does not exist.")
            text = path.read_text()
        try:
            return cls.from_dict(load_yaml(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"The recipe is not valid YAML: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [step.to_dict() for step in self.steps],
            "num_calibration_samples": self.num_calibration_samples,
            "calibration_seq_len": self.calibration_seq_len,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def apply(self, model, tokenizer=None, calibration_texts: Sequence[str] | None = None):
        """Run every step on ``model`` in place (checking up front that calibration data is there); return it."""
        if self.needs_calibration and (tokenizer is None or not calibration_texts):
            names = [step.method for step in self.steps if step.needs_calibration]
            raise ConfigError(f"Steps {names} need calibration data: pass calibration texts (--calibration-data FILE).")
        for step in self.steps:
            _VERBS[step.kind](
                model, step, tokenizer, calibration_texts if step.needs_calibration else None,
                num_calibration_samples=self.num_calibration_samples, calibration_seq_len=self.calibration_seq_len,
            )
        return model
