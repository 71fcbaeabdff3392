"""``hf_optim.optimize``: build every variant of a recipe, measure it against the base model, report, select.

For each variant, in order: build it into a hidden staging folder, load back what was written (so the numbers are
those of the shipped artifact), measure perplexity, size on disk, prefill latency and decode speed, and agreement
with the base model; add the metrics to its model card, save a reference drift profile fitted on the evaluation
texts (``reference_profile.npz``), then rename the folder into place. A variant that fails is recorded with its
error (its folder is not kept) and the others go on; one whose backend is not installed is recorded as skipped.

Example:
    >>> results = optimize("../shared/models/stories260K", "recipes/optimize_tiny.yaml", "out/optimize")  # doctest: +SKIP
    >>> [row["name"] for row in results if row["pareto"]]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_optim.core.atomic import staged_directory
from hf_optim.core.errors import ConfigError
from hf_optim.pipeline.agreement import agreement_windows, combine, token_agreement
from hf_optim.pipeline.recipe import BASE_NAME, OptimizeRecipe, resolve_recipe
from hf_optim.pipeline.report import OptimizeResults, write_reports
from hf_optim.pipeline.selection import pareto_front, perplexity_increase, within_budget
from hf_optim.pipeline.variants import (
    build_variant,
    folder_name,
    load_variant,
    missing_requirement,
    variant_kind,
)

logger = logging.getLogger(__name__)
PROFILE_FILE = "reference_profile.npz"


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_base(model: Any, tokenizer: Any, trust_remote_code: bool) -> tuple[nn.Module, Any, str | None]:
    """The base model in fp32, its tokenizer, and the id written as ``base_model`` in the cards."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ConfigError("optimize(model_object, ...) needs tokenizer=...; or pass a model folder or Hub id.")
        return model.float().eval(), tokenizer, getattr(model.config, "_name_or_path", None) or None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_optim.compression.storage import load_optimized

    source = str(model)
    if Path(source).is_dir():
        base = load_optimized(source)
    else:
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return base.float().eval(), tokenizer, source


def _base_size(model: Any, base: nn.Module) -> int:
    """Bytes on disk of a local base folder; otherwise of its parameters and buffers as they are in memory."""
    from hf_optim.core.evaluation import size_on_disk

    if not isinstance(model, nn.Module) and Path(str(model)).is_dir():
        return size_on_disk(model)
    tensors = {id(t): t for t in [*base.parameters(), *base.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _Evaluator:
    """The measurements every variant gets, on the same texts, windows and prompts as the base model."""

    def __init__(self, base: nn.Module, tokenizer: Any, texts: list[str], recipe: OptimizeRecipe) -> None:
        self.base, self.tokenizer, self.texts, self.recipe = base, tokenizer, texts, recipe
        context = getattr(base.config, "max_position_embeddings", None) or 1024
        self.max_length = min(recipe.max_length, int(context))
        self.stride = min(recipe.stride or max(1, self.max_length // 2), self.max_length)
        ids = tokenizer("\n\n".join(texts), return_tensors="pt", verbose=False)["input_ids"][0]
        self.windows = agreement_windows(ids, recipe.agreement_windows, min(recipe.agreement_length, self.max_length))
        self.prompt_tokens = max(1, min(recipe.prompt_tokens, int(context) - recipe.new_tokens - 1))

    @torch.no_grad()
    def agreement(self, runtime: Any) -> dict[str, float | int]:
        parts = []
        for batch in self.windows.split(4):
            reference = self.base(input_ids=batch).logits
            parts.append(token_agreement(reference, runtime(input_ids=batch).logits))
        return combine(parts)

    def measure(self, runtime: Any) -> dict[str, Any]:
        from hf_optim.compression.pruning import sparsity_report
        from hf_optim.core.evaluation import evaluate_perplexity, generation_speed

        started = time.perf_counter()
        row: dict[str, Any] = {
            "perplexity": evaluate_perplexity(
                runtime, self.tokenizer, self.texts, self.max_length, self.stride, self.recipe.max_eval_tokens
            )
        }
        speed = generation_speed(
            runtime, self.tokenizer, self.prompt_tokens, self.recipe.new_tokens, self.recipe.speed_repeats
        )
        row["prefill_ms"] = 1000 * speed["prefill_seconds"]
        row["decode_tokens_per_s"] = speed["decode_tokens_per_s"]
        row["decode_ms_per_token"] = 1000 / speed["decode_tokens_per_s"] if speed["decode_tokens_per_s"] > 0 else math.nan
        agreement = self.agreement(runtime)
        row["top1_agreement"] = agreement["top1_agreement"]
        row["kl_divergence"] = agreement["kl_divergence"]
        if isinstance(runtime, nn.Module):  # zeros in the layers compression targets (not lm_head, not embeddings)
            row["linear_sparsity"] = sparsity_report(runtime)["sparsity"]
        row["eval_seconds"] = time.perf_counter() - started
        return row


def _card_metrics(row: dict[str, Any], base: dict[str, Any], recipe: OptimizeRecipe) -> dict[str, float | str]:
    """The measured numbers for the model card, with what they were measured on."""
    metrics: dict[str, float | str] = {}
    names = {"prefill_ms": "prefill_latency_ms"}  # the card's "Limits" section looks for "latency"
    for key in ("perplexity", "perplexity_increase", "size_bytes", "size_ratio", "prefill_ms", "decode_tokens_per_s",
                "top1_agreement", "kl_divergence", "linear_sparsity"):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[names.get(key, key)] = round(float(value), 6) if isinstance(value, float) else value
    metrics["base_perplexity"] = round(base["perplexity"], 6)
    metrics["within_budget"] = str(row.get("within_budget"))
    metrics["evaluation_data"] = str(recipe.eval_data)
    metrics["measured_on"] = f"cpu, {torch.get_num_threads()} threads, batch 1"
    return metrics


def _finish_folder(staging: Path, target: Path, row: dict[str, Any], variant: dict[str, Any], runtime: Any,
                   context: dict[str, Any]) -> None:
    """The measured metrics into the model card (written here for export folders), the drift profile beside it."""
    from hf_optim.hub import update_model_card

    recipe: OptimizeRecipe = context["recipe"]
    update_model_card(
        staging, _card_metrics(row, context["base_row"], recipe),
        {"name": variant["name"], "steps": variant["steps"], "eval_data": recipe.eval_data, "budget": recipe.budget},
        base_model=context["base_model_id"],
    )
    if recipe.profile:
        started = time.perf_counter()
        # a TFLite graph cannot score texts longer than its fixed window, and `hf-optim serve` runs no TFLite folder
        profile = _fit_profile(runtime if row["kind"] != "tflite" else None, context)
        row["profile_seconds"] = time.perf_counter() - started
        if (staging / "tokenizer_config.json").is_file():
            profile.tokenizer_path = str(target.resolve())  # the folder ships its tokenizer: point there, not the base
        profile.save(staging / PROFILE_FILE)


def _profile_texts(texts: list[str], recipe: OptimizeRecipe) -> tuple[list[str], Any]:
    """The reference texts of the drift profiles, and their MiniLM embeddings (computed once for every variant)."""
    chosen = texts[: recipe.profile_max_texts]
    if not (recipe.profile and recipe.profile_embeddings):
        return chosen, None
    from hf_optim.monitoring.embeddings import embed_texts

    return chosen, embed_texts(chosen)


def _fit_profile(model: Any, context: dict[str, Any]) -> Any:
    """A reference profile of the evaluation texts; with ``profile_model_features``, their perplexity under the variant
    itself (the ``prompt_perplexity`` the server computes with the served model)."""
    from hf_optim.monitoring import ReferenceProfile

    recipe: OptimizeRecipe = context["recipe"]
    texts, embeddings = context["profile_texts"]
    return ReferenceProfile.fit(
        texts, tokenizer=context["tokenizer"], embeddings=recipe.profile_embeddings,
        model=model if recipe.profile_model_features else None, seed=recipe.seed, precomputed_embeddings=embeddings,
    )


def _run_variant(variant: dict[str, Any], target: Path, context: dict[str, Any]) -> dict[str, Any]:
    """Build, measure and write one variant; the returned row says ok, skipped or failed (never raises)."""
    recipe: OptimizeRecipe = context["recipe"]
    row: dict[str, Any] = {"name": variant["name"], "kind": variant_kind(variant["steps"]), "steps": variant["steps"],
                           "folder": str(target)}
    reason = missing_requirement(variant["steps"])
    if reason is not None:
        shutil.rmtree(target, ignore_errors=True)  # a folder from an earlier run would no longer match the report
        return {**row, "status": "skipped", "reason": reason, "folder": None}
    started = time.perf_counter()
    try:
        with staged_directory(target) as staging:
            torch.manual_seed(recipe.seed)
            build_variant(
                context["base"], context["tokenizer"], variant["steps"], staging, context["base_model_id"],
                context["calibration"], recipe,
            )
            row["build_seconds"] = time.perf_counter() - started
            from hf_optim.core.evaluation import size_on_disk

            row["size_bytes"] = size_on_disk(staging)
            runtime = load_variant(staging, row["kind"], torch.get_num_threads())
            row.update(context["evaluator"].measure(runtime))
            _annotate(row, context["base_row"], recipe)
            _finish_folder(staging, target, row, variant, runtime, context)
            del runtime  # an ONNX Runtime session holds its files open on some platforms
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
        shutil.rmtree(target, ignore_errors=True)
        logger.debug("variant %s failed:\n%s", variant["name"], traceback.format_exc())
        return {**row, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500], "folder": None,
                "build_seconds": time.perf_counter() - started}
    return {**row, "status": "ok"}


def _annotate(row: dict[str, Any], base_row: dict[str, Any], recipe: OptimizeRecipe) -> None:
    """Relative numbers against the base, and whether the budget is met."""
    if isinstance(row.get("perplexity"), float):
        row["perplexity_increase"] = perplexity_increase(row["perplexity"], base_row["perplexity"])
    row["size_ratio"] = row["size_bytes"] / base_row["size_bytes"]
    row["within_budget"] = within_budget(row, base_row["perplexity"], recipe.budget)


def optimize(
    model: str | os.PathLike | nn.Module,
    recipe: OptimizeRecipe | str | os.PathLike | dict,
    output_dir: str | os.PathLike,
    *,
    overrides: Sequence[str] | None = None,
    select: str | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> OptimizeResults:
    """Build, measure and report every variant of ``recipe`` for ``model``; return the results table.

    ``model`` is a model folder, a Hub id, or a loaded causal LM (then pass ``tokenizer``). ``recipe`` is an
    :class:`OptimizeRecipe`, a YAML path or a mapping; ``overrides`` are ``key=value`` strings applied on top, and
    ``select`` (``"all"`` or ``"pareto"``) overrides the recipe's. With ``"pareto"`` only the variants on the Pareto
    front of the recipe's objectives *and* inside the quality budget keep their folders; the others are measured
    (the front needs every point), then their folders are deleted, and their rows stay in the report.

    Writes ``output_dir/<variant>/`` per variant, ``results.json``, ``report.md``, ``report.html``,
    ``size_vs_perplexity.png`` and ``latency_vs_perplexity.png``.

    Example:
        >>> results = hf_optim.optimize("path/to/model", "recipes/optimize_tiny.yaml", "out/opt",
        ...                             overrides=["variants=[int8,wanda-50]"], select="pareto")  # doctest: +SKIP
        >>> print(results.to_markdown())  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from hf_optim.core.texts import load_texts

    recipe = resolve_recipe(recipe, list(overrides or []))
    if select is not None:
        if select not in ("all", "pareto"):
            raise ConfigError(f"select={select!r} must be 'all' or 'pareto'.")
        recipe = dataclasses.replace(recipe, select=select)  # the caller's recipe object stays as it was
    folders = [folder_name(v["name"]) for v in recipe.variants]
    clashes = sorted({v["name"] for v, f in zip(recipe.variants, folders) if folders.count(f) > 1})
    if clashes:
        raise ConfigError(f"Variants {clashes} would share one folder name; rename them apart.")
    # data first: a missing file fails before the model loads
    texts = load_texts(recipe.eval_data, text_column=recipe.text_column, split=recipe.split)
    calibration = None
    if recipe.calibration_data:
        calibration = load_texts(recipe.calibration_data, text_column=recipe.text_column, split=recipe.split)
    elif recipe.needs_calibration:
        raise ConfigError(f"Variants {recipe.needs_calibration} need calibration data: set calibration_data=FILE.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _threads(recipe.threads):
        torch.manual_seed(recipe.seed)
        base, tokenizer, base_model_id = _load_base(model, tokenizer, recipe.trust_remote_code)
        base_model_id = recipe.base_model or base_model_id
        evaluator = _Evaluator(base, tokenizer, texts, recipe)
        base_row: dict[str, Any] = {"name": BASE_NAME, "kind": "torch", "steps": [], "status": "ok",
                                    "folder": None if isinstance(model, nn.Module) else str(model),
                                    "size_bytes": _base_size(model, base)}
        base_row.update(evaluator.measure(base))
        _annotate(base_row, base_row, recipe)
        context = {"recipe": recipe, "base": base, "tokenizer": tokenizer, "base_model_id": base_model_id,
                   "calibration": calibration, "evaluator": evaluator, "base_row": base_row,
                   "profile_texts": _profile_texts(texts, recipe)}
        rows = [base_row]
        bar = tqdm(recipe.variants, desc="optimize", unit="variant", disable=not progress)
        for variant in bar:
            bar.set_postfix_str(variant["name"])
            row = _run_variant(variant, output_dir / folder_name(variant["name"]), context)
            rows.append(row)
            bar.write(_one_line(row))
    front = pareto_front([r for r in rows if r["status"] == "ok"], recipe.objectives)
    for row in rows:
        row["pareto"] = row["name"] in front
        row["kept"] = row["status"] == "ok" and row["name"] != BASE_NAME and (
            recipe.select == "all" or (row["pareto"] and row["within_budget"])
        )
        if row["name"] != BASE_NAME and row["status"] == "ok" and not row["kept"]:
            shutil.rmtree(row["folder"], ignore_errors=True)
            row["folder"] = None
    results = OptimizeResults(
        model=base_model_id or type(base).__name__, rows=rows, budget=recipe.budget, objectives=recipe.objectives,
        select=recipe.select, recipe=recipe.to_dict(), seconds=time.perf_counter() - started,
        threads=recipe.threads or torch.get_num_threads(),
    )
    write_reports(results, output_dir)
    return results


def _one_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['name']}: {row['status']}: {row.get('reason') or row.get('error')}"
    ppl = row.get("perplexity")
    return (f"{row['name']}: perplexity {ppl:.4g}" if isinstance(ppl, float) else f"{row['name']}: perplexity n/a") + (
        f", size {row['size_bytes'] / 1e6:.3f} MB, budget {'met' if row['within_budget'] else 'missed'}"
    )
