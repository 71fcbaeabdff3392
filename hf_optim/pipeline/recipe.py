"""The optimize recipe: which variants to build, on which data they are measured, and the quality budget.

A variant is a name and an ordered list of steps. A step is a compression config mapping (``{method: wanda,
sparsity: 0.5}``, see :mod:`hf_optim.compression.configs`), an export mapping (``{export: onnx}``,
``{export: onnx_quantize, mode: dynamic-int8}``, ``{export: tflite, quantize: dynamic-int8}``), or a preset name.
Presets chain with ``+``: ``wanda-2:4+int8`` is Wanda 2:4 pruning, then int8 weight-only quantization.

| preset | steps |
|---|---|
| ``int8`` | int8 weight-only (hf_optim's packed format) |
| ``int4-g<N>`` | int4 weight-only, groups of N inputs |
| ``int8-bnb`` / ``nf4-bnb`` | bitsandbytes LLM.int8 / NF4 |
| ``magnitude-<P>``, ``wanda-<P>``, ``sparsegpt-<P>`` | prune P% of the weights (``-N:M`` for a semi-structured pattern) |
| ``cluster-<K>`` | k-means weight sharing with K clusters per output row |
| ``onnx-fp32`` / ``onnx-int8`` / ``onnx-int4`` | ONNX export with KV cache (then ONNX Runtime dynamic int8 / int4) |
| ``tflite-fp32`` / ``tflite-int8`` | TFLite (LiteRT) export, float or dynamic int8 |

The recipe round-trips as YAML (variants normalised to explicit steps) and takes ``key=value`` overrides like every
hf_optim config (``budget.max_perplexity_increase=0.05``, ``variants=[int8,wanda-50]``).

Example:
    >>> recipe = OptimizeRecipe(eval_data="eval.txt", variants=["int8", "wanda-2:4+int8"])
    >>> [v["name"] for v in recipe.variants], recipe.variants[1]["steps"][0]
    (['int8', 'wanda-2:4+int8'], {'method': 'wanda', 'sparsity': 0.5, 'pattern': '2:4'})
    >>> OptimizeRecipe.from_yaml(recipe.to_yaml()) == recipe
    True
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

from hf_optim.compression.configs import config_from_dict
from hf_optim.core.config import _merge as merge_mappings
from hf_optim.core.config import config_from_dict as dataclass_from_dict
from hf_optim.core.config import config_to_yaml, load_config, load_yaml, parse_overrides
from hf_optim.core.errors import ConfigError

BASE_NAME = "base"  # the row of the unmodified model in every results table
EXPORT_OPTIONS = {  # keyword arguments each export step passes on to its function
    "onnx": {"opset", "atol"},
    "onnx_quantize": {"mode", "per_channel", "reduce_range", "calibrate_method", "algorithm", "block_size",
                      "is_symmetric", "accuracy_level", "max_length"},
    "tflite": {"sequence_length", "quantize"},
}
OBJECTIVES = ("perplexity", "size_bytes", "decode_ms_per_token", "prefill_ms")  # all lower-is-better
BUDGET_KEYS = ("max_perplexity_increase", "min_top1_agreement")

_FIXED_PRESETS: dict[str, list[dict[str, Any]]] = {
    "int8": [{"method": "int8_weight_only"}],
    "int8-bnb": [{"method": "bnb_int8"}],
    "nf4-bnb": [{"method": "bnb_int4", "quant_type": "nf4"}],
    "onnx-fp32": [{"export": "onnx"}],
    "onnx-int8": [{"export": "onnx"}, {"export": "onnx_quantize", "mode": "dynamic-int8"}],
    "onnx-int4": [{"export": "onnx"}, {"export": "onnx_quantize", "mode": "int4"}],
    "tflite-fp32": [{"export": "tflite", "quantize": "none"}],
    "tflite-int8": [{"export": "tflite", "quantize": "dynamic-int8"}],
}
_PRUNE_PRESET = re.compile(r"^(magnitude|wanda|sparsegpt)-(?:(\d{1,2})|(\d+:\d+))$")
_CLUSTER_PRESET = re.compile(r"^cluster-(\d+)$")
_INT4_PRESET = re.compile(r"^int4-g(\d+)$")


def preset_names() -> list[str]:
    """The preset step names (patterns written with ``<P>``/``<N:M>``/``<K>``), for error messages and docs."""
    return [*_FIXED_PRESETS, "int4-g<N>", "magnitude-<P>", "wanda-<P>", "sparsegpt-<P>", "wanda-<N:M>", "cluster-<K>"]


def _preset_steps(name: str) -> list[dict[str, Any]]:
    if name in _FIXED_PRESETS:
        return [dict(step) for step in _FIXED_PRESETS[name]]
    if match := _PRUNE_PRESET.match(name):
        method, percent, pattern = match.groups()
        if pattern:
            return [{"method": method, "sparsity": 0.5, "pattern": pattern}]
        return [{"method": method, "sparsity": int(percent) / 100}]
    if match := _CLUSTER_PRESET.match(name):
        return [{"method": "kmeans", "n_clusters": int(match.group(1))}]
    if match := _INT4_PRESET.match(name):
        return [{"method": "int4_weight_only", "group_size": int(match.group(1))}]
    raise ConfigError(
        f"Unknown variant step {name!r}; use a preset ({', '.join(preset_names())}), presets joined with '+', "
        "or a mapping such as {method: wanda, sparsity: 0.5} or {export: onnx}."
    )


def _check_step(step: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one explicit step now, so a typo fails before any model is loaded."""
    if ("method" in step) == ("export" in step):
        raise ConfigError(f"{where}: a step has either `method:` (compression) or `export:`, got {step!r}.")
    if "method" in step:
        try:
            config_from_dict(step)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        return dict(step)
    kind = step["export"]
    if kind not in EXPORT_OPTIONS:
        raise ConfigError(f"{where}: unknown export {kind!r}; use one of {sorted(EXPORT_OPTIONS)}.")
    unknown = sorted(set(step) - {"export"} - EXPORT_OPTIONS[kind])
    if unknown:
        raise ConfigError(f"{where}: export {kind!r} has no option(s) {unknown}; options: {sorted(EXPORT_OPTIONS[kind])}.")
    return dict(step)


def _check_order(steps: list[dict[str, Any]], where: str) -> None:
    """Compression steps first, then at most one export (ONNX optionally followed by ONNX Runtime quantization)."""
    exports = [s["export"] for s in steps if "export" in s]
    first_export = next((i for i, s in enumerate(steps) if "export" in s), len(steps))
    if any("method" in s for s in steps[first_export:]):
        raise ConfigError(f"{where}: compression steps must come before the export steps (they act on the PyTorch model).")
    if exports not in ([], ["onnx"], ["onnx", "onnx_quantize"], ["tflite"]):
        raise ConfigError(
            f"{where}: exports {exports} cannot be chained; use [onnx], [onnx, onnx_quantize] or [tflite] at the end."
        )


def normalize_variant(entry: Any, index: int) -> dict[str, Any]:
    """``"wanda-2:4+int8"`` or ``{name: ..., steps: [...]}`` → ``{"name": ..., "steps": [explicit mappings]}``."""
    if isinstance(entry, str):
        name, raw_steps = entry, entry.split("+")
    elif isinstance(entry, dict) and set(entry) <= {"name", "steps"} and "steps" in entry:
        name, raw_steps = entry.get("name"), entry["steps"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"Variant {index} needs a `name:` string, got {name!r}.")
        if isinstance(raw_steps, str):
            raw_steps = raw_steps.split("+")
    else:
        raise ConfigError(
            f"Variant {index} must be a preset name (e.g. wanda-2:4+int8) or a mapping {{name: ..., steps: [...]}}, "
            f"got {entry!r}."
        )
    if name == BASE_NAME:
        raise ConfigError(f"Variant name {BASE_NAME!r} is reserved for the unmodified model; pick another name.")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"Variant {name!r} needs a non-empty `steps:` list.")
    steps: list[dict[str, Any]] = []
    for step in raw_steps:
        if isinstance(step, str):
            steps += _preset_steps(step.strip())
        elif isinstance(step, dict):
            steps.append(step)
        else:
            raise ConfigError(f"Variant {name!r}: a step is a preset name or a mapping, got {step!r}.")
    steps = [_check_step(step, f"variant {name!r}") for step in steps]
    _check_order(steps, f"variant {name!r}")
    return {"name": name, "steps": steps}


def _fraction(value: Any, key: str) -> float:
    """``0.02``, ``"2%"`` or ``"+2%"`` → 0.02."""
    text = str(value).strip()
    try:
        number = float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(f"budget.{key}={value!r} is not a number; write e.g. 0.02 or '2%'.") from None
    if not 0.0 <= number < 100.0:  # also False for NaN
        raise ConfigError(f"budget.{key}={value!r} must be a fraction >= 0 (e.g. 0.02 for +2%).")
    return number


def normalize_budget(budget: dict[str, Any]) -> dict[str, Any]:
    """Check the quality budget: a relative perplexity increase and, optionally, a minimum top-1 agreement."""
    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise ConfigError(f"Unknown budget key(s) {unknown}; use {list(BUDGET_KEYS)}.")
    normalized: dict[str, Any] = {}
    for key in BUDGET_KEYS:
        value = budget.get(key)
        if value is None:
            normalized[key] = None
            continue
        normalized[key] = _fraction(value, key)
        if key == "min_top1_agreement" and normalized[key] > 1.0:
            raise ConfigError(f"budget.min_top1_agreement={value!r} must be in [0, 1] (e.g. 0.95).")
    if normalized["max_perplexity_increase"] is None and normalized["min_top1_agreement"] is None:
        raise ConfigError("The budget is empty; set budget.max_perplexity_increase (e.g. 0.02 for +2%).")
    return normalized


@dataclasses.dataclass
class OptimizeRecipe:
    """What ``hf-optim optimize`` builds and how it measures it (every field overridable as ``key=value``).

    Example:
        >>> OptimizeRecipe(eval_data="eval.txt", variants=["onnx-int8"]).variants[0]["steps"][1]["mode"]
        'dynamic-int8'
    """

    variants: list[Any] = dataclasses.field(default_factory=list)
    eval_data: str | None = None  # a .txt/.jsonl file or a dataset name (hf_optim.core.texts.load_texts)
    calibration_data: str | None = None  # for data-aware steps (Wanda, SparseGPT, GPTQ, static int8)
    text_column: str = "text"
    split: str = "test"  # the dataset split, when eval_data/calibration_data name a dataset
    max_eval_tokens: int | None = 16384  # perplexity on the first tokens of the evaluation text (None: all)
    max_length: int = 256  # perplexity window
    stride: int | None = None  # window step (default: half the window)
    num_calibration_samples: int = 64
    calibration_seq_len: int = 256
    agreement_windows: int = 8  # windows of evaluation text on which variants are compared with the base model
    agreement_length: int = 128
    prompt_tokens: int = 64  # generation speed: prompt length, new tokens, best of repeats
    new_tokens: int = 32
    speed_repeats: int = 3
    budget: dict[str, Any] = dataclasses.field(default_factory=lambda: {"max_perplexity_increase": 0.02})
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["perplexity", "size_bytes"])
    select: Literal["all", "pareto"] = "all"
    profile: bool = True  # fit and save a reference drift profile beside every variant
    profile_embeddings: bool = True  # sentence-embedding features in that profile (loads all-MiniLM-L6-v2)
    profile_model_features: bool = True  # the texts' perplexity under each variant (what its server computes)
    profile_max_texts: int = 512
    base_model: str | None = None  # the Hub id written as base_model in the cards (default: the model argument)
    threads: int | None = None  # torch / ONNX Runtime threads (default: torch's current setting)
    seed: int = 0
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.eval_data:
            raise ConfigError("The recipe needs eval_data: a .txt/.jsonl file or a dataset name to measure on.")
        if not isinstance(self.variants, list) or not self.variants:
            raise ConfigError("The recipe needs a non-empty `variants:` list, e.g. [int8, wanda-2:4+int8, onnx-int8].")
        self.variants = [normalize_variant(entry, i) for i, entry in enumerate(self.variants, 1)]
        names = [v["name"] for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"Variant names must be unique; {duplicates} appear more than once.")
        if not isinstance(self.budget, dict):
            raise ConfigError(f"budget must be a mapping like {{max_perplexity_increase: 0.02}}, got {self.budget!r}.")
        self.budget = normalize_budget(self.budget)
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise ConfigError(f"objectives {self.objectives} must be a non-empty subset of {list(OBJECTIVES)}.")
        for key in ("max_length", "agreement_windows", "agreement_length", "prompt_tokens", "new_tokens",
                    "speed_repeats", "num_calibration_samples", "profile_max_texts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be >= 1 (or null for torch's default).")

    @property
    def needs_calibration(self) -> list[str]:
        """Names of the variants whose steps need calibration data."""
        return [v["name"] for v in self.variants if any(step_needs_calibration(s) for s in v["steps"])]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> OptimizeRecipe:
        """Read a recipe YAML and apply ``key=value`` overrides.

        Example:
            >>> OptimizeRecipe.load("recipes/optimize_tiny.yaml", ["select=pareto"]).select  # doctest: +SKIP
            'pareto'
        """
        return load_config(cls, path, overrides)

    @classmethod
    def from_yaml(cls, text: str) -> OptimizeRecipe:
        data = load_yaml(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"An optimize recipe is a mapping at top level, got {type(data).__name__}.")
        return dataclass_from_dict(cls, data)

    def to_yaml(self) -> str:
        return config_to_yaml(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def step_needs_calibration(step: dict[str, Any]) -> bool:
    """Whether one explicit step needs calibration texts."""
    if "method" in step:
        return bool(config_from_dict(step).needs_calibration)
    return step["export"] == "onnx_quantize" and (
        step.get("mode") == "static-int8" or (step.get("mode") == "int4" and step.get("algorithm") == "gptq")
    )


def resolve_recipe(recipe: OptimizeRecipe | str | os.PathLike | dict, overrides: list[str] | None = None) -> OptimizeRecipe:
    """An :class:`OptimizeRecipe` from an object, a YAML path or a mapping, with ``key=value`` overrides applied.

    Example:
        >>> resolve_recipe({"eval_data": "eval.txt", "variants": ["int8"]}, ["select=pareto"]).select
        'pareto'
    """
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"Recipe file {str(path)!r} does not exist.")
        return OptimizeRecipe.load(path, overrides)
    if isinstance(recipe, OptimizeRecipe):
        if not overrides:
            return recipe
        recipe = recipe.to_dict()
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe must be an OptimizeRecipe, a YAML path or a mapping, got {type(recipe).__name__}.")
    return dataclass_from_dict(OptimizeRecipe, merge_mappings(recipe, parse_overrides(overrides or [])))
