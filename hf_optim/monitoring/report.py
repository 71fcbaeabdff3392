"""An HTML report of monitoring results: each metric over windows against its threshold, as embedded PNG plots.

Example:
    >>> results = TextMonitor(profile).calculate_windows(texts, window_size=500)  # doctest: +SKIP
    >>> write_report(results, "report.html")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

from hf_optim.core.errors import ConfigError
from hf_optim.monitoring.monitor import MonitoringResult
from hf_optim.core.atomic import write_file_atomically


def _plot_metric(name: str, results: Sequence[MonitoringResult]) -> str:
    """One metric across windows as a base64 PNG: the window mean inside its allowed band for per-text numbers,
    the distance under its threshold for divergences; alerting windows in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(i, r.metric(name)) for i, r in enumerate(results) if any(m.name == name for m in r.metrics)]
    x = [i for i, _ in points]
    metrics = [m for _, m in points]
    figure, axis = plt.subplots(figsize=(7, 2.8), dpi=100)
    if metrics[0].window_value is not None:
        axis.fill_between(x, [m.lower for m in metrics], [m.upper for m in metrics], step="mid", alpha=0.2,
                          color="tab:blue", label="allowed (reference ± threshold)")
        axis.axhline(metrics[0].reference_value, color="tab:blue", linestyle="--", linewidth=1, label="reference mean")
        y = [m.window_value for m in metrics]
        axis.set_ylabel("window mean")
    else:
        axis.step(x, [m.threshold for m in metrics], where="mid", color="tab:orange", label="threshold")
        y = [m.value for m in metrics]
        axis.set_ylabel("value")
    axis.plot(x, y, marker="o", color="tab:blue", linewidth=1, label="window")
    alerts = [(xi, yi) for xi, yi, m in zip(x, y, metrics) if m.alert]
    if alerts:
        axis.scatter(*zip(*alerts), color="tab:red", zorder=3, label="alert")
    axis.set_xlabel("window")
    axis.set_title(f"{name} ({metrics[0].kind})")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_report(results: Sequence[MonitoringResult], path: str | os.PathLike, title: str = "hf_optim monitoring") -> Path:
    """Write a self-contained HTML report of ``results`` (one per window) to ``path``, atomically.

    Example:
        >>> write_report(monitor.calculate_windows(texts, window_size=1000), "report.html")  # doctest: +SKIP
    """
    if not results:
        raise ConfigError("write_report got no results; pass the list that calculate_windows returned.")
    names = list(dict.fromkeys(m.name for r in results for m in r.metrics))
    rows = "".join(
        f"<tr><td>{i}</td><td>{r.n}</td><td>{'yes' if r.drift else 'no'}</td>"
        f"<td>{html.escape(', '.join(m.name for m in r.alerts)) or '-'}</td></tr>"
        for i, r in enumerate(results)
    )
    plots = "".join(
        f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{_plot_metric(name, results)}'>"
        for name in names
    )
    drifted = sum(r.drift for r in results)
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(results)} windows, {sum(r.n for r in results)} texts; "
        f"drift in {drifted} window(s). A metric alerts when its value exceeds the threshold learned from "
        "reference windows of the same size.</p>"
        f"<table><tr><th>window</th><th>texts</th><th>drift</th><th>alerts</th></tr>{rows}</table>{plots}</body></html>"
    )
    return write_file_atomically(path, document.encode("utf-8"))
