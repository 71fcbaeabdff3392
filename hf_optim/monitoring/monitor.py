"""Comparing windows of live texts with a reference profile: one result per window, each metric with its threshold.

A window of n texts is measured like the reference was (see :mod:`hf_optim.monitoring.profile`) and each metric
is checked against the threshold the profile learned for windows of size n:

==========================  ==========  =====================================================================
metric                      kind        value
==========================  ==========  =====================================================================
``char_length``             drift       abs(window mean - reference mean), characters per text
``non_alpha_share``         drift       same, share of non-space characters that are not letters
``token_length``            drift       same, tokens per text (profile fit with a tokenizer)
``unknown_token_share``     drift       same, unknown + byte-fallback tokens per token
``token_js_divergence``     drift       Jensen-Shannon divergence (bits) of token (or hashed word) frequencies
``embedding_mmd``           drift       squared MMD of MiniLM embeddings (Gaussian kernel, random features)
``prompt_perplexity``       quality     abs(window mean - reference mean), with a model
numeric features            by name     abs(window mean - reference mean) of numbers passed in
==========================  ==========  =====================================================================

A metric alerts when ``value > threshold``; ``result.drift`` is true when any ``drift`` metric alerts. Quality
numbers (``output_entropy``, ``truncated_output``, ...) have kind ``quality``, timings (``*_seconds``) ``system``.
The embedding metric looks at most ``embedding_sample_size`` evenly spaced texts of a window (its ``n`` field).

Example:
    >>> monitor = TextMonitor(ReferenceProfile.load("reference.npz"))  # doctest: +SKIP
    >>> result = monitor.calculate(todays_prompts)  # doctest: +SKIP
    >>> result.drift, [m.name for m in result.alerts]  # doctest: +SKIP
    (True, ['embedding_mmd', 'token_js_divergence'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_optim.core.errors import ConfigError
from hf_optim.monitoring import features as lexical
from hf_optim.monitoring import stats
from hf_optim.monitoring.profile import (
    EMBEDDING_METRIC,
    VOCABULARY_METRIC,
    ReferenceProfile,
    _as_numbers,
    _as_texts,
    embedding_rows,
    load_tokenizer,
    per_text_features,
    vocabulary_ids,
)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class MetricResult:
    """One metric of one window: its value, the threshold for this window size, and whether it alerts."""

    name: str
    value: float
    threshold: float
    alert: bool
    kind: str
    n: int
    reference_value: float | None = None
    window_value: float | None = None
    lower: float | None = None
    upper: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (non-finite numbers become ``None``)."""
        return {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class MonitoringResult:
    """The metrics of one window of texts; ``drift`` when any drift metric alerts."""

    n: int
    metrics: list[MetricResult]
    window: dict[str, Any] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        return any(m.alert and m.kind == "drift" for m in self.metrics)

    @property
    def alerts(self) -> list[MetricResult]:
        return [m for m in self.metrics if m.alert]

    def metric(self, name: str) -> MetricResult:
        """The metric called ``name`` (``KeyError`` naming the available ones otherwise)."""
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"no metric {name!r}; this result has {[m.name for m in self.metrics]}")

    def to_dict(self) -> dict[str, Any]:
        """``{"drift", "n", "alerts", "metrics": [...], "window": {...}}``, JSON-serialisable."""
        return {
            "drift": self.drift,
            "n": self.n,
            "alerts": [m.name for m in self.alerts],
            "metrics": [m.to_dict() for m in self.metrics],
            "window": self.window,
        }


class TextMonitor:
    """Checks windows of texts (and numbers measured with them) against a :class:`ReferenceProfile`.

    ``tokenizer`` defaults to the one the profile was fit with (its recorded path) and must split text the same
    way; ``model`` (a causal LM, used with that tokenizer) adds ``prompt_perplexity`` when the profile has it.

    Example:
        >>> monitor = TextMonitor(profile)  # doctest: +SKIP
        >>> [r.drift for r in monitor.calculate_windows(stream, window_size=500)]  # doctest: +SKIP
        [False, False, True]
    """

    def __init__(self, profile: ReferenceProfile, tokenizer=None, model=None):
        if not isinstance(profile, ReferenceProfile):
            raise ConfigError(f"profile must be a ReferenceProfile, got {type(profile).__name__}; use ReferenceProfile.load(path).")
        self.profile = profile
        self.tokenizer = self._resolve_tokenizer(tokenizer)
        if model is not None and self.tokenizer is None:
            raise ConfigError("A model needs the tokenizer the profile was fit with; this profile has none.")
        self.model = model

    def _resolve_tokenizer(self, tokenizer):
        expected = self.profile.tokenizer_fingerprint
        if expected is None:
            return None  # the profile compares hashed words; a tokenizer would change what is compared
        if tokenizer is None:
            path = self.profile.tokenizer_path
            if path is None or not Path(path).exists():
                raise ConfigError(
                    f"The profile was fit with a tokenizer ({path or 'an in-memory object'}) that is not available "
                    "here; pass tokenizer= (the same one)."
                )
            tokenizer = path
        tokenizer = load_tokenizer(tokenizer)
        if lexical.vocabulary_fingerprint(tokenizer) != expected:
            raise ConfigError(
                f"tokenizer {tokenizer.name_or_path!r} has a different vocabulary than the profile's "
                f"({self.profile.tokenizer_path!r}); pass the tokenizer the profile was fit with."
            )
        return tokenizer

    def calculate(
        self,
        texts: Sequence[str],
        numeric_features: Mapping[str, Sequence[float]] | None = None,
        *,
        embeddings: np.ndarray | None = None,
    ) -> MonitoringResult:
        """Every metric of one window of ``texts`` (and of ``numeric_features`` the profile also has).

        ``embeddings``: MiniLM embeddings of ``texts`` when already computed (e.g. shared with another check).

        Example:
            >>> monitor.calculate(prompts, {"latency_seconds": latencies}).to_dict()["drift"]  # doctest: +SKIP
            False
        """
        texts = _as_texts(texts, "texts")
        if not texts:
            raise ConfigError("calculate() got no texts; a window needs at least one.")
        numeric_features = dict(numeric_features or {})
        profile, n = self.profile, len(texts)
        ids, counts, _ = vocabulary_ids(texts, self.tokenizer)
        values = per_text_features(texts, self.tokenizer, (ids, counts))
        if self.model is not None and "prompt_perplexity" in profile.features and "prompt_perplexity" not in numeric_features:
            from hf_optim.monitoring.quality import prompt_perplexities

            values["prompt_perplexity"] = prompt_perplexities(self.model, self.tokenizer, texts)
        for name, numbers in numeric_features.items():
            if name in values:
                raise ConfigError(f"numeric feature {name!r} is measured from the texts; pass another name.")
            values[name] = numbers
        metrics = []
        for name, summary in profile.features.items():
            if name not in values:
                continue
            array = _as_numbers(name, values[name])
            if array.size == 0:
                continue
            threshold = summary.curve.threshold(array.size)
            value = abs(float(array.mean()) - summary.mean)
            metrics.append(MetricResult(
                name, value, threshold, value > threshold, summary.kind, int(array.size), summary.mean,
                float(array.mean()), summary.mean - threshold, summary.mean + threshold,
            ))
        metrics.append(self._vocabulary_metric(ids, n))
        if profile.embedding is not None:
            metrics.append(self._embedding_metric(texts, embeddings))
        return MonitoringResult(n=n, metrics=metrics)

    def _vocabulary_metric(self, ids: np.ndarray, n: int) -> MetricResult:
        vocabulary = self.profile.vocabulary
        window = np.bincount(stats.bin_ids(ids, vocabulary["ids"]), minlength=len(vocabulary["counts"]))
        value = stats.js_divergence(window, vocabulary["counts"])
        threshold = vocabulary["curve"].threshold(n)
        return MetricResult(VOCABULARY_METRIC, value, threshold, value > threshold, "drift", n)

    def _embedding_metric(self, texts: list[str], embeddings: np.ndarray | None) -> MetricResult:
        embedding = self.profile.embedding
        rows = embedding_rows(len(texts), embedding["sample_size"])
        if embeddings is None:
            from hf_optim.monitoring.embeddings import embed_texts

            vectors = embed_texts([texts[i] for i in rows])
        else:
            embeddings = np.asarray(embeddings, np.float32)
            if embeddings.ndim != 2 or len(embeddings) != len(texts):
                raise ConfigError(f"embeddings of shape {embeddings.shape} do not match {len(texts)} texts; pass one row per text.")
            vectors = embeddings[rows]
        mapped = stats.random_fourier_features(vectors, embedding["frequencies"], embedding["phases"])
        value = stats.mmd_squared(mapped.mean(0), embedding["mean"])
        threshold = embedding["curve"].threshold(len(rows))
        return MetricResult(EMBEDDING_METRIC, value, threshold, value > threshold, "drift", len(rows))

    def calculate_windows(
        self,
        texts: Sequence[str],
        window_size: int | None = None,
        numeric_features: Mapping[str, Sequence[float]] | None = None,
        *,
        timestamps: Sequence[float] | None = None,
        window_seconds: float | None = None,
        embeddings: np.ndarray | None = None,
    ) -> list[MonitoringResult]:
        """Results for consecutive windows of a stream: by count (``window_size`` texts each, the last one may be
        shorter), by time (``timestamps`` in seconds, ``window_seconds`` per window), or one window of everything.

        ``numeric_features`` hold one number per text here, so they are cut along with the texts.

        Example:
            >>> results = monitor.calculate_windows(stream, window_size=1000)  # doctest: +SKIP
            >>> results = monitor.calculate_windows(stream, timestamps=times, window_seconds=3600)  # doctest: +SKIP
        """
        texts = _as_texts(texts, "texts")
        numeric_features = {name: np.asarray(v, np.float64).reshape(-1) for name, v in (numeric_features or {}).items()}
        for name, numbers in numeric_features.items():
            if len(numbers) != len(texts):
                raise ConfigError(f"numeric feature {name!r} has {len(numbers)} values for {len(texts)} texts; pass one per text.")
        if embeddings is not None and len(embeddings) != len(texts):
            raise ConfigError(f"{len(embeddings)} embeddings for {len(texts)} texts; pass one row per text.")
        if (timestamps is None) != (window_seconds is None):
            raise ConfigError("Windows by time need both timestamps= and window_seconds=.")
        if timestamps is not None:
            if window_size is not None or window_seconds <= 0 or len(timestamps) != len(texts):
                raise ConfigError(
                    f"window_seconds={window_seconds} must be > 0, with one timestamp per text "
                    f"({len(timestamps)} for {len(texts)}) and no window_size."
                )
            times = np.asarray(timestamps, np.float64)
            buckets = np.floor((times - times.min()) / window_seconds).astype(np.int64)
            groups = [np.flatnonzero(buckets == b) for b in np.unique(buckets)]
            bounds = [{"start_time": float(times.min() + b * window_seconds), "end_time": float(times.min() + (b + 1) * window_seconds)}
                      for b in np.unique(buckets)]
        else:
            if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
                raise ConfigError(f"window_size={window_size!r} must be a positive integer (or None for one window).")
            size = window_size or max(len(texts), 1)
            groups = [np.arange(begin, min(begin + size, len(texts))) for begin in range(0, len(texts), size)]
            bounds = [{"start": int(g[0]), "end": int(g[-1]) + 1} for g in groups]
        results = []
        for index, (rows, bound) in enumerate(zip(groups, bounds)):
            result = self.calculate(
                [texts[i] for i in rows], {name: v[rows] for name, v in numeric_features.items()},
                embeddings=None if embeddings is None else np.asarray(embeddings)[rows],
            )
            result.window = {"index": index, **bound}
            results.append(result)
        return results
