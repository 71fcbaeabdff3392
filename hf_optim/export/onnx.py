"""Export a decoder-only Transformers LM (transformers 5) to ONNX with a KV cache, validated against PyTorch.

One generic wrapper serves every family: it takes flat tensors (ids, mask, positions, one key and one value per
layer), rebuilds a ``DynamicCache`` from them, runs the model and returns the logits and the present key/values flat.
The legacy TorchScript exporter (``dynamo=False``) is used: on torch 2.13 it traces the transformers-5 masking and
cache code into a graph that is exact to ~2e-7 in fp32, in well under a second for small models.

Example:
    >>> report = export_onnx("path/to/model", "exported/")   # writes model.onnx, config.json, validation.json
    >>> report["max_abs_diff_with_past"] < 1e-4
    True
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_optim.core.atomic import staged_directory
from hf_optim.core.errors import ConfigError, HfOptimError
from hf_optim.export.runtime import ONNX_FILE, OnnxCausalLM

DEFAULT_OPSET = 17
EXTERNAL_DATA_FILE = "model.onnx_data"
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GiB
VALIDATION_FILE = "validation.json"
# families exercised by the tests; others of the same (decoder-only, DynamicCache) kind usually work too
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


class OnnxValidationError(HfOptimError):
    """The exported graph disagrees with PyTorch beyond the tolerance (or greedy generation diverged)."""


class _FlatCacheCausalLM(nn.Module):
    """``model`` behind a forward of flat tensors, which is what ONNX inputs and outputs must be."""

    def __init__(self, model: nn.Module, num_layers: int, with_past: bool) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.with_past = with_past

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        if not self.with_past:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            return out.logits
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **{_cache_argument(self.model): cache},
        )
        present = []
        for layer in _returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_argument(model: nn.Module) -> str:
    """transformers >= 5.x names the cache argument ``cache``; earlier 5.x releases call it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _check_supported(model: nn.Module) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    hint = f"export_onnx supports decoder-only causal LMs (tested: {', '.join(TESTED_MODEL_TYPES)})"
    if config is None:
        raise ConfigError(f"{name} is not a Transformers model (no .config); {hint}.")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"architecture {name} (model_type={model_type!r}) is encoder-decoder (seq2seq); {hint}.")
    # encoder-only families (BERT, RoBERTa...) also list an `...ForCausalLM`, but they have no KV-cache decoding path
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ConfigError(f"architecture {name} (model_type={model_type!r}) is not a decoder-only LM; {hint}.")
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is None or get_head() is None:
        raise ConfigError(f"{name} has no language-model head; pass the ...ForCausalLM model, not the base model.")


def _load(model_or_dir: Any) -> tuple[nn.Module, Any]:
    """The model (fp32) and a tokenizer when the source folder has one."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, None
    from transformers import AutoTokenizer

    from hf_optim.compression.storage import load_optimized

    source = Path(model_or_dir)
    if source.is_dir():
        model = load_optimized(source)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_or_dir), dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_or_dir))
    except (OSError, ValueError):  # a model folder without tokenizer files: export the graph alone
        tokenizer = None
    return model.float(), tokenizer


def _cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) read from a one-token run, so GQA and odd head sizes need no per-family code."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    cache = _returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None or layers[0].keys.dim() != 4:
        raise ConfigError(
            f"{type(model).__name__} did not return a DynamicCache of (batch, heads, seq, head_dim) tensors; "
            f"export_onnx supports decoder-only LMs with a standard KV cache (tested: {', '.join(TESTED_MODEL_TYPES)})."
        )
    return len(layers), int(layers[0].keys.shape[1]), int(layers[0].keys.shape[3])


def _io_names(num_layers: int, with_past: bool) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    if with_past:
        for layer in range(num_layers):
            for kind in ("key", "value"):
                inputs.append(f"past_key_values.{layer}.{kind}")
                outputs.append(f"present.{layer}.{kind}")
                axes[inputs[-1]] = {0: "batch", 2: "past_sequence"}
                axes[outputs[-1]] = {0: "batch", 2: "total_sequence"}
    return inputs, outputs, axes


def _write_onnx(
    wrapper: nn.Module, example: tuple, path: Path, names: tuple, opset: int, external_data_threshold: int
) -> bool:
    """Export to ``path``; re-save with the weights in ``model.onnx_data`` when they exceed the threshold."""
    import onnx

    inputs, outputs, axes = names
    raw = path.parent / "raw"
    raw.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every Python-level shape check in transformers' cache/mask code; validation is
        # what proves the graph stays correct for other shapes
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        # the padding-mask lookup indexes with aranges, never negative indices, which is all this warns about
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        # the legacy exporter writes external data by itself above 2 GiB, so export into a scratch folder first
        torch.onnx.export(
            wrapper, example, str(raw / ONNX_FILE), dynamo=False, input_names=inputs, output_names=outputs,
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
        )
    proto = onnx.load(str(raw / ONNX_FILE), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weight_bytes > external_data_threshold
    onnx.save_model(
        proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE, size_threshold=0,
    )
    shutil.rmtree(raw)
    return external


def _sample_batch(vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second right-padded, so validation covers the padding mask too."""
    ids = torch.randint(2, vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def _validate(model: nn.Module, folder: Path, with_past: bool, atol: float, new_tokens: int) -> dict:
    """Max |logits − PyTorch| with and without past, and greedy token identity, of the export in ``folder``."""
    runtime = OnnxCausalLM.from_pretrained(
        folder, providers=["CPUExecutionProvider"], num_threads=torch.get_num_threads()
    )
    generator = torch.Generator().manual_seed(0)
    ids, mask = _sample_batch(model.config.vocab_size, generator)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    report: dict[str, Any] = {"atol": atol}
    full = runtime(input_ids=ids, attention_mask=mask)
    report["max_abs_diff_no_past"] = float((full.logits - reference).abs().max())
    report["max_abs_diff_with_past"] = None
    if with_past:
        # prefill 7 tokens, then feed the remaining 5 against the ONNX cache
        split = 7
        first = runtime(input_ids=ids[:, :split], attention_mask=mask[:, :split])
        second = runtime(input_ids=ids[:, split:], attention_mask=mask, past_key_values=first.past_key_values)
        stitched = torch.cat([first.logits, second.logits], dim=1)
        report["max_abs_diff_with_past"] = float((stitched - reference).abs().max())
    prompt = ids[:1, :6]
    with torch.no_grad():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False
        )
    produced = runtime.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    report["greedy_tokens"] = new_tokens
    report["greedy_match"] = bool(produced.shape == expected.shape and torch.equal(produced, expected))
    failures = [
        f"{key}={report[key]:.3g} > atol={atol}"
        for key in ("max_abs_diff_no_past", "max_abs_diff_with_past")
        if report[key] is not None and not report[key] <= atol  # `not <=` also catches NaN
    ]
    if not report["greedy_match"]:
        failures.append(f"greedy generation diverged: ONNX {produced.tolist()} vs PyTorch {expected.tolist()}")
    report["passed"] = not failures
    report["failures"] = failures
    return report


def export_onnx(
    model_or_dir: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    with_past: bool = True,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    atol: float = 1e-4,
    tokenizer: Any = None,
    external_data_threshold: int = PROTOBUF_LIMIT,
) -> dict:
    """Export a decoder-only causal LM to ``output_dir/model.onnx`` (+ config, tokenizer, validation.json).

    Inputs have dynamic batch, sequence and past-sequence axes; with ``with_past`` the graph takes and returns one
    key and one value tensor per layer. The folder is written atomically (a temporary sibling renamed at the end,
    replacing an older export). Validation (on by default) compares logits with and without the cache and greedy
    generation against PyTorch and raises :class:`OnnxValidationError` when they disagree; nothing is written then.

    Example:
        >>> report = export_onnx(model, "exported/", with_past=True)
        >>> report["max_abs_diff_no_past"], report["greedy_match"]
        (1.8e-07, True)
    """
    if not isinstance(opset, int) or not 14 <= opset <= 20:
        raise ConfigError(f"opset={opset!r} is not supported by the exporter; use an integer 14-20 (default 17).")
    if atol <= 0:
        raise ConfigError(f"atol={atol} must be > 0 (default 1e-4 for fp32).")
    model, found_tokenizer = _load(model_or_dir)
    tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    _check_supported(model)
    weight = next(model.parameters())
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ConfigError(
            f"the model is {weight.dtype} on {weight.device}; export_onnx traces fp32 on the CPU: "
            "pass model.float().cpu()."
        )
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    was_training, attn = model.training, model.config._attn_implementation
    model.eval()
    # one attention path for every family: flash/flex kernels do not trace (sdpa would: it validated the same here)
    model.set_attn_implementation("eager")
    try:
        with staged_directory(output_dir) as staging:
            num_layers, kv_heads, head_dim = _cache_shape(model)
            wrapper = _FlatCacheCausalLM(model, num_layers, with_past)
            batch, seq, past = 2, 3, 4
            example: tuple = (
                torch.randint(2, model.config.vocab_size, (batch, seq)),
                torch.ones(batch, past + seq, dtype=torch.long),
                torch.arange(past, past + seq).expand(batch, -1),
            )
            if with_past:
                example += tuple(torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * num_layers))
            else:
                example = (example[0], example[1][:, past:], torch.arange(seq).expand(batch, -1))
            started = time.perf_counter()
            external = _write_onnx(
                wrapper, example, staging / ONNX_FILE, _io_names(num_layers, with_past), opset, external_data_threshold
            )
            export_seconds = time.perf_counter() - started
            model.config.save_pretrained(staging)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            report: dict[str, Any] = {
                "model_type": model.config.model_type, "with_past": with_past, "opset": opset,
                "num_layers": num_layers, "external_data": external, "export_seconds": round(export_seconds, 3),
                "validated": validate,
            }
            if validate:
                started = time.perf_counter()
                report.update(_validate(model, staging, with_past, atol, new_tokens=5))
                report["validation_seconds"] = round(time.perf_counter() - started, 3)
                if not report["passed"]:
                    raise OnnxValidationError(
                        f"ONNX export of {model.config.model_type} failed validation: {'; '.join(report['failures'])}. "
                        "Nothing was written; pass validate=False to keep an unvalidated export."
                    )
            (staging / VALIDATION_FILE).write_text(json.dumps(report, indent=2))
    finally:
        if attn:
            model.set_attn_implementation(attn)
        model.train(was_training)
    report["output_dir"] = str(output_dir)
    return report
