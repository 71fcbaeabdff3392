"""Serving a causal LM over HTTP with monitoring attached: ``POST /generate``, ``/health``, ``/metrics``, ``/monitoring``.

The model is a PyTorch folder (plain Transformers or written by :func:`hf_optim.save_optimized`; safetensors,
``trust_remote_code`` off) or an ONNX export folder (``model.onnx``, run by :class:`hf_optim.OnnxCausalLM`).

Concurrency: requests are answered by the asyncio event loop, which never runs the model. Each accepted
``/generate`` request becomes a job for *one* generation thread, so generations run one at a time in arrival order
(the model's own intra-op threads use the cores; on a CPU, running several generations at once would only share
the same cores and lengthen every request). At most ``max_pending_requests`` requests wait or run at any moment;
the next one gets ``503`` with ``Retry-After`` instead of an unbounded queue. ``/health``, ``/metrics`` and
``/monitoring`` never wait for the model.

Monitoring stays off the request path: after a generation, the request is appended to the traffic log and handed to
a bounded queue (:class:`~hf_optim.monitoring.collector.TrafficCollector`); a background thread computes the
features of each window against the reference profile, exports them as metrics, fires alerts, counts windows
towards the retraining trigger and runs the sampled shadow comparisons. When that thread falls behind, samples are
dropped and counted (``hf_optim_monitoring_samples_dropped_total``), never waited for.

Example:
    >>> serve("out/model", port=8000, config=ServeConfig(reference_profile="profile.json"))  # doctest: +SKIP
    $ curl -s localhost:8000/generate -d '{"prompt": "Once upon a time", "max_new_tokens": 16}'
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from hf_optim.core.errors import ConfigError
from hf_optim.monitoring.alerts import AlertManager, AlertSink, build_sinks
from hf_optim.monitoring.collector import TrafficCollector, TrafficSample
from hf_optim.monitoring.metrics import ServerMetrics
from hf_optim.monitoring.retrain import RetrainTrigger
from hf_optim.monitoring.shadow import ShadowComparator

logger = logging.getLogger("hf_optim.monitoring.server")


@dataclass
class ServeConfig:
    """Limits and monitoring settings of a server (the ``hf-optim serve`` options).

    Example:
        >>> config = ServeConfig(max_new_tokens_limit=128, reference_profile="profile.json", window_size=50)
    """

    max_new_tokens_limit: int = 256
    default_max_new_tokens: int = 32
    max_prompt_chars: int = 8000
    max_pending_requests: int = 64
    device: str = "auto"  # "auto" = the first CUDA GPU when there is one, else the CPU (PyTorch models)
    # --- monitoring ---
    monitoring: bool = True  # False: no traffic log, no collector (the baseline of the overhead benchmark)
    reference_profile: str | None = None
    output_reference_profile: str | None = None  # profile of healthy *outputs*: adds output_* drift metrics
    window_size: int = 100
    window_seconds: float | None = 300.0
    min_window_size: int | None = None
    queue_size: int = 1024
    traffic_log: str | None = None
    alert_webhooks: Sequence[str] = ()
    alert_cooldown_s: float = 300.0
    retrain_command: str | None = None
    retrain_after_windows: int = 3
    retrain_cooldown_s: float = 3600.0
    retrain_log: str | None = None  # default: retrain.log beside the traffic log (or in the working folder)
    shadow: str | None = None  # base model folder to compare the served model against
    shadow_sample_rate: float = 0.1

    def __post_init__(self) -> None:
        for name in ("max_new_tokens_limit", "default_max_new_tokens", "max_prompt_chars", "max_pending_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            self.default_max_new_tokens = self.max_new_tokens_limit
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ConfigError(f"device={self.device!r} is not a torch device; use auto, cpu or cuda:0.") from exc
        for name in ("reference_profile", "output_reference_profile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}={path!r} does not exist; write one with "
                                  "`hf-optim monitor fit-reference --texts FILE --output PROFILE`.")
        if self.output_reference_profile is not None and self.reference_profile is None:
            raise ConfigError("output_reference_profile needs reference_profile (the prompts' profile) too.")
        if self.shadow is not None and not Path(self.shadow).is_dir():
            raise ConfigError(f"shadow base model folder {self.shadow!r} does not exist.")
        if self.retrain_command is not None and self.reference_profile is None:
            raise ConfigError("a retrain command needs monitoring windows to count: pass a reference profile too.")
        if isinstance(self.alert_webhooks, str):
            self.alert_webhooks = (self.alert_webhooks,)


# --- the served model ---------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One finished generation: token ids, decoded new text, why it stopped, and its timings in seconds."""

    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    finish_reason: str
    generate_s: float
    time_to_first_token_s: float | None
    time_per_output_token_s: float | None


class _ClockStreamer:
    """A Transformers streamer that ignores the prompt and appends the time of every new token to ``times``."""

    def __init__(self, times: list[float]) -> None:
        self.times, self._prompt_seen = times, False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class _ClockedSession:
    """Wraps an ONNX Runtime session: each run in the generating thread is one decoding step (one new token)."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    @contextlib.contextmanager
    def timing(self, times: list[float]) -> Iterator[None]:
        self._local.times = times
        try:
            yield
        finally:
            self._local.times = None

    def _timed(self, method: str, *args: Any, **kwargs: Any) -> Any:
        outputs = getattr(self._session, method)(*args, **kwargs)
        times = getattr(self._local, "times", None)
        if times is not None:
            times.append(time.perf_counter())
        return outputs

    # the two ways OnnxCausalLM runs a decoding step (plain, or with IO binding)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("run", *args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("run_with_iobinding", *args, **kwargs)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ServedModel:
    """A loaded causal LM and its tokenizer behind one ``generate`` that also reports token timings.

    Example:
        >>> served = ServedModel.load("out/model")
        >>> served.generate(served.encode("Once upon a time"), max_new_tokens=8).text  # doctest: +SKIP
    """

    def __init__(self, model: Any, tokenizer: Any, backend: str, name: str) -> None:
        self.model, self.tokenizer, self.backend, self.name = model, tokenizer, backend, name
        config = getattr(model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        generation_config = getattr(model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        if eos is None and isinstance(generation_config, dict):
            eos = generation_config.get("eos_token_id")
        if eos is None:
            eos = getattr(config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        if backend == "onnx":
            model.session = _ClockedSession(model.session)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "auto") -> ServedModel:
        """Load an ONNX export folder (it has ``model.onnx``) or a PyTorch causal-LM folder, with its tokenizer."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"model folder {str(model_dir)!r} does not exist.")
        if (model_dir / "model.onnx").is_file():
            from hf_optim.export.runtime import OnnxCausalLM

            model, backend = OnnxCausalLM.from_pretrained(model_dir), "onnx"
        else:
            from hf_optim.compression.storage import load_optimized

            resolved = _resolve_device(device)
            model = load_optimized(model_dir, device=resolved if resolved.type == "cuda" else None).eval()
            backend = "pytorch"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)  # trust_remote_code stays off
        return cls(model, tokenizer, backend, model_dir.name)

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, verbose=False)["input_ids"])

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0
    ) -> Generation:
        """Generate up to ``max_new_tokens`` after ``prompt_ids``; greedy unless ``do_sample``."""
        times: list[float] = []  # when each new token appeared
        start = time.perf_counter()
        if self.backend == "onnx":
            with self.model.session.timing(times):
                sequences = self.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens)
        else:
            device = next(self.model.parameters()).device
            input_ids = torch.tensor([prompt_ids], device=device)
            sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
            sequences = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id, streamer=_ClockStreamer(times), **sampling,
            )
        generate_s = time.perf_counter() - start
        new_ids = sequences[0, len(prompt_ids):].tolist()
        if self.eos_ids:  # drop padding after the first EOS (batch of one: normally none)
            stop = next((i + 1 for i, token in enumerate(new_ids) if token in self.eos_ids), len(new_ids))
            new_ids = new_ids[:stop]
        finish_reason = "stop" if new_ids and new_ids[-1] in self.eos_ids else "length"
        times = times[: len(new_ids)]
        return Generation(
            prompt_ids=list(prompt_ids), new_ids=new_ids,
            text=self.tokenizer.decode(new_ids, skip_special_tokens=True), finish_reason=finish_reason,
            generate_s=generate_s,
            time_to_first_token_s=times[0] - start if times else None,
            time_per_output_token_s=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
        )


# numbers per request that a reference profile can hold, and what computing them needs
MODEL_QUALITY = ("prompt_perplexity", "output_entropy", "output_logprob")
FLAG_QUALITY = ("empty_output", "truncated_output", "repeated_output")
_MAX_LOGITS_PER_BATCH = 1 << 25  # 128 MiB of fp32 logits per teacher-forced batch


@torch.no_grad()
def request_quality(
    model: Any, samples: Sequence[TrafficSample], names: set[str] | Sequence[str], pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Label-free quality numbers of served requests, one per sample, for the ``names`` asked for.

    ``prompt_perplexity``, ``output_entropy`` and ``output_logprob`` come from one teacher-forced forward pass of
    ``model`` over prompt + generated tokens (the logits at the generated positions are the ones generation saw);
    ``empty_output``, ``truncated_output`` and ``repeated_output`` from the text and token counts. Also
    ``latency_seconds``. The math is :mod:`hf_optim.monitoring.quality`'s.

    Example:
        >>> request_quality(model, window, {"output_entropy", "truncated_output"})  # doctest: +SKIP
        {'output_entropy': array([2.1, ...]), 'truncated_output': array([0., 1., ...])}
    """
    from hf_optim.monitoring.quality import output_entropy_logprob, output_flags

    names = set(names)
    values: dict[str, np.ndarray] = {}
    if "latency_seconds" in names:
        values["latency_seconds"] = np.array([sample.latency_s for sample in samples])
    if names & set(FLAG_QUALITY):
        flags = output_flags(
            [s.output for s in samples], [s.output_tokens for s in samples], [s.max_new_tokens for s in samples],
            ended_with_eos=[s.finish_reason == "stop" for s in samples],
        )
        values.update({name: flag for name, flag in flags.items() if name in names})
    wanted = names & set(MODEL_QUALITY)
    if not wanted:
        return values
    columns = {name: np.full(len(samples), np.nan) for name in MODEL_QUALITY}
    rows = [i for i, s in enumerate(samples) if s.token_ids is not None and len(s.token_ids) >= 2]
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32000)
    parameters = getattr(model, "parameters", None)
    device = next(parameters()).device if parameters is not None else torch.device("cpu")
    begin = 0
    while begin < len(rows):
        # as many samples as fit the logits budget (at least one)
        end, width = begin + 1, len(samples[rows[begin]].token_ids)
        while end < len(rows):
            grown = max(width, len(samples[rows[end]].token_ids))
            if (end - begin + 1) * grown * vocab > _MAX_LOGITS_PER_BATCH:
                break
            end, width = end + 1, grown
        batch = [samples[i] for i in rows[begin:end]]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sample in enumerate(batch):
            ids[row, : len(sample.token_ids)] = torch.tensor(sample.token_ids)
            mask[row, : len(sample.token_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float().cpu()
        targets = ids[:, 1:]
        position = torch.arange(width - 1)[None]
        prompt_length = torch.tensor([s.prompt_tokens for s in batch])[:, None]
        total_length = torch.tensor([len(s.token_ids) for s in batch])[:, None]
        # position j predicts token j + 1: the prompt's own tokens, then the generated ones
        _, prompt_logprob = output_entropy_logprob(logits, targets, position < prompt_length - 1)
        entropy, logprob = output_entropy_logprob(
            logits, targets, (position >= prompt_length - 1) & (position < total_length - 1)
        )
        chosen = rows[begin:end]
        columns["prompt_perplexity"][chosen] = np.exp(-prompt_logprob)
        columns["output_entropy"][chosen] = entropy
        columns["output_logprob"][chosen] = logprob
        begin = end
    values.update({name: columns[name] for name in wanted})
    return values


# --- requests -----------------------------------------------------------------------------------------------------


class RequestRejected(Exception):
    """A request the server refuses: HTTP ``status``, a bounded ``reason`` label and a message for the client."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class GenerateRequest(BaseModel):
    """The JSON body of ``POST /generate``; unknown fields are refused so that typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1)
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    do_sample: StrictBool = False
    temperature: float = Field(1.0, gt=0.0, le=100.0, strict=True)


def _validation_message(error: Any) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts) + ' (expected {"prompt": str, "max_new_tokens": int, "do_sample": bool, ' \
                              '"temperature": float})'


# --- the server ---------------------------------------------------------------------------------------------------


class ModelServer:
    """Everything behind the HTTP routes: the model, the generation thread, metrics and the monitoring pipeline.

    Example:
        >>> server = ModelServer(ServedModel.load("out/model"), ServeConfig())  # doctest: +SKIP
        >>> app = server.app()  # doctest: +SKIP
    """

    def __init__(
        self, served: ServedModel, config: ServeConfig | None = None, alert_callbacks: Sequence[AlertSink] = ()
    ) -> None:
        self.served = served
        self.config = config or ServeConfig()
        self.metrics = ServerMetrics()
        self.started = time.time()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-optim-generate")
        self._pending = 0
        self._max_body_bytes = 12 * self.config.max_prompt_chars + 4096  # "\uXXXX" escapes, with room for the rest
        self.monitor: Any = None
        self.output_monitor: Any = None
        self.alerts: AlertManager | None = None
        self.retrain: RetrainTrigger | None = None
        self.shadow: ShadowComparator | None = None
        self.collector: TrafficCollector | None = None
        if self.config.monitoring:
            self._build_monitoring(alert_callbacks)

    def _build_monitoring(self, alert_callbacks: Sequence[AlertSink]) -> None:
        config = self.config
        on_window: list = [lambda result: self.metrics.record_metrics(result.drift, result.metrics)]
        if config.reference_profile is not None:
            from hf_optim.monitoring.monitor import TextMonitor
            from hf_optim.monitoring.profile import ReferenceProfile

            profile = ReferenceProfile.load(config.reference_profile)
            self.monitor = TextMonitor(profile, tokenizer=self.served.tokenizer)
            if config.output_reference_profile is not None:
                output_profile = ReferenceProfile.load(config.output_reference_profile)
                self.output_monitor = TextMonitor(output_profile, tokenizer=self.served.tokenizer)
            self.alerts = AlertManager(build_sinks(config.alert_webhooks, alert_callbacks), config.alert_cooldown_s)
            on_window.append(self._notify_alerts)
        if config.retrain_command is not None:
            log = config.retrain_log or str(Path(config.traffic_log or ".").resolve().parent / "retrain.log")
            self.retrain = RetrainTrigger(
                config.retrain_command, consecutive_windows=config.retrain_after_windows,
                cooldown_s=config.retrain_cooldown_s, log_path=log, traffic_path=config.traffic_log,
            )
            on_window.append(self._maybe_retrain)
        on_sample = []
        if config.shadow is not None:
            base = ServedModel.load(config.shadow, device=config.device)
            self.shadow = ShadowComparator(base.model, sample_rate=config.shadow_sample_rate)
            self.shadow.check_compatible(self.served.model)
            on_sample.append(self._shadow_compare)
        self.collector = TrafficCollector(
            self._evaluate_window if self.monitor is not None else None,
            window_size=config.window_size, window_seconds=config.window_seconds,
            min_window_size=config.min_window_size, queue_size=config.queue_size, traffic_log=config.traffic_log,
            on_sample=on_sample, on_window=on_window, metrics=self.metrics,
        )

    # --- background (monitoring thread) ---
    def _evaluate_window(self, window: list[TrafficSample]) -> Any:
        wanted = set(self.monitor.profile.features)
        numbers = request_quality(self.served.model, window, wanted, pad_id=self.served.pad_id)
        result = self.monitor.calculate([sample.prompt for sample in window], numbers)
        if self.output_monitor is not None:  # the generated texts against healthy outputs, under output_* names
            outputs = self.output_monitor.calculate([sample.output for sample in window])
            result.metrics += [dataclasses.replace(m, name=f"output_{m.name}") for m in outputs.metrics]
        result.window = {"start_time": window[0].time, "end_time": window[-1].time}
        return result

    def _notify_alerts(self, result: Any) -> None:
        for alert in self.alerts.update(result):
            self.metrics.alerts_sent.labels(kind=alert.kind).inc()

    def _maybe_retrain(self, result: Any) -> None:
        if self.retrain.update(result):
            self.metrics.retrain_runs.inc()

    def _shadow_compare(self, sample: TrafficSample) -> None:
        if sample.token_ids is None or not self.shadow.should_sample():
            return
        comparison = self.shadow.compare(self.served.model, sample.token_ids, sample.prompt_tokens)
        self.metrics.shadow_kl.observe(comparison.mean_kl)
        self.metrics.shadow_agreement.observe(comparison.greedy_agreement)

    # --- generation thread ---
    def _run_generation(self, request: Any, max_new_tokens: int, received: float) -> tuple[Generation, float]:
        queue_s = time.perf_counter() - received
        prompt_ids = self.served.encode(request.prompt)
        if not prompt_ids:
            raise RequestRejected(422, "invalid_request", "prompt encodes to no tokens; send some text.")
        context = self.served.context_length
        if context is not None and len(prompt_ids) + max_new_tokens > context:
            raise RequestRejected(
                413, "prompt_too_long",
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                f"of {context} tokens; shorten the prompt or ask for fewer tokens.",
            )
        generation = self.served.generate(prompt_ids, max_new_tokens, request.do_sample, request.temperature)
        if self.collector is not None:
            self.collector.submit(TrafficSample(
                prompt=request.prompt, output=generation.text, prompt_tokens=len(prompt_ids),
                output_tokens=len(generation.new_ids), finish_reason=generation.finish_reason,
                max_new_tokens=max_new_tokens, latency_s=time.perf_counter() - received,
                token_ids=prompt_ids + generation.new_ids,
            ))
        return generation, queue_s

    # --- request handling (event loop) ---
    def _error(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        self.metrics.record_error(reason)
        self.metrics.requests.labels(status="client_error" if status < 500 else "server_error").inc()
        return JSONResponse({"error": {"type": reason, "message": message}}, status_code=status, headers=headers)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_bytes:
            raise RequestRejected(413, "prompt_too_long", f"request body of {declared} bytes is over the limit of "
                                  f"{self._max_body_bytes} bytes (max_prompt_chars={self.config.max_prompt_chars}).")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body_bytes:
                raise RequestRejected(413, "prompt_too_long", f"request body is over the limit of "
                                      f"{self._max_body_bytes} bytes (max_prompt_chars={self.config.max_prompt_chars}).")
        return bytes(body)

    def _parse(self, body: bytes) -> tuple[Any, int]:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestRejected(400, "invalid_json", f"the body is not valid JSON ({exc}).") from None
        if not isinstance(payload, dict):
            raise RequestRejected(422, "invalid_request",
                                  f"the body must be a JSON object, not {type(payload).__name__}.")
        try:
            request = GenerateRequest.model_validate(payload)
        except ValidationError as exc:
            raise RequestRejected(422, "invalid_request", _validation_message(exc)) from None
        limit = self.config.max_new_tokens_limit
        if len(request.prompt) > self.config.max_prompt_chars:
            raise RequestRejected(413, "prompt_too_long", f"prompt has {len(request.prompt)} characters; this server "
                                  f"accepts at most {self.config.max_prompt_chars} (--max-prompt-chars).")
        max_new_tokens = request.max_new_tokens or self.config.default_max_new_tokens
        if max_new_tokens > limit:
            raise RequestRejected(422, "max_new_tokens_too_large", f"max_new_tokens={max_new_tokens} is over this "
                                  f"server's limit of {limit} (--max-new-tokens-limit); ask for at most {limit}.")
        if request.do_sample and self.served.backend == "onnx":
            raise RequestRejected(422, "invalid_request", "this ONNX model generates greedily only; send "
                                  '"do_sample": false.')
        return request, max_new_tokens

    async def generate(self, request: Request) -> dict[str, Any] | JSONResponse:
        received = time.perf_counter()
        try:
            parsed, max_new_tokens = self._parse(await self._read_body(request))
            if self._pending >= self.config.max_pending_requests:
                raise RequestRejected(503, "overloaded", f"{self._pending} requests are already waiting or running "
                                      f"(--max-pending-requests); retry shortly.")
        except RequestRejected as rejected:
            headers = {"Retry-After": "1"} if rejected.status == 503 else None
            return self._error(rejected.status, rejected.reason, rejected.message, headers)
        self._pending += 1
        self.metrics.requests_in_flight.inc()
        try:
            loop = asyncio.get_running_loop()
            generation, queue_s = await loop.run_in_executor(
                self._executor, self._run_generation, parsed, max_new_tokens, received
            )
        except RequestRejected as rejected:
            return self._error(rejected.status, rejected.reason, rejected.message)
        except Exception as exc:  # a failing generation is the server's fault: 500, and the server stays up
            logger.exception("generation failed")
            return self._error(500, "generation_failed", f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            self._pending -= 1
            self.metrics.requests_in_flight.dec()
        total_s = time.perf_counter() - received
        new_tokens = len(generation.new_ids)
        metrics = self.metrics
        metrics.requests.labels(status="ok").inc()
        metrics.request_latency.observe(total_s)
        metrics.queue_wait.observe(queue_s)
        metrics.prompt_tokens.inc(len(generation.prompt_ids))
        metrics.generated_tokens.inc(new_tokens)
        if generation.time_to_first_token_s is not None:
            metrics.time_to_first_token.observe(generation.time_to_first_token_s)
        if generation.time_per_output_token_s is not None:
            metrics.time_per_output_token.observe(generation.time_per_output_token_s)
        return {
            "text": generation.text,
            "prompt_tokens": len(generation.prompt_ids),
            "output_tokens": new_tokens,
            "finish_reason": generation.finish_reason,
            "timings": {
                "total_s": total_s, "queue_s": queue_s, "generate_s": generation.generate_s,
                "time_to_first_token_s": generation.time_to_first_token_s,
                "time_per_output_token_s": generation.time_per_output_token_s,
                "tokens_per_s": new_tokens / generation.generate_s if generation.generate_s > 0 else None,
            },
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "model": self.served.name, "backend": self.served.backend,
            "monitoring": self.collector is not None, "reference_profile": self.config.reference_profile,
            "pending_requests": self._pending, "uptime_s": time.time() - self.started,
        }

    def monitoring(self) -> dict[str, Any]:
        latest = self.collector.latest if self.collector is not None else None
        return {
            "enabled": self.collector is not None,
            "reference_profile": self.config.reference_profile,
            "result": latest.to_dict() if latest is not None else None,
            "collector": self.collector.stats() if self.collector is not None else None,
            "alerts": [alert.to_dict() for alert in self.alerts.history[-20:]] if self.alerts else [],
            "retrain": self.retrain.state() if self.retrain is not None else None,
            "shadow": self.shadow.summary() if self.shadow is not None else None,
        }

    # --- lifecycle ---
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        if self.collector is not None:
            self.collector.start()
        try:
            yield
        finally:
            self._executor.shutdown(wait=True)
            if self.collector is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.collector.close)

    def app(self) -> FastAPI:
        """The FastAPI application with the four routes."""
        from prometheus_client import CONTENT_TYPE_LATEST

        app = FastAPI(title=f"hf-optim serve: {self.served.name}", lifespan=self.lifespan)
        app.state.server = self

        @app.post("/generate")
        async def generate(request: Request):
            return await self.generate(request)

        @app.get("/health")
        async def health():
            return self.health()

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/monitoring")
        async def monitoring():
            return self.monitoring()

        return app


def create_app(
    model_dir: str | os.PathLike,
    config: ServeConfig | None = None,
    *,
    alert_callbacks: Sequence[AlertSink] = (),
    **overrides: Any,
) -> FastAPI:
    """A FastAPI app serving ``model_dir`` with monitoring; ``overrides`` are :class:`ServeConfig` fields.

    The model and the monitoring pipeline load here, so a bad folder or profile fails before a port is bound.
    ``alert_callbacks`` are Python callables that receive every alert (besides the log line and webhooks).

    Example:
        >>> app = create_app("out/model", reference_profile="profile.json", window_size=50)  # doctest: +SKIP
        >>> # run it with any ASGI server, e.g. uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    config = dataclasses.replace(config or ServeConfig(), **overrides) if overrides else (config or ServeConfig())
    served = ServedModel.load(model_dir, device=config.device)
    return ModelServer(served, config, alert_callbacks).app()


def serve(
    model_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    log_level: str = "info",
    **overrides: Any,
) -> None:
    """Serve ``model_dir`` on ``host:port`` with uvicorn until interrupted (binds to loopback by default).

    Example:
        >>> serve("out/model", port=8000, reference_profile="profile.json", alert_webhooks=["http://hooks/x"])
        ... # doctest: +SKIP
    """
    import uvicorn

    app = create_app(model_dir, config, **overrides)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


class BackgroundServer:
    """Run an app with uvicorn in a background thread (notebooks, tests, benchmarks); ``url`` once started.

    Example:
        >>> with BackgroundServer(create_app("out/model"), port=8123) as url:  # doctest: +SKIP
        ...     httpx.post(f"{url}/generate", json={"prompt": "Hi"}).json()
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     timeout_graceful_shutdown=10))
        self._thread = threading.Thread(target=self._server.run, name="hf-optim-uvicorn", daemon=True)
        self._start_timeout_s = start_timeout_s

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start (port in use, or a startup error above)")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(30)
