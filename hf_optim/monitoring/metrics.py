"""Prometheus metrics of a served model: request latency and token timings, load, errors, monitoring state, process.

Every object lives in its own :class:`prometheus_client.CollectorRegistry` (not the global one), so several servers
in one process, as in tests, never clash. Names follow Prometheus conventions: histograms of durations end in
``_seconds``, counters in ``_total``, and every label has a small fixed set of values (``metric`` takes the metric
names of the reference profile, a set fixed when the server starts).

Example:
    >>> metrics = ServerMetrics()
    >>> metrics.errors.labels(reason="invalid_json").inc()
    >>> b"hf_optim_errors_total" in metrics.render()
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

PREFIX = "hf_optim"
# the only values the `reason` label of hf_optim_errors_total takes; anything else is counted as "other"
ERROR_REASONS = (
    "invalid_json", "invalid_request", "prompt_too_long", "max_new_tokens_too_large", "overloaded",
    "generation_failed", "other",
)
# request latencies from a few ms (tiny models) to minutes (long generations on a CPU)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GpuMemoryCollector(Collector):
    """Allocated and reserved CUDA memory per visible device, read at scrape time (nothing when CUDA is absent)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_allocated_bytes", "CUDA memory held by tensors.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_reserved_bytes", "CUDA memory reserved by PyTorch's caching allocator.",
            labels=["device"],
        )
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], float(torch.cuda.memory_allocated(index)))
            reserved.add_metric([str(index)], float(torch.cuda.memory_reserved(index)))
        yield allocated
        yield reserved


class ServerMetrics:
    """The metric objects of one server, registered in a private registry; :meth:`render` gives the text format.

    Example:
        >>> metrics = ServerMetrics()
        >>> metrics.request_latency.observe(0.2)
        >>> metrics.render().startswith(b"# HELP")
        True
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        # --- requests ---
        self.request_latency = Histogram(
            f"{PREFIX}_request_duration_seconds", "Wall time of a /generate request, queueing included.",
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_request_queue_seconds", "Time a /generate request waited for the generation worker.",
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From the start of generation to the first new token.",
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.time_per_output_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "Mean decode time of each new token after the first.",
            buckets=_TOKEN_BUCKETS, registry=reg,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", registry=reg)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "New tokens generated.", registry=reg)
        self.requests = Counter(
            f"{PREFIX}_requests", "Finished /generate requests by outcome.", ["status"], registry=reg
        )
        self.requests_in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "/generate requests accepted and not yet answered.", registry=reg
        )
        self.errors = Counter(f"{PREFIX}_errors", "Failed requests by reason.", ["reason"], registry=reg)
        for reason in ERROR_REASONS:  # export zeros so that rate() works from the first scrape
            self.errors.labels(reason=reason)
        for status in ("ok", "client_error", "server_error"):
            self.requests.labels(status=status)
        # --- monitoring pipeline ---
        self.samples_queued = Counter(
            f"{PREFIX}_monitoring_samples", "Requests handed to the monitoring queue.", registry=reg
        )
        self.samples_dropped = Counter(
            f"{PREFIX}_monitoring_samples_dropped", "Requests not monitored because the queue was full.", registry=reg
        )
        self.monitoring_queue_size = Gauge(
            f"{PREFIX}_monitoring_queue_size", "Samples waiting for the monitoring worker.", registry=reg
        )
        self.windows = Counter(f"{PREFIX}_monitoring_windows", "Traffic windows compared to the reference.",
                               registry=reg)
        self.drift = Gauge(f"{PREFIX}_monitoring_drift", "1 when a drift metric of the last window alerts.",
                           registry=reg)
        self.metric_value = Gauge(
            f"{PREFIX}_monitoring_metric_value", "Last window's value of each monitored metric.", ["metric", "kind"],
            registry=reg,
        )
        self.metric_threshold = Gauge(
            f"{PREFIX}_monitoring_metric_threshold", "Alert threshold of each monitored metric.", ["metric", "kind"],
            registry=reg,
        )
        self.metric_alert = Gauge(
            f"{PREFIX}_monitoring_metric_alert", "1 when the metric crossed its threshold in the last window.",
            ["metric", "kind"], registry=reg,
        )
        self.alerts_sent = Counter(f"{PREFIX}_alerts", "Alert incidents notified to the sinks.", ["kind"],
                                   registry=reg)
        self.retrain_runs = Counter(f"{PREFIX}_retrain_runs", "Retraining commands started.", registry=reg)
        # --- shadow comparison ---
        self.shadow_kl = Histogram(
            f"{PREFIX}_shadow_kl_divergence", "Mean KL(base || served) of next-token distributions per request.",
            buckets=(0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0), registry=reg,
        )
        self.shadow_agreement = Histogram(
            f"{PREFIX}_shadow_greedy_agreement", "Share of positions where base and served greedy tokens agree.",
            buckets=(0.5, 0.8, 0.9, 0.95, 0.99, 1.0), registry=reg,
        )
        # --- process and GPU ---
        ProcessCollector(registry=reg)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        reg.register(GpuMemoryCollector())

    def record_error(self, reason: str) -> None:
        """Count one failed request; an unknown ``reason`` is counted as ``other`` to keep the label bounded."""
        self.errors.labels(reason=reason if reason in ERROR_REASONS else "other").inc()

    def record_metrics(self, drift: bool, metrics: Iterable) -> None:
        """Export a monitoring result: its drift flag and each metric's value, threshold and alert state."""
        self.windows.inc()
        self.drift.set(float(drift))
        for metric in metrics:
            labels = {"metric": metric.name, "kind": metric.kind}
            self.metric_value.labels(**labels).set(float(metric.value))
            self.metric_threshold.labels(**labels).set(float(metric.threshold))
            self.metric_alert.labels(**labels).set(float(metric.alert))

    def render(self) -> bytes:
        """All metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)
