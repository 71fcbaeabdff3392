"""Collecting served traffic off the request path: a traffic log on disk, a bounded queue, a background worker.

A request handler calls :meth:`TrafficCollector.submit` once per finished request. That appends the request to the
traffic log (one JSON line, written under a lock and flushed, so the log is complete even when monitoring falls
behind) and puts it on a bounded queue without waiting: when the queue is full the sample is dropped from
monitoring and counted, instead of slowing the request. A single worker thread takes samples off the queue, runs the
per-sample handlers (e.g. the shadow comparison), and groups samples into windows — closed after ``window_size``
samples, or after ``window_seconds`` once at least ``min_window_size`` arrived — which it hands to ``evaluate``
(features and statistics against the reference) and then to the window listeners (metrics, alerts, retraining).

Example:
    >>> collector = TrafficCollector(evaluate=lambda window: monitor.calculate([s.prompt for s in window]),
    ...                              window_size=100, traffic_log="traffic.jsonl")  # doctest: +SKIP
    >>> collector.start()  # doctest: +SKIP
    >>> collector.submit(TrafficSample(prompt="Once upon a time", output=" there was"))  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_optim.core.errors import ConfigError

logger = logging.getLogger("hf_optim.monitoring.collector")


@dataclass
class TrafficSample:
    """One served request as monitoring sees it. ``token_ids`` (prompt + new) stay in memory, never on disk."""

    prompt: str
    output: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"  # "length" when generation hit max_new_tokens
    max_new_tokens: int = 0
    latency_s: float = 0.0
    time: float = field(default_factory=time.time)
    token_ids: list[int] | None = None

    def record(self) -> dict[str, Any]:
        """The traffic-log line: ``text`` is the prompt, so the log is a training file as it stands."""
        return {
            "time": round(self.time, 3), "text": self.prompt, "output": self.output,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reason, "max_new_tokens": self.max_new_tokens,
            "latency_s": round(self.latency_s, 6),
        }


class TrafficLog:
    """Appends JSON lines to a file, one flushed line per call, safe to call from several threads.

    Example:
        >>> log = TrafficLog("traffic.jsonl")  # doctest: +SKIP
        >>> log.append({"text": "hello"})  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.lines = 0

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()


WindowEvaluator = Callable[[list[TrafficSample]], Any]


class TrafficCollector:
    """Bounded queue + background worker that turns served traffic into monitoring windows.

    ``evaluate`` gets each closed window (a list of samples) and returns a result (e.g. a
    :class:`~hf_optim.monitoring.MonitoringResult`); ``on_window`` callables then get that result, and
    ``on_sample`` callables get every sample first. Without ``evaluate`` only the traffic log and handlers run.
    A failing handler is logged and counted, never fatal.

    Example:
        >>> collector = TrafficCollector(evaluate, window_size=50, window_seconds=60.0, queue_size=1000,
        ...                              traffic_log="traffic.jsonl", on_window=[alerts.update])  # doctest: +SKIP
    """

    def __init__(
        self,
        evaluate: WindowEvaluator | None = None,
        *,
        window_size: int = 100,
        window_seconds: float | None = None,
        min_window_size: int | None = None,
        queue_size: int = 1024,
        traffic_log: str | os.PathLike | None = None,
        on_sample: Sequence[Callable[[TrafficSample], Any]] = (),
        on_window: Sequence[Callable[[Any], Any]] = (),
        metrics: Any = None,
    ) -> None:
        if window_size < 1:
            raise ConfigError(f"window_size={window_size} must be >= 1.")
        if window_seconds is not None and window_seconds <= 0:
            raise ConfigError(f"window_seconds={window_seconds} must be > 0 (or None for count-only windows).")
        if queue_size < 1:
            raise ConfigError(f"monitoring queue_size={queue_size} must be >= 1.")
        min_window_size = min(window_size, 10) if min_window_size is None else min_window_size
        if not 1 <= min_window_size <= window_size:
            raise ConfigError(f"min_window_size={min_window_size} must be in [1, window_size={window_size}].")
        self.evaluate = evaluate
        self.window_size, self.window_seconds, self.min_window_size = window_size, window_seconds, min_window_size
        self.on_sample, self.on_window = list(on_sample), list(on_window)
        self.metrics = metrics
        self.traffic_log = TrafficLog(traffic_log) if traffic_log is not None else None
        self._queue: queue.Queue[TrafficSample | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._window: list[TrafficSample] = []
        self._window_opened = time.monotonic()
        self._lock = threading.Lock()
        self.latest: Any = None  # the result of the last evaluated window
        self.counts = {"submitted": 0, "dropped": 0, "processed": 0, "windows": 0, "errors": 0}

    # --- request side: never blocks ---
    def submit(self, sample: TrafficSample) -> bool:
        """Log ``sample`` and queue it for monitoring; False when the queue was full and it was dropped."""
        if self.traffic_log is not None:
            self.traffic_log.append(sample.record())
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            with self._lock:
                self.counts["dropped"] += 1
            if self.metrics is not None:
                self.metrics.samples_dropped.inc()
            return False
        with self._lock:
            self.counts["submitted"] += 1
        if self.metrics is not None:
            self.metrics.samples_queued.inc()
            self.metrics.monitoring_queue_size.set(self._queue.qsize())
        return True

    # --- lifecycle ---
    def start(self) -> TrafficCollector:
        """Start the worker thread (a daemon: it never keeps the process alive)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hf-optim-monitoring", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """Process what is queued, stop the worker, close the traffic log. A partial window is not evaluated."""
        if self._thread is not None:
            self._queue.put(None)  # blocks only if full; the worker is draining it
            self._thread.join(timeout)
            self._thread = None
        if self.traffic_log is not None:
            self.traffic_log.close()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued sample has been processed; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def stats(self) -> dict[str, Any]:
        """Counters (submitted, dropped, processed, windows, errors), queue fill, and the open window's size."""
        with self._lock:
            counts = dict(self.counts)
        return {
            **counts, "queue_size": self._queue.qsize(), "queue_capacity": self._queue.maxsize,
            "window_fill": len(self._window), "window_size": self.window_size, "window_seconds": self.window_seconds,
            "traffic_log": str(self.traffic_log.path) if self.traffic_log else None,
        }

    # --- worker side ---
    def _run(self) -> None:
        _lower_thread_priority()
        while True:
            try:
                sample = self._queue.get(timeout=self._poll_interval())
            except queue.Empty:
                self._maybe_close_window(time_only=True)
                continue
            try:
                if sample is None:
                    return
                self._process(sample)
            finally:
                self._queue.task_done()
                if self.metrics is not None:
                    self.metrics.monitoring_queue_size.set(self._queue.qsize())

    def _poll_interval(self) -> float:
        return 0.5 if self.window_seconds is None else min(0.5, self.window_seconds / 4)

    def _process(self, sample: TrafficSample) -> None:
        for handler in self.on_sample:
            self._guarded(handler, sample)
        if not self._window:
            self._window_opened = time.monotonic()
        self._window.append(sample)
        with self._lock:
            self.counts["processed"] += 1
        self._maybe_close_window(time_only=False)

    def _maybe_close_window(self, time_only: bool) -> None:
        full = not time_only and len(self._window) >= self.window_size
        timed_out = (
            self.window_seconds is not None and len(self._window) >= self.min_window_size
            and time.monotonic() - self._window_opened >= self.window_seconds
        )
        if not (full or timed_out):
            return
        window, self._window = self._window, []
        if self.evaluate is None:
            return
        result = self._guarded(self.evaluate, window)
        if result is None:
            return
        for listener in self.on_window:
            self._guarded(listener, result)
        # published last: whoever sees window k counted also sees its alerts and retraining decision
        self.latest = result
        with self._lock:
            self.counts["windows"] += 1

    def _guarded(self, handler: Callable[[Any], Any], argument: Any) -> Any:
        try:
            return handler(argument)
        except Exception:  # monitoring must outlive any one bad handler or window
            with self._lock:
                self.counts["errors"] += 1
            logger.exception("monitoring handler %r failed", handler)
            return None


def _lower_thread_priority(niceness: int = 10) -> None:
    """Let the kernel prefer request threads over this one when they share cores (Linux: per-thread nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):  # not Linux, or not permitted: monitoring still works, just not deprioritised
        pass
