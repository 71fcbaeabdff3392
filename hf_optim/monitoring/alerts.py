"""Alerts: tell people (or code) when a monitored metric crosses its threshold — once per incident, with a cooldown.

An *incident* starts when a metric alerts in a window after not alerting in the previous one, and lasts while it
keeps alerting; the sinks hear about it once, when it starts. A metric that flaps (alert, clear, alert …) is
notified again only after ``cooldown_s`` since its last notification. A sink that fails (a webhook that is down) is
logged and skipped: alerting never stops monitoring.

Sinks are callables taking an :class:`Alert`: :class:`LogSink`, :class:`WebhookSink` (POST of a JSON body), or any
Python function.

Example:
    >>> received = []
    >>> manager = AlertManager([received.append], cooldown_s=600)
    >>> manager.update(result)  # doctest: +SKIP
    >>> [alert.metric for alert in received]  # doctest: +SKIP
    ['input_embedding_mmd']
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hf_optim.core.errors import ConfigError

logger = logging.getLogger("hf_optim.monitoring.alerts")


@dataclass(frozen=True)
class Alert:
    """One incident: ``metric`` of ``kind`` ("drift" or "quality") reached ``value`` against ``threshold``."""

    metric: str
    kind: str
    value: float
    threshold: float
    window: int
    time: float = field(default_factory=time.time)
    source: str = "hf_optim"

    @property
    def message(self) -> str:
        return (
            f"{self.kind} alert: {self.metric}={self.value:.4g} crossed its threshold {self.threshold:.4g} "
            f"in monitoring window {self.window}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the webhook body), with the human-readable ``message``."""
        return {**asdict(self), "message": self.message}


AlertSink = Callable[[Alert], None]


class LogSink:
    """Writes each alert as one WARNING line to ``logger`` (default: ``hf_optim.monitoring.alerts``).

    Example:
        >>> manager = AlertManager([LogSink()])
    """

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logger

    def __call__(self, alert: Alert) -> None:
        self.log.warning("%s %s", alert.message, json.dumps(alert.to_dict(), sort_keys=True))


class WebhookSink:
    """POSTs each alert as a JSON body (``Alert.to_dict()``) to ``url`` (http or https), with a timeout.

    Example:
        >>> manager = AlertManager([WebhookSink("http://127.0.0.1:9000/alerts")])
    """

    def __init__(self, url: str, timeout_s: float = 5.0, headers: dict[str, str] | None = None) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"alert webhook {url!r} must be an http:// or https:// URL.")
        if timeout_s <= 0:
            raise ConfigError(f"webhook timeout_s={timeout_s} must be > 0.")
        self.url, self.timeout_s = url, timeout_s
        self.headers = {"Content-Type": "application/json", "User-Agent": "hf-optim-monitoring", **(headers or {})}

    def __call__(self, alert: Alert) -> None:
        body = json.dumps(alert.to_dict()).encode()
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - scheme checked
            response.read()


class AlertManager:
    """Turns a stream of monitoring results into alert incidents and hands each new one to every sink.

    ``update`` takes anything with an ``alerts`` list of metric results (name, value, threshold, kind), such as
    :class:`hf_optim.monitoring.MonitoringResult`, and returns the alerts it sent.

    Example:
        >>> manager = AlertManager([LogSink(), print], cooldown_s=300)
        >>> sent = manager.update(monitor.calculate(window))  # doctest: +SKIP
    """

    def __init__(
        self,
        sinks: Sequence[AlertSink] = (),
        cooldown_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cooldown_s < 0:
            raise ConfigError(f"alert cooldown_s={cooldown_s} must be >= 0.")
        self.sinks = list(sinks)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._active: set[str] = set()  # metrics alerting in the previous window
        self._last_sent: dict[str, float] = {}
        self._window = 0
        self.history: list[Alert] = []  # the most recent incidents, newest last
        self.sink_failures = 0

    def add_sink(self, sink: AlertSink) -> None:
        """Register one more sink (a callable taking an :class:`Alert`)."""
        self.sinks.append(sink)

    def update(self, result: Any) -> list[Alert]:
        """Process one window's result: notify the sinks of each incident that starts now; return those alerts."""
        self._window += 1
        alerting = {metric.name: metric for metric in result.alerts}
        now = self._clock()
        sent = []
        for name, metric in alerting.items():
            new_incident = name not in self._active
            cooled = now - self._last_sent.get(name, -float("inf")) >= self.cooldown_s
            if new_incident and cooled:
                alert = Alert(name, metric.kind, float(metric.value), float(metric.threshold), self._window)
                self._last_sent[name] = now
                self._notify(alert)
                sent.append(alert)
        self._active = set(alerting)
        self.history = (self.history + sent)[-100:]
        return sent

    def _notify(self, alert: Alert) -> None:
        for sink in self.sinks:
            try:
                sink(alert)
            except Exception as exc:  # a broken sink must not stop the others, nor monitoring
                self.sink_failures += 1
                logger.error("alert sink %r failed on %s: %s: %s", sink, alert.metric, type(exc).__name__, exc)


def build_sinks(webhooks: Iterable[str] = (), callbacks: Iterable[AlertSink] = (), log: bool = True) -> list[AlertSink]:
    """The usual sink list: a log line (unless ``log=False``), one webhook per URL, then the Python callables.

    Example:
        >>> sinks = build_sinks(["http://127.0.0.1:9000/hook"], [print])
    """
    return [*([LogSink()] if log else []), *(WebhookSink(url) for url in webhooks), *callbacks]
