"""Publishing a variant folder to the Hugging Face Hub: its model card, the file list, and a one-commit push.

:func:`build_model_card` describes a folder from what it holds (``hf_optim.json`` steps and metrics, ONNX
``validation.json``/``quantization.json``, ``config.json``): Hub metadata (``base_model``, ``base_model_relation``,
``library_name``, tags, ``pipeline_tag``), the recipe, the measured metrics, how to load it and what was not
measured. :func:`update_model_card` replaces the metrics (and recipe) sections of an existing card in place, so the
pipeline can add what it measured after the folder was written. :func:`push_to_hub` creates the repo (and branch)
if needed and uploads :func:`publishable_files` in a single commit; ``dry_run=True`` only lists them.

Example:
    >>> hf_optim.update_model_card("out/wanda24-int8", metrics={"perplexity": 4.61, "size_mb": 0.41})  # doctest: +SKIP
    >>> hf_optim.push_to_hub("out/wanda24-int8", "me/stories260K-wanda24-int8", dry_run=True).files  # doctest: +SKIP
    ['README.md', 'config.json', 'hf_optim.json', 'model.safetensors', ...]
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hf_optim.core.atomic import write_file_atomically
from hf_optim.core.errors import ConfigError, HfOptimError

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# Written into the card's load snippets; push_to_hub replaces it with the repo id in the uploaded copy.
REPO_ID_PLACEHOLDER = "<repo-id>"
# The only relations the Hub accepts (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")

MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.onnx", "*.tflite", "*.gguf")
# Matched against every part of a relative path; hidden names (".DS_Store", ".git", ".x.lock", staging folders
# of core.atomic) are skipped as well.
SKIPPED_PATTERNS = ("__pycache__", "*.pyc", "*.pyo", "*.tmp", "*.tmp.*", "*.tmp-*", "*.lock", "*.swp", "*~",
                    "*.partial", "*.incomplete", "Thumbs.db")

# What the pipeline measures; a card lists the ones missing from its metrics under "Limits".
_MEASUREMENTS = {
    "perplexity": ("perplexity", "ppl"),
    "size on disk": ("size",),
    "latency / throughput": ("latency", "tokens_per_s", "throughput", "speed"),
    "agreement with the base model": ("agreement", "top1", "kl"),
}


class HubPushError(HfOptimError):
    """The Hub (or the endpoint in ``HF_ENDPOINT``) refused the push; the message carries its answer."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    """What :func:`push_to_hub` uploaded (or, with ``dry_run``, would upload)."""

    repo_id: str
    revision: str
    files: list[str]
    dry_run: bool
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None


# --------------------------------------------------------------------------------------------------- the file list


def _is_skipped(relative: Path) -> bool:
    return any(part.startswith(".") or any(fnmatch.fnmatch(part, pattern) for pattern in SKIPPED_PATTERNS)
               for part in relative.parts)


def publishable_files(variant_dir: str | os.PathLike) -> list[str]:
    """The files of ``variant_dir`` a push uploads, as sorted POSIX paths relative to it.

    Hidden files and folders, ``__pycache__``, temporary/partial files (``*.tmp*``, ``*.partial``, ``*.lock``,
    editor backups) are left out. The dry run and the real push both use this list.

    Example:
        >>> publishable_files("out/wanda24-int8")  # doctest: +SKIP
        ['README.md', 'config.json', 'hf_optim.json', 'model.safetensors', 'tokenizer.json']
    """
    root = Path(variant_dir)
    files = []
    for folder, subfolders, names in os.walk(root):
        relative_folder = Path(folder).relative_to(root)
        subfolders[:] = [d for d in subfolders if not _is_skipped(relative_folder / d)]
        files += [(relative_folder / n).as_posix() for n in names if not _is_skipped(relative_folder / n)]
    return sorted(files)


def _folder_problems(files: list[str]) -> list[str]:
    problems = []
    if "config.json" not in files:
        problems.append("no config.json")
    if not any(fnmatch.fnmatch(Path(f).name, p) for f in files for p in MODEL_FILE_PATTERNS):
        problems.append(f"no model file ({', '.join(MODEL_FILE_PATTERNS)})")
    if CARD_FILE not in files:
        problems.append(f"no {CARD_FILE} model card (write one with hf_optim.update_model_card(dir, metrics={{...}}))")
    return problems


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def _check_repo_id(repo_id: str) -> None:
    bad = not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id)
    if bad or ".." in repo_id or "--" in repo_id or repo_id.endswith((".", "-", ".git")):
        raise ConfigError(f"repo_id={repo_id!r} is not a Hub repo id; use 'user-or-org/name' (letters, digits, "
                          "'-', '_', '.'; no '--' or '..'; at most 96 characters each side).")


def _is_hub_model_id(value: Any) -> bool:
    return isinstance(value, str) and not value.startswith((".", "/", "~")) and bool(
        re.fullmatch(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", value)) and not Path(value).exists()


def _card_problems(card_path: Path) -> list[str]:
    """Card metadata the Hub would reject or misfile: a local base_model path, an unknown relation."""
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(card_path).data
    except (ValueError, yaml.YAMLError) as exc:
        return [f"the metadata block of {CARD_FILE} does not parse ({exc})"]
    problems = []
    bases = data.base_model if isinstance(data.base_model, list) else [data.base_model] if data.base_model else []
    problems += [f"base_model={b!r} in {CARD_FILE} is not a Hub model id (a local path?); set the Hub id with "
                 f"hf_optim.update_model_card(dir, base_model='org/name')" for b in bases if not _is_hub_model_id(b)]
    relation = getattr(data, "base_model_relation", None)
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        problems.append(f"base_model_relation={relation!r} is not one of {BASE_MODEL_RELATIONS}")
    if relation is not None and not bases:
        problems.append("base_model_relation is set without base_model")
    return problems


# ---------------------------------------------------------------------------------------------------------- push


def push_to_hub(
    variant_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    create_pr: bool = False,
    force: bool = False,
) -> PushResult:
    """Upload a variant folder to ``repo_id`` on the Hub in one commit; create the repo/branch when missing.

    The token comes from ``token``, else ``HF_TOKEN``, else the token stored by ``hf auth login``; it is never
    printed or logged. ``dry_run`` checks the folder and returns the file list without touching the network.
    A folder without ``config.json``, a model file or a ``README.md`` card is refused unless ``force``.
    The endpoint is ``HF_ENDPOINT`` (default https://huggingface.co), read when huggingface_hub is imported.

    Example:
        >>> result = hf_optim.push_to_hub("out/wanda24-int8", "me/wanda24-int8", revision="v1")  # doctest: +SKIP
        >>> result.commit_url  # doctest: +SKIP
        'https://huggingface.co/me/wanda24-int8/commit/...'
    """
    variant_dir = Path(variant_dir)
    _check_repo_id(repo_id)
    if not variant_dir.is_dir():
        raise ConfigError(f"variant_dir={str(variant_dir)!r} is not a folder; pass a folder written by "
                          "hf_optim.save_optimized, `hf-optim compress` or `hf-optim optimize`.")
    files = publishable_files(variant_dir)
    if not files:
        raise ConfigError(f"{str(variant_dir)!r} holds no file to publish.")
    problems = _folder_problems(files)
    if problems and not force:
        raise ConfigError(f"{str(variant_dir)!r} is not a variant folder: {'; '.join(problems)}. "
                          "Pass force=True (--force) to upload it anyway.")
    card_problems = _card_problems(variant_dir / CARD_FILE) if CARD_FILE in files else []
    revision_name = revision or "main"
    if dry_run:
        for problem in card_problems:
            logger.warning("A real push would be refused: %s (or pass --force).", problem)
        return PushResult(repo_id, revision_name, files, dry_run=True)
    if card_problems and not force:
        raise ConfigError(f"The model card of {str(variant_dir)!r} would be rejected or misfiled by the Hub: "
                          f"{'; '.join(card_problems)}. Pass force=True (--force) to push it as it is.")
    return _push(variant_dir, repo_id, files, private, revision, token, commit_message, create_pr)


def _push(variant_dir: Path, repo_id: str, files: list[str], private: bool, revision: str | None, token: str | None,
          commit_message: str | None, create_pr: bool) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        raise ConfigError("HF_HUB_OFFLINE=1 is set (the Makefile sets it): set HF_HUB_OFFLINE=0 to push, or use "
                          "dry_run=True (--dry-run) to list the files only.")
    token = token or get_token()
    if not token:
        raise ConfigError("No Hugging Face token: pass token=... (--token), set HF_TOKEN, or run `hf auth login`.")
    operations = []
    for path in files:
        source: Path | bytes = variant_dir / path
        if path == CARD_FILE:
            source = source.read_bytes().replace(REPO_ID_PLACEHOLDER.encode(), repo_id.encode())
        operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=source))
    api = HfApi(token=token)
    logger.info("Pushing %d files from %s to %s (%s) in one commit", len(files), variant_dir, repo_id,
                revision or "main")
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message or f"Upload {variant_dir.name} with hf_optim",
            commit_description=f"{len(files)} files written by hf_optim.", revision=revision, create_pr=create_pr,
        )
    except (HfHubHTTPError, ValueError) as exc:  # ValueError: the Hub's README metadata validation
        raise HubPushError(f"Pushing {str(variant_dir)!r} to {repo_id!r} failed: {exc}") from exc
    return PushResult(repo_id, revision or "main", files, dry_run=False, commit_url=info.commit_url,
                      commit_oid=info.oid, pr_url=info.pr_url)


# ---------------------------------------------------------------------------------------------------- model card


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _bits(step: Mapping[str, Any]) -> int | None:
    if step.get("kind") == "cluster" and step.get("n_clusters"):
        return max(1, math.ceil(math.log2(int(step["n_clusters"]))))
    match = re.search(r"int(\d+)", str(step.get("method", "")) + str(step.get("mode", "")))
    return int(match.group(1)) if match else step.get("bits")


def _describe(variant_dir: Path) -> dict[str, Any]:
    """What the folder is: steps, format, relation, bits, sparsity and the metrics it records."""
    record = _read_json(variant_dir / "hf_optim.json")
    config = _read_json(variant_dir / "config.json")
    validation = _read_json(variant_dir / "validation.json")
    onnx_quantization = _read_json(variant_dir / "quantization.json")
    steps = list(record.get("steps", []))
    if onnx_quantization:
        settings = {k: v for k, v in onnx_quantization.items() if k in ("mode", "bits", "algorithm", "block_size")}
        steps.append({"kind": "quantize", "method": f"onnxruntime_{onnx_quantization.get('mode', 'quantize')}",
                      **settings})
    quant_config = config.get("quantization_config") or {}
    bits = [b for b in (_bits(s) for s in steps if s.get("kind") in ("quantize", "cluster")) if b]
    if quant_config.get("load_in_4bit"):
        bits.append(4)
    elif quant_config.get("load_in_8bit"):
        bits.append(8)
    sparsities = [s["achieved_sparsity"] for s in steps if s.get("kind") == "prune" and "achieved_sparsity" in s]
    if (variant_dir / "adapter_config.json").is_file():
        relation = "adapter"
    elif bits or quant_config:
        relation = "quantized"
    else:  # pruning and plain format conversions: the Hub's remaining relation for changed weights
        relation = "finetune"
    metrics: dict[str, Any] = dict(record.get("metrics") or {})
    if validation:
        metrics["onnx_max_abs_logits_diff_vs_pytorch"] = validation.get("max_abs_diff_no_past")
        metrics["onnx_greedy_match_vs_pytorch"] = validation.get("greedy_match")
    parity = onnx_quantization.get("parity") or {}
    if parity:
        metrics["top1_agreement_vs_fp32_onnx"] = parity.get("top1_agreement")
        metrics["max_abs_logits_diff_vs_fp32_onnx"] = parity.get("max_abs_logits_diff")
    return {
        "steps": steps,
        "base_model": record.get("base_model") or config.get("_name_or_path") or None,
        "architecture": (config.get("architectures") or [config.get("model_type", "model")])[0],
        "format": _format(variant_dir),
        "packed": bool(record.get("packed")),
        "quant_method": quant_config.get("quant_method"),
        "tokenizer": (variant_dir / "tokenizer_config.json").is_file(),
        "relation": relation,
        "bits": min(bits) if bits else None,
        "sparsity": max(sparsities) if sparsities else None,
        "metrics": {k: v for k, v in metrics.items() if v is not None},
    }


def _format(variant_dir: Path) -> str:
    """How the weights ship: ``onnx`` (model.onnx), ``tflite`` (a .tflite file) or ``pytorch``."""
    if (variant_dir / "model.onnx").is_file():
        return "onnx"
    return "tflite" if any(variant_dir.glob("*.tflite")) else "pytorch"


def _tags(info: Mapping[str, Any]) -> list[str]:
    tags = ["hf-optim"]
    tags += [str(s["method"]).replace("_", "-") for s in info["steps"] if s.get("method")]
    tags += sorted({{"prune": "pruned", "quantize": "quantized", "cluster": "weight-clustering"}[s["kind"]]
                    for s in info["steps"] if s.get("kind") in ("prune", "quantize", "cluster")})
    if info["format"] != "pytorch":
        tags.append(info["format"])
    if info["bits"]:
        tags.append(f"{info['bits']}-bit")
    if info["sparsity"]:
        tags.append(f"sparsity-{round(100 * info['sparsity'])}")
    return list(dict.fromkeys(tags))


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _section(name: str, lines: list[str]) -> str:
    return "\n".join([f"<!-- hf-optim:{name} -->", *lines, f"<!-- /hf-optim:{name} -->"])


def _recipe_section(steps: list[Mapping[str, Any]], recipe: Mapping[str, Any] | None) -> str:
    body = recipe if recipe else {"steps": steps}
    if not body.get("steps", True):
        return _section("recipe", ["## Recipe", "", "No compression step was recorded for this folder."])
    text = yaml.safe_dump(json.loads(json.dumps(body, default=str)), sort_keys=False).rstrip()
    return _section("recipe", ["## Recipe", "", "```yaml", text, "```"])


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    flat = _flatten(metrics)
    if not flat:
        return _section("metrics", ["## Measured metrics", "", "Nothing was measured for this folder."])
    rows = [f"| {key} | {_format_value(value)} |" for key, value in flat.items()]
    return _section("metrics", ["## Measured metrics", "", "| metric | value |", "|---|---|", *rows])


def _limits_section(metrics: Mapping[str, Any]) -> str:
    keys = [key.lower() for key in _flatten(metrics)]
    missing = [label for label, words in _MEASUREMENTS.items() if not any(w in k for k in keys for w in words)]
    lines = ["## Limits", ""]
    lines += [f"- Not measured: {label}." for label in missing]
    lines += [
        ("- No downstream-task, safety, bias or long-context evaluation was run; perplexity on a small evaluation "
         "set does not show task quality."),
        "- Latency and throughput, where listed, hold for the machine they were measured on only.",
    ]
    return _section("limits", lines)


def _load_section(info: Mapping[str, Any]) -> str:
    repo = REPO_ID_PLACEHOLDER
    if info["format"] == "onnx":
        code = ["from huggingface_hub import snapshot_download", "import hf_optim", "",
                f'model = hf_optim.OnnxCausalLM.from_pretrained(snapshot_download("{repo}"))  # ONNX Runtime']
        note = "The ONNX graph runs on ONNX Runtime through hf_optim (KV cache in and out)."
    elif info["format"] == "tflite":
        code = ["from huggingface_hub import hf_hub_download", "import hf_optim", "",
                f'path = hf_hub_download("{repo}", "model.tflite")',
                "model = hf_optim.TFLiteCausalLM.from_pretrained(path)  # LiteRT interpreter"]
        note = ("The TFLite graph takes int32 `input_ids` of the fixed length in `model.tflite.json` and has no KV "
                "cache; it runs on the LiteRT interpreter (`pip install ai-edge-litert`).")
    elif info["packed"]:
        code = ["from huggingface_hub import snapshot_download", "import hf_optim", "",
                f'path = snapshot_download("{repo}")',
                "model = hf_optim.load_optimized(path)  # decodes the packed weights"]
        note = ("Compressed weights are stored packed in `packed_weights.safetensors` and decoded by "
                "`hf_optim.load_optimized`; `from_pretrained` alone would leave them uninitialized.")
    else:
        code = ["from transformers import AutoModelForCausalLM", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}")']
        note = (f"Loading needs the `{info['quant_method']}` backend installed." if info["quant_method"]
                else "A plain Transformers folder; `hf_optim.load_optimized(path)` loads it as well.")
    if info["tokenizer"]:
        code += ["", "from transformers import AutoTokenizer",
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo}")']
    return "\n".join(["## How to load", "", "```python", *code, "```", "", note])


def build_model_card(
    variant_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Any:
    """A ``huggingface_hub.ModelCard`` describing the variant in ``variant_dir`` from the files it holds.

    Metadata: ``base_model`` (argument, else ``hf_optim.json``), ``base_model_relation`` (``adapter`` with PEFT
    files, ``quantized`` for quantization or clustering, else ``finetune``), ``library_name``, tags (``hf-optim``,
    techniques, bits, sparsity) and ``pipeline_tag: text-generation``. Body: the recipe (argument, else the
    recorded steps), the measured metrics (argument, else ``hf_optim.json`` and the ONNX parity reports), how to
    load it, and what was not measured.

    Example:
        >>> card = build_model_card("out/wanda24-int8", base_model="org/base-model")  # doctest: +SKIP
        >>> card.save("out/wanda24-int8/README.md")  # doctest: +SKIP
    """
    from huggingface_hub import ModelCard, ModelCardData

    variant_dir = Path(variant_dir)
    info = _describe(variant_dir)
    base_model = base_model or info["base_model"]
    measured = dict(metrics) if metrics is not None else info["metrics"]
    data = ModelCardData(
        base_model=base_model, base_model_relation=info["relation"] if base_model else None,
        library_name={"onnx": "onnx", "tflite": "tflite"}.get(info["format"], "transformers"),
        tags=_tags(info), pipeline_tag="text-generation",
    )
    title = name or (recipe or {}).get("name") or variant_dir.name
    techniques = " → ".join(str(s.get("method")) for s in info["steps"] if s.get("method")) or "no compression step"
    origin = f"derived from `{base_model}` ({info['relation']})" if base_model else "with no recorded base model"
    body = [
        f"# {title}", "",
        f"`{info['architecture']}` {origin} with hf_optim: {techniques}.",
        "", _recipe_section(info["steps"], recipe), "", _metrics_section(measured), "", _load_section(info), "",
        _limits_section(measured), "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))


def _replace_section(text: str, name: str, section: str) -> str:
    pattern = re.compile(rf"<!-- hf-optim:{name} -->.*?<!-- /hf-optim:{name} -->", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    return f"{text.rstrip()}\n\n{section}\n"


def update_model_card(
    variant_dir: str | os.PathLike,
    metrics: Mapping[str, float | str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    *,
    base_model: str | None = None,
) -> Path:
    """Add or replace the metrics section (and the recipe section, when given) of ``variant_dir/README.md``.

    Idempotent: the sections sit between ``<!-- hf-optim:... -->`` markers and are replaced, never duplicated;
    the rest of the card (hand edits included) is kept. The "Limits" section is rewritten to match the metrics.
    Without a card, a new one is built with :func:`build_model_card`. Returns the card's path.

    Example:
        >>> hf_optim.update_model_card("out/wanda24-int8", {"perplexity": 4.61, "agreement": 0.97})  # doctest: +SKIP
    """
    from huggingface_hub import ModelCard

    variant_dir = Path(variant_dir)
    path = variant_dir / CARD_FILE
    if not path.is_file():
        card = build_model_card(variant_dir, base_model=base_model, metrics=metrics, recipe=recipe)
    else:
        card = ModelCard.load(path)
        if base_model is not None:
            card.data.base_model = base_model
            if getattr(card.data, "base_model_relation", None) is None:
                card.data.base_model_relation = _describe(variant_dir)["relation"]
        text = card.text
        if metrics is not None:
            text = _replace_section(text, "metrics", _metrics_section(metrics))
            text = _replace_section(text, "limits", _limits_section(metrics))
        if recipe is not None:
            text = _replace_section(text, "recipe", _recipe_section([], recipe))
        card.text = text
    return write_file_atomically(path, str(card).encode("utf-8"))  # what ModelCard.save writes
