"""The results table of an optimize run and its reports: ``results.json``, ``report.md``, ``report.html`` and plots.

The plots put perplexity against size on disk and against decode latency (ms per generated token, batch 1); each
marks that pair's Pareto front (a step line), the variants inside the quality budget (filled) and outside (hollow),
and the budget's perplexity limit (dashed). Every file is written to a temporary name and renamed into place.

Example:
    >>> results = OptimizeResults(model="m", rows=[{"name": "base", "status": "ok", "perplexity": 5.0,
    ...     "size_bytes": 1000, "within_budget": True, "pareto": True, "kept": False}], budget={}, objectives=[])
    >>> results["base"]["perplexity"]
    5.0
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_optim.core.atomic import write_file_atomically
from hf_optim.pipeline.selection import has_metrics, pareto_front

RESULTS_FILE = "results.json"
_COLUMNS = (  # (key, header, format)
    ("perplexity", "perplexity", "{:.4f}"),
    ("perplexity_increase", "Δ ppl", "{:+.2%}"),
    ("size_bytes", "size (MB)", "{:.3f}"),
    ("size_ratio", "× base size", "{:.3f}"),
    ("prefill_ms", "prefill (ms)", "{:.2f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("top1_agreement", "top-1 agree", "{:.3f}"),
    ("kl_divergence", "KL (nats)", "{:.4f}"),
    ("linear_sparsity", "sparsity", "{:.0%}"),
)
PLOTS = {"size_vs_perplexity.png": ("size_bytes", "size on disk (MB)", 1e-6),
         "latency_vs_perplexity.png": ("decode_ms_per_token", "decode latency (ms / token, batch 1)", 1.0)}


def _cell(key: str, row: dict[str, Any], fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return fmt.format(value / 1e6 if key == "size_bytes" else value)


@dataclasses.dataclass
class OptimizeResults:
    """The measured variants (the base model first, as ``"base"``) and how they were judged; iterable over rows.

    Each row has ``name``, ``status`` (ok / skipped / failed, with ``reason`` or ``error``), ``steps``, ``folder``
    (None when not kept), the metrics, ``within_budget``, ``pareto`` and ``kept``.
    """

    model: str
    rows: list[dict[str, Any]]
    budget: dict[str, Any]
    objectives: list[str]
    select: str = "all"
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    threads: int | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(f"no variant {name!r}; have {[r['name'] for r in self.rows]}")

    @property
    def selected(self) -> list[str]:
        """Names of the variants whose folders were kept."""
        return [row["name"] for row in self.rows if row.get("kept")]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, output_dir: str | os.PathLike) -> OptimizeResults:
        """Read ``results.json`` of an earlier run."""
        return cls(**json.loads((Path(output_dir) / RESULTS_FILE).read_text()))

    def to_markdown(self) -> str:
        """The results as a Markdown table, then the variants that did not run and why."""
        header = ["variant", *(title for _, title, _ in _COLUMNS), "budget", "Pareto", "kept"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            if row["status"] != "ok":
                continue
            cells = [row["name"], *(_cell(key, row, fmt) for key, _, fmt in _COLUMNS),
                     "ok" if row.get("within_budget") else "over", "yes" if row.get("pareto") else "",
                     "reference" if row["name"] == "base" else "yes" if row.get("kept") else "no"]
            lines.append("| " + " | ".join(cells) + " |")
        for row in self.rows:
            if row["status"] != "ok":
                lines.append(f"\n- **{row['name']}** {row['status']}: {row.get('reason') or row.get('error')}")
        return "\n".join(lines) + "\n"


def _budget_text(results: OptimizeResults) -> str:
    parts = []
    if results.budget.get("max_perplexity_increase") is not None:
        parts.append(f"perplexity within +{results.budget['max_perplexity_increase']:.2%} of the base")
    if results.budget.get("min_top1_agreement") is not None:
        parts.append(f"top-1 agreement ≥ {results.budget['min_top1_agreement']:.3f}")
    return " and ".join(parts)


def _summary(results: OptimizeResults) -> str:
    recipe = results.recipe
    kept = ", ".join(results.selected) or "none"
    return (
        f"Model `{results.model}`; evaluation data `{recipe.get('eval_data')}` (first {recipe.get('max_eval_tokens')} "
        f"tokens, window {recipe.get('max_length')}); agreement with the base on {recipe.get('agreement_windows')} "
        f"windows of {recipe.get('agreement_length')} tokens; speed at batch 1, {recipe.get('prompt_tokens')}-token "
        f"prompt, {recipe.get('new_tokens')} new tokens, {results.threads} CPU threads. "
        f"Budget: {_budget_text(results)}. Pareto objectives: {', '.join(results.objectives)}. "
        f"Selection `{results.select}`: kept {kept}. Took {results.seconds:.1f} s."
    )


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def plot(results: OptimizeResults, x_key: str, x_label: str, scale: float) -> bytes | None:
    """One perplexity-vs-``x_key`` scatter as PNG bytes (the Pareto front of that pair); None when no row has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = [r for r in results.rows if r["status"] == "ok" and has_metrics(r, ["perplexity", x_key])]
    if not points:
        return None
    front = set(pareto_front(points, [x_key, "perplexity"]))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for index, row in enumerate(sorted(points, key=lambda r: (r[x_key], r["perplexity"]))):
        x, y = row[x_key] * scale, row["perplexity"]
        if row["name"] == "base":
            ax.scatter(x, y, marker="*", s=170, color="black", zorder=4)
        else:
            inside = bool(row.get("within_budget"))
            ax.scatter(x, y, s=50, zorder=3, color="tab:green" if inside else "white",
                       edgecolors="tab:green" if inside else "tab:red")
        if row["name"] in front:
            ax.scatter(x, y, s=190, facecolors="none", edgecolors="tab:blue", linewidths=1.2, zorder=5)
        # alternate label sides: neighbouring points are often close
        ax.annotate(row["name"], (x, y), fontsize=8, xytext=(6, 6 if index % 2 else -12), textcoords="offset points")
    ordered = sorted((r for r in points if r["name"] in front), key=lambda r: r[x_key])
    if len(ordered) > 1:
        ax.step([r[x_key] * scale for r in ordered], [r["perplexity"] for r in ordered], where="post",
                color="tab:blue", alpha=0.6)
    perplexities = [r["perplexity"] for r in points]
    if max(perplexities) > 1.5 * min(perplexities):  # far-off variants would flatten the interesting ones
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    base = next((r for r in results.rows if r["name"] == "base"), None)
    limit = results.budget.get("max_perplexity_increase")
    if base is not None and limit is not None:
        ax.axhline(base["perplexity"] * (1 + limit), color="tab:gray", linestyle="--",
                   label=f"budget (+{limit:.1%})")
    ax.scatter([], [], marker="*", s=170, color="black", label="base")
    ax.scatter([], [], s=50, color="tab:green", label="inside budget")
    ax.scatter([], [], s=50, color="white", edgecolors="tab:red", label="over budget")
    ax.scatter([], [], s=190, facecolors="none", edgecolors="tab:blue", label="Pareto front")
    ax.set_xlabel(x_label)
    ax.set_ylabel("perplexity")
    ax.set_title(f"{results.model}: perplexity vs {x_label.split(' (')[0]}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _html(results: OptimizeResults, images: dict[str, bytes]) -> str:
    header = ["variant", *(title for _, title, _ in _COLUMNS), "budget", "Pareto", "kept"]
    rows = []
    for row in results.rows:
        if row["status"] != "ok":
            continue
        cells = [row["name"], *(_cell(key, row, fmt) for key, _, fmt in _COLUMNS),
                 "ok" if row.get("within_budget") else "over", "yes" if row.get("pareto") else "",
                 "reference" if row["name"] == "base" else "yes" if row.get("kept") else "no"]
        style = ' style="background:#eaf6ea"' if row.get("kept") else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    problems = "".join(
        f"<li><b>{html.escape(r['name'])}</b> {r['status']}: {html.escape(str(r.get('reason') or r.get('error')))}</li>"
        for r in results.rows if r["status"] != "ok"
    )
    pictures = "".join(
        f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for name, data in images.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>hf_optim optimize report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:48%;margin:1%}</style></head><body>"
        f"<h1>Optimize report: {html.escape(results.model)}</h1><p>{html.escape(_summary(results))}</p>"
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>"
        + (f"<h2>Not built</h2><ul>{problems}</ul>" if problems else "") + f"<div>{pictures}</div></body></html>\n"
    )


def write_reports(results: OptimizeResults, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``report.html`` and the two plots into ``output_dir``; return the paths.

    Example:
        >>> write_reports(results, "out/optimize")["report.md"]  # doctest: +SKIP
        PosixPath('out/optimize/report.md')
    """
    output_dir = Path(output_dir)
    written: dict[str, Path] = {}
    images = {}
    for name, (key, label, scale) in PLOTS.items():
        data = plot(results, key, label, scale)
        if data is not None:
            images[name] = data
    files = {
        RESULTS_FILE: json.dumps(_jsonable(results.to_dict()), indent=2, default=str).encode(),
        "report.md": (f"# Optimize report: {results.model}\n\n{_summary(results)}\n\n{results.to_markdown()}\n"
                      + "".join(f"![{name}]({name})\n" for name in images)).encode(),
        "report.html": _html(results, images).encode(),
        **images,
    }
    for name, data in files.items():
        write_file_atomically(output_dir / name, data)
        written[name] = output_dir / name
    return written
