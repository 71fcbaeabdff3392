"""Run a folder written by :func:`hf_optim.export_onnx` with ONNX Runtime, with a Transformers-like ``generate()``.

The graph describes itself: inputs ``input_ids``, ``attention_mask``, ``position_ids`` and, when exported with the
KV cache, ``past_key_values.{i}.key/value`` (batch, kv_heads, past_len, head_dim); outputs ``logits`` and
``present.{i}.key/value``.

``generate()`` keeps the whole greedy loop in NumPy and, with the KV cache, runs it through ONNX Runtime IO binding:
each step's ``present`` tensors stay ONNX Runtime values (on the device of the execution provider) and are bound as
the next step's ``past`` inputs, so the cache never travels through NumPy or torch between steps.

Example:
    >>> model = OnnxCausalLM.from_pretrained("exported/")
    >>> ids = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hf_optim.core.errors import ConfigError

ONNX_FILE = "model.onnx"
# GPU providers first: ONNX Runtime tries them in order and falls back to the CPU for unsupported nodes.
_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class OnnxCausalLMOutput:
    """What one forward pass returns: ``logits`` (batch, seq, vocab) and the updated cache (``None`` without one)."""

    logits: torch.Tensor
    past_key_values: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None


def greedy_stop_and_pad(eos: int | Sequence[int] | None, pad: int | None) -> tuple[list[int], int | None]:
    """The EOS ids as a list and the id that pads finished rows: ``pad``, else the first EOS (transformers' rule).

    Example:
        >>> greedy_stop_and_pad([2, 7], None)
        ([2, 7], 2)
    """
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos_ids, pad if pad is not None else (eos_ids[0] if eos_ids else None)


def default_providers() -> list[str]:
    """The execution providers available here, best first (TensorRT, CUDA, then CPU)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [name for name in _PREFERRED_PROVIDERS if name in available]


class OnnxCausalLM:
    """A causal LM exported to ONNX, run by ONNX Runtime, with the KV cache when the export has one.

    Example:
        >>> model = OnnxCausalLM.from_pretrained("exported/")
        >>> logits = model(input_ids=ids, attention_mask=mask).logits
        >>> out = model.generate(ids, max_new_tokens=16, do_sample=False)
    """

    def __init__(
        self, session: Any, config: Any, generation_config: dict | None = None, io_binding: bool = True
    ) -> None:
        self.session = session
        self.config = config
        self.generation_config = generation_config or {}
        # IO binding keeps the cache inside ONNX Runtime between steps; False runs the plain session.run loop
        self.io_binding = io_binding
        inputs = {node.name: node for node in session.get_inputs()}
        self.input_names = set(inputs)
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        self.use_cache = self.num_layers > 0
        if self.use_cache:
            key = inputs["past_key_values.0.key"]
            self._kv_heads, self._head_dim = int(key.shape[1]), int(key.shape[3])
            self._kv_dtype = np.float16 if key.type == "tensor(float16)" else np.float32
        self.output_names = [node.name for node in session.get_outputs()]

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
        allow_spinning: bool = False,
        io_binding: bool = True,
    ) -> "OnnxCausalLM":
        """Load ``model_dir/model.onnx`` (and its config.json) on the best available execution provider.

        ``num_threads`` sets ONNX Runtime's intra-op threads (default: one per physical core). Idle worker threads
        sleep between operators unless ``allow_spinning`` (ONNX Runtime's own default) lets them busy-wait: measured
        here, spinning was between 2% slower and 10% faster on idle cores, and 1.5-4x slower when other processes or
        threads (a server's monitoring thread, parallel tests) compete for the cores. ``io_binding`` False keeps
        ``generate()`` on the plain ``session.run`` loop (the cache copied out to NumPy and back every step).

        Example:
            >>> model = OnnxCausalLM.from_pretrained("exported/", providers=["CPUExecutionProvider"], num_threads=2)
        """
        import onnxruntime as ort
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        if not (model_dir / ONNX_FILE).is_file():
            raise ConfigError(f"{str(model_dir)!r} has no {ONNX_FILE}; write one with hf_optim.export_onnx(model, dir)")
        if num_threads is not None and num_threads < 1:
            raise ConfigError(f"num_threads={num_threads} must be >= 1 (or None for one per physical core).")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # one operator after another: a decode step is a chain of small ops, and parallel mode only adds scheduling
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        session = ort.InferenceSession(
            str(model_dir / ONNX_FILE), sess_options=options, providers=list(providers or default_providers())
        )
        config = AutoConfig.from_pretrained(model_dir)
        gen_file = model_dir / "generation_config.json"
        generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls(session, config, generation_config, io_binding=io_binding)

    def _empty_past(self, batch: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        empty = np.zeros((batch, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
        return tuple((empty, empty) for _ in range(self.num_layers))

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None,
    ) -> OnnxCausalLMOutput:
        """One forward pass. Without ``position_ids`` they count on from the cache, as the PyTorch model does."""
        input_ids = torch.as_tensor(input_ids).long().cpu()
        batch, seq = input_ids.shape
        if past_key_values is not None and not self.use_cache:
            raise ConfigError("this export has no KV cache (with_past=False); call it without past_key_values.")
        if self.use_cache and past_key_values is None:
            past_key_values = self._empty_past(batch)
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, dtype=torch.long).expand(batch, -1)
        feeds = {
            "input_ids": input_ids.numpy(),
            "attention_mask": torch.as_tensor(attention_mask).long().cpu().numpy(),
            "position_ids": torch.as_tensor(position_ids).long().cpu().contiguous().numpy(),
        }
        for layer, (key, value) in enumerate(past_key_values or ()):
            feeds[f"past_key_values.{layer}.key"] = key
            feeds[f"past_key_values.{layer}.value"] = value
        results = self.session.run(self.output_names, feeds)
        outputs = dict(zip(self.output_names, results))
        present = None
        if self.use_cache:
            present = tuple(
                (outputs[f"present.{layer}.key"], outputs[f"present.{layer}.value"]) for layer in range(self.num_layers)
            )
        return OnnxCausalLMOutput(logits=torch.from_numpy(outputs["logits"]), past_key_values=present)

    forward = __call__

    def _special_id(self, name: str) -> int | list[int] | None:
        value = self.generation_config.get(name)
        return value if value is not None else getattr(self.config, name, None)

    def _device(self) -> str:
        """Where ONNX Runtime keeps outputs bound to the device: the GPU for CUDA/TensorRT sessions, else the CPU."""
        gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(self.session.get_providers())
        return "cuda" if gpu else "cpu"

    def _last_logits(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple:
        """One plain step: logits of the last position (batch, vocab) as NumPy, and the new cache."""
        out = self(
            input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions), past_key_values=past,
        )
        return out.logits[:, -1, :].numpy(), out.past_key_values

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding like ``transformers`` ``generate``: returns prompt + new ids, (batch, prompt + new).

        Prefills the prompt once, then feeds one token per step with the KV cache (or the whole sequence again for
        an export without cache). Finished rows (EOS) are padded with ``pad_token_id``; stops when all finished.

        Example:
            >>> model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape
            torch.Size([1, 7])
        """
        if do_sample:
            raise ConfigError("do_sample=True is not supported by OnnxCausalLM.generate; use do_sample=False (greedy).")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        ids = torch.as_tensor(input_ids).long().cpu()
        ids = (ids.unsqueeze(0) if ids.dim() == 1 else ids).numpy()
        batch = ids.shape[0]
        mask = np.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long().cpu().numpy()
        mask = mask.reshape(ids.shape)
        eos_list, pad = greedy_stop_and_pad(
            self._special_id("eos_token_id") if eos_token_id is None else eos_token_id,
            self._special_id("pad_token_id") if pad_token_id is None else pad_token_id,
        )
        eos_ids = np.asarray(eos_list, dtype=np.int64)
        # positions count real tokens only, so left-padded rows start at 0 (transformers' rule)
        positions = np.where(mask == 0, 0, mask.cumsum(-1) - 1)
        bound = _BoundDecoder(self, batch) if self.use_cache and self.io_binding else None
        new_tokens: list[np.ndarray] = []
        step_ids, step_positions, past = ids, positions, None
        unfinished = np.ones(batch, dtype=bool)
        for _ in range(max_new_tokens):
            if bound is not None:
                logits = bound.step(step_ids, mask, step_positions)
            else:
                logits, past = self._last_logits(step_ids, mask, step_positions, past)
            next_tokens = logits.argmax(-1).astype(np.int64)
            if pad is not None:
                next_tokens = np.where(unfinished, next_tokens, pad)
            new_tokens.append(next_tokens)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=-1)
            positions = np.concatenate([positions, positions[:, -1:] + 1], axis=-1)
            if len(eos_ids):
                unfinished &= ~np.isin(next_tokens, eos_ids)
                if not unfinished.any():
                    break
            if self.use_cache:
                step_ids, step_positions = next_tokens[:, None], positions[:, -1:]
            else:
                step_ids, step_positions = np.concatenate([ids, np.stack(new_tokens, axis=-1)], axis=-1), positions
        return torch.from_numpy(np.concatenate([ids, np.stack(new_tokens, axis=-1)], axis=-1))


class _BoundDecoder:
    """Greedy-decoding steps through ONNX Runtime IO binding, the cache kept as ONNX Runtime values between steps.

    Every step binds the small inputs (ids, mask, positions) from NumPy without a copy, lets ONNX Runtime allocate
    the outputs on the session's device, and binds each ``present`` output as the next step's ``past`` input as it
    is, so the cache is never copied out of ONNX Runtime. Only the last position's logits come back to NumPy.
    """

    def __init__(self, model: OnnxCausalLM, batch: int) -> None:
        import onnxruntime as ort

        self._session = model.session
        self._binding = model.session.io_binding()
        self._device = model._device()
        self._output_names = model.output_names
        self._past_names = [
            f"past_key_values.{layer}.{kind}" for layer in range(model.num_layers) for kind in ("key", "value")
        ]
        self._present_names = [name.replace("past_key_values.", "present.", 1) for name in self._past_names]
        empty = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch, model._kv_heads, 0, model._head_dim), dtype=model._kv_dtype), self._device
        )
        for name in self._past_names:
            self._binding.bind_ortvalue_input(name, empty)
        self._inputs: tuple[np.ndarray, ...] = ()

    def step(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run one forward pass; returns the last position's logits (batch, vocab) as NumPy."""
        # bind_cpu_input wraps the arrays without copying, so they must outlive the run
        self._inputs = tuple(np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, mask, positions))
        for name, array in zip(("input_ids", "attention_mask", "position_ids"), self._inputs):
            self._binding.bind_cpu_input(name, array)
        for name in self._output_names:
            self._binding.bind_output(name, self._device)
        self._session.run_with_iobinding(self._binding)
        outputs = dict(zip(self._output_names, self._binding.get_outputs()))
        for past, present in zip(self._past_names, self._present_names):
            self._binding.bind_ortvalue_input(past, outputs[present])
        return outputs["logits"].numpy()[:, -1, :]
