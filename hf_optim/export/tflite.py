"""Export a causal LM to a TFLite (LiteRT) flatbuffer with litert-torch, and run it with ai-edge-litert's interpreter.

The graph has one input, ``input_ids`` int32 of the fixed shape (1, sequence_length) (LiteRT runtimes favour int32
and static shapes; it is cast to int64 inside), and one output, the logits (1, sequence_length, vocab). There is no
KV cache: :class:`TFLiteCausalLM` decodes by running the whole fixed-length window again for every new token.

litert-torch is an optional extra (``pip install 'hf-optim[tflite]'``). litert-torch 0.10 pins xdsl 0.28, which
needs typing-extensions < 4.13, so it installs only beside pydantic <= 2.11 and anyio <= 4.14.

Example:
    >>> report = export_tflite("path/to/model", "model.tflite", sequence_length=64, quantize="dynamic-int8")
    >>> model = TFLiteCausalLM.from_pretrained("model.tflite")
    >>> ids = model.generate(torch.tensor([[1, 422, 1024]]), max_new_tokens=16, do_sample=False)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_optim.core.errors import ConfigError, HfOptimError
from hf_optim.export.runtime import greedy_stop_and_pad

QUANTIZE_MODES = ("none", "dynamic-int8", "weight-only-int8")
INSTALL_HINT = (
    "litert-torch and ai-edge-litert are not installed: pip install 'hf-optim[tflite]' "
    "(litert-torch 0.10 needs typing-extensions < 4.13, hence pydantic <= 2.11 and anyio <= 4.14)."
)


class TFLiteValidationError(HfOptimError):
    """The TFLite model's logits disagree with PyTorch beyond the tolerance."""


class _Int32LogitsLM(nn.Module):
    """``model`` as ``input_ids`` (int32) → logits: the one-input, one-output signature a LiteRT runtime expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.long(), use_cache=False).logits


def _import_litert_torch() -> Any:
    try:
        import litert_torch
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return litert_torch


def _new_interpreter(path: Path, num_threads: int | None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads or torch.get_num_threads())
    interpreter.allocate_tensors()
    return interpreter


def _quant_config(quantize: str) -> Any:
    if quantize == "none":
        return None
    from litert_torch.generative.quantize import quant_recipes

    # per-channel int8 weights of every supported op; dynamic also quantizes activations at run time
    return quant_recipes.full_dynamic_recipe() if quantize == "dynamic-int8" else quant_recipes.full_weight_only_recipe()


@dataclass
class TFLiteCausalLMOutput:
    """What one forward pass returns: ``logits`` (batch, seq, vocab)."""

    logits: torch.Tensor


class TFLiteCausalLM:
    """A ``.tflite`` file written by :func:`export_tflite`, run by ai-edge-litert's interpreter (XNNPACK on CPU).

    Takes any batch of sequences up to the exported ``sequence_length``: each row runs alone, right-padded to the
    fixed shape (the causal mask keeps padding from changing the real positions' logits). ``generate()`` is greedy
    and recomputes the full window for every token (no KV cache in the graph), so a decode step costs a prefill of
    ``sequence_length`` tokens. ``config.max_position_embeddings`` is the exported ``sequence_length``, so
    :func:`hf_optim.core.evaluation.evaluate_perplexity` picks windows the graph can take.

    Example:
        >>> model = TFLiteCausalLM.from_pretrained("model.tflite", num_threads=2)
        >>> logits = model(input_ids=torch.tensor([[1, 422, 1024]])).logits   # (1, 3, vocab)
        >>> out = model.generate(torch.tensor([[1, 422]]), max_new_tokens=8, do_sample=False)
    """

    def __init__(self, interpreter: Any, config: Any) -> None:
        self.interpreter = interpreter
        self.config = config
        (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
        self.sequence_length = int(source["shape"][1])
        self._input_index, self._input_dtype, self._output_index = source["index"], source["dtype"], target["index"]
        self._window = np.zeros((1, self.sequence_length), dtype=self._input_dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_threads: int | None = None) -> TFLiteCausalLM:
        """Load ``path`` (.tflite) and the config saved in its ``.tflite.json`` report by :func:`export_tflite`.

        ``num_threads`` defaults to ``torch.get_num_threads()``.

        Example:
            >>> model = TFLiteCausalLM.from_pretrained("model.tflite", num_threads=2)
        """
        from transformers import AutoConfig

        path = Path(path)
        report_path = path.with_suffix(".tflite.json")
        if not path.is_file() or not report_path.is_file():
            raise ConfigError(f"{str(path)!r} needs the .tflite file and its .tflite.json report; write both with "
                              "hf_optim.export.tflite.export_tflite(model, path).")
        if num_threads is not None and num_threads < 1:
            raise ConfigError(f"num_threads={num_threads} must be >= 1 (or None for torch.get_num_threads()).")
        report = json.loads(report_path.read_text())
        settings = dict(report["config"])
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        config.max_position_embeddings = report["sequence_length"]
        return cls(_new_interpreter(path, num_threads), config)

    def _run_window(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (len(tokens), vocab) of one sequence, run right-padded in the fixed window."""
        self._window[0, : len(tokens)] = tokens
        self._window[0, len(tokens):] = 0
        self.interpreter.set_tensor(self._input_index, self._window)
        self.interpreter.invoke()
        # a view into the interpreter's buffer (no copy of the whole window); copied before the next invoke
        return self.interpreter.tensor(self._output_index)()[0, : len(tokens)].copy()

    def _check_ids(self, input_ids: torch.Tensor, longest: int) -> None:
        if longest > self.sequence_length:
            raise ConfigError(f"{longest} tokens do not fit the exported sequence_length={self.sequence_length}; "
                              "export again with a larger sequence_length.")
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.config.vocab_size:
            raise ConfigError(f"input_ids must lie in [0, {self.config.vocab_size}) (the vocabulary).")

    @staticmethod
    def _real_span(mask_row: torch.Tensor) -> tuple[int, int]:
        """(start, end) of the one run of ones in an attention-mask row (left or right padding, not holes)."""
        ones = mask_row.nonzero().flatten()
        if len(ones) == 0:
            return 0, 0
        start, end = int(ones[0]), int(ones[-1]) + 1
        if end - start != len(ones):
            raise ConfigError("attention_mask rows must be one run of ones (left or right padding), not have holes.")
        return start, end

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TFLiteCausalLMOutput:
        """Logits (batch, seq, vocab); padded positions (``attention_mask`` 0) get zeros."""
        input_ids = torch.as_tensor(input_ids).long().cpu()
        batch, seq = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).cpu()
        spans = [self._real_span(row) for row in mask]
        self._check_ids(input_ids, max(end - start for start, end in spans))
        logits = np.zeros((batch, seq, self.config.vocab_size), dtype=np.float32)
        for row, (start, end) in enumerate(spans):
            if end > start:
                logits[row, start:end] = self._run_window(input_ids[row, start:end].numpy())
        return TFLiteCausalLMOutput(logits=torch.from_numpy(logits))

    forward = __call__

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding: prompt + new ids (batch, prompt + new); finished rows (EOS) are padded with the pad id.

        ``eos_token_id=-1`` never stops early. The prompt plus ``max_new_tokens`` must fit ``sequence_length``.

        Example:
            >>> model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape
            torch.Size([1, 7])
        """
        if do_sample:
            raise ConfigError("do_sample=True is not supported by TFLiteCausalLM.generate; use do_sample=False.")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        input_ids = torch.as_tensor(input_ids).long().cpu()
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).cpu()
        spans = [self._real_span(row) for row in mask]
        if any(end == start for start, end in spans):
            raise ConfigError("every prompt row needs at least one token (a one in attention_mask).")
        self._check_ids(input_ids, max(end - start for start, end in spans) + max_new_tokens)
        eos_list, pad = greedy_stop_and_pad(self.config.eos_token_id if eos_token_id is None else eos_token_id,
                                            self.config.pad_token_id if pad_token_id is None else pad_token_id)
        eos_ids, pad = set(eos_list), 0 if pad is None else pad
        new_tokens = np.full((input_ids.shape[0], max_new_tokens), pad, dtype=np.int64)
        produced = 0
        for row, (start, end) in enumerate(spans):
            tokens = input_ids[row, start:end].tolist()
            for step in range(max_new_tokens):
                token = int(self._run_window(np.asarray(tokens))[-1].argmax())
                new_tokens[row, step], tokens = token, tokens + [token]
                if token in eos_ids:
                    break
            produced = max(produced, step + 1)
        return torch.cat([input_ids, torch.from_numpy(new_tokens[:, :produced])], dim=-1)


def export_tflite(
    model_or_dir: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    sequence_length: int = 128,
    quantize: str = "none",
    atol: float = 1e-4,
) -> dict:
    """Convert to ``output`` (.tflite) and write ``<output>.json`` with max |logits − PyTorch| and the model config.

    fp32 (``quantize="none"``) must agree to ``atol`` or :class:`TFLiteValidationError` is raised and nothing is
    written; quantized models report their difference and top-1 agreement without a limit. The check runs the
    written file through :class:`TFLiteCausalLM` on a random full window and on a shorter right-padded one.
    Written atomically.

    Example:
        >>> export_tflite(model, "tiny.tflite", sequence_length=32)["max_abs_diff"] < 1e-4
        True
    """
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={quantize!r} is not supported; use one of {', '.join(QUANTIZE_MODES)}.")
    if not isinstance(sequence_length, int) or sequence_length < 1:
        raise ConfigError(f"sequence_length={sequence_length!r} must be a positive integer (the fixed input length).")
    output = Path(output)
    if output.suffix != ".tflite":
        raise ConfigError(f"output={str(output)!r} must end in .tflite.")
    from hf_optim.export.onnx import _check_supported, _load

    model, _ = _load(model_or_dir)
    _check_supported(model)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and sequence_length > limit:
        raise ConfigError(f"sequence_length={sequence_length} exceeds the model's {limit} positions.")
    litert_torch = _import_litert_torch()  # after the input checks, so those errors show without the extra

    was_training = model.training
    model.eval()
    wrapper = _Int32LogitsLM(model).eval()
    ids = torch.randint(2, model.config.vocab_size, (1, sequence_length), dtype=torch.int32,
                        generator=torch.Generator().manual_seed(0))
    try:
        started = time.perf_counter()
        with torch.no_grad():
            edge = litert_torch.convert(wrapper, (ids,), quant_config=_quant_config(quantize))
            reference = wrapper(ids)
            prefix = max(1, sequence_length // 2)
            reference_prefix = wrapper(ids[:, :prefix])
        convert_seconds = time.perf_counter() - started
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = output.with_name(f".{output.name}.{os.getpid()}.tflite")
        report_staging = staging.with_suffix(".tflite.json")
        config = model.config.to_dict()
        report = {
            "output": str(output), "quantize": quantize, "sequence_length": sequence_length,
            "input": {"name": "input_ids", "dtype": "int32", "shape": [1, sequence_length]},
            "config": config,
        }
        try:
            edge.export(str(staging))
            report_staging.write_text(json.dumps(report, indent=2))
            runner = TFLiteCausalLM.from_pretrained(staging)
            logits = runner(input_ids=ids).logits
            # a shorter sequence, right-padded inside the window, must give the same logits as PyTorch too
            logits_prefix = runner(input_ids=ids[:, :prefix]).logits
            diff = max(float((logits - reference).abs().max()), float((logits_prefix - reference_prefix).abs().max()))
            report.update({
                "logits_shape": list(logits.shape), "max_abs_diff": diff,
                "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                "atol": atol if quantize == "none" else None, "size_bytes": staging.stat().st_size,
                "convert_seconds": round(convert_seconds, 3), "litert_torch_version": litert_torch.__version__,
            })
            if quantize == "none" and not diff <= atol:  # `not <=` also catches NaN
                raise TFLiteValidationError(
                    f"TFLite logits differ from PyTorch by {diff:.3g} > atol={atol}; nothing was written."
                )
            report_staging.write_text(json.dumps(report, indent=2))
            os.replace(staging, output)
            os.replace(report_staging, output.with_suffix(".tflite.json"))
        finally:
            staging.unlink(missing_ok=True)
            report_staging.unlink(missing_ok=True)
    finally:
        model.train(was_training)
    return report
