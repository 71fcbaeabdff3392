"""Model quality and cost numbers shared by every stage: perplexity, size on disk, sparsity, generation speed.

Perplexity uses the strided sliding window of Transformers' "Perplexity of fixed-length models" guide: the texts
are joined with blank lines and tokenized once; windows of ``max_length`` tokens move by ``stride``, and each token
is scored once, with at least ``max_length - stride`` tokens of context (except at the very start).

Example:
    >>> ppl = evaluate_perplexity(model, tokenizer, texts, max_length=256, stride=128)  # doctest: +SKIP
    >>> parameter_stats(model)["linear_sparsity"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_optim.core.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".onnx_data", ".tflite", ".engine")


def _device_of(model) -> torch.device:
    """The device of a torch model's weights; CPU for runtimes that take CPU tensors (e.g. OnnxCausalLM)."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return torch.device("cpu")
    try:
        return next(parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _EvalMode:
    """``model.eval()`` for the duration, restoring training mode; a no-op for models that have no modes."""

    def __init__(self, model) -> None:
        self.model, self.was_training = model, getattr(model, "training", False)

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc) -> None:
        if hasattr(self.model, "train"):
            self.model.train(self.was_training)


@torch.no_grad()
def evaluate_perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``model`` on ``texts`` with a strided sliding window (exp of the mean token NLL).

    ``model`` is a Transformers causal LM or any runtime with ``model(input_ids=...).logits`` and a ``config``
    (e.g. :class:`hf_optim.OnnxCausalLM`).

    ``max_length`` defaults to the model's context (capped at 1024), ``stride`` to half of it; ``max_tokens`` caps
    how much of the text is scored (for quick checks); ``batch_size`` windows run per forward pass.
    """
    if not texts or not any(t.strip() for t in texts):
        raise ConfigError("evaluate_perplexity got no text; pass a non-empty list of strings.")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1024
    max_length = max_length or min(int(context), 1024)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise ConfigError(f"stride={stride} must be in [1, max_length={max_length}].")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ConfigError("The evaluation text is shorter than two tokens.")
    # (begin, end, first scored target) of every window; each token is scored by exactly one window
    windows, previous_end = [], 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        windows.append((begin, end, max(0, (end - begin - 1) - (end - previous_end))))
        previous_end = end
        if end == ids.numel():
            break
    device = _device_of(model)
    nll_sum, scored = 0.0, 0
    with _EvalMode(model):
        # windows of equal length run as one batch; only the last window can be shorter
        for length in sorted({end - begin for begin, end, _ in windows}, reverse=True):
            group = [w for w in windows if w[1] - w[0] == length]
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                batch = torch.stack([ids[begin:end] for begin, end, _ in chunk]).to(device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), batch[:, 1:], reduction="none"
                )  # [windows, length - 1]
                for row, (_, _, first) in enumerate(chunk):
                    nll_sum += float(nll[row, first:].sum())
                    scored += nll.shape[1] - first
    return math.exp(nll_sum / scored)


def size_on_disk(path: str | Path) -> int:
    """Bytes of the weight files (safetensors, bin, onnx, tflite, engine, ...) in a folder, or of one file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} does not exist.")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def parameter_stats(model: nn.Module) -> dict[str, Any]:
    """Parameter count, and the share of exact zeros over all weights and over the linear layers' weights."""
    def zeros_in(tensor: torch.Tensor) -> int:
        # quantized tensor subclasses (torchao, bitsandbytes) hold codes, not values: their zeros are not sparsity
        plain = type(tensor) in (torch.Tensor, nn.Parameter) and type(tensor.data) is torch.Tensor
        return int((tensor == 0).sum()) if plain and tensor.is_floating_point() else 0

    total = sum(p.numel() for p in model.parameters())
    zeros = sum(zeros_in(p) for p in model.parameters())
    linear = [m.weight for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    linear_total = sum(w.numel() for w in linear)
    linear_zeros = sum(zeros_in(w) for w in linear)
    return {
        "parameters": total,
        "sparsity": zeros / total if total else 0.0,
        "linear_parameters": linear_total,
        "linear_sparsity": linear_zeros / linear_total if linear_total else 0.0,
    }


@torch.no_grad()
def generation_speed(
    model, tokenizer, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3
) -> dict[str, float]:
    """Prefill latency (s) and greedy decode tokens/s at batch 1 on the model's device (best of ``repeats``)."""
    device = _device_of(model)
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (1, prompt_tokens), generator=generator).to(device)

    def timed(fn) -> float:
        best = math.inf
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate = dict(do_sample=False, pad_token_id=pad_id, attention_mask=torch.ones_like(input_ids))
    output = {}

    def run_generate() -> None:
        output["ids"] = model.generate(input_ids, max_new_tokens=new_tokens, **generate)

    with _EvalMode(model):
        prefill = timed(lambda: model(input_ids=input_ids))
        total = timed(run_generate)
    produced = int(output["ids"].shape[1]) - prompt_tokens  # fewer than asked if EOS came first
    decode_time = max(total - prefill, 1e-9)
    return {
        "prefill_seconds": prefill,
        "decode_tokens_per_s": (produced - 1) / decode_time if produced > 1 else float("nan"),
        "generate_seconds": total,
        "prompt_tokens": prompt_tokens,
        "new_tokens": produced,
        "device": device.type,
    }
