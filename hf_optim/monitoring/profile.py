"""What normal traffic looks like: a reference profile of texts, with thresholds learned from the reference itself.

``ReferenceProfile.fit`` measures every reference text once and keeps summaries, not texts:

- per-text numbers (character length, token length, unknown/byte-fallback token share, non-alphabetic share,
  prompt perplexity under a model, and any numbers measured elsewhere) -> their reference means;
- the vocabulary distribution (token ids under the tokenizer, or hashed lower-cased words without one) over the
  ``vocabulary_size`` most frequent reference entries plus one bin for all others;
- MiniLM sentence embeddings of (up to ``2 * embedding_sample_size``) evenly spaced texts, mapped with random
  Fourier features so that the squared MMD of a window against the reference is a distance between two means.

Thresholds (the calibration). Each metric compares a window with the reference: the absolute difference of
means for per-text numbers, Jensen-Shannon divergence for the vocabulary, squared MMD for the embeddings. For a
grid of window sizes n (5, 10, 20, 50, ... up to half the reference), ``CalibrationSettings.windows`` contiguous
windows of n reference texts (wrapping around the end) are each compared with the rest of the reference; the
threshold at n is the ``1 - false_alarm_rate`` quantile of the metric over these windows (an empirical quantile,
because window means of real text are heavy-tailed: a 3-sigma rule alerted on ~8% of same-source WikiText
windows). Between grid sizes it is interpolated log-log; below the smallest extrapolated as a power law.
Three choices keep large windows from raising false alarms:

- windows are contiguous, not shuffled: neighbouring texts share topics (one article, one session), so the
  spread includes the heterogeneity that real traffic windows have, not only the 1/sqrt(n) sampling noise;
- beyond half the reference the threshold stays at its value for half the reference: a huge window is judged
  by how much two halves of the reference differ, never by a spread that shrinks to zero;
- a mean shift smaller than ``min_effect`` (default 0.2, Cohen's "small") reference standard deviations of
  the per-text number never alerts, however large the window: it is real but too small to act on.

For per-text numbers the threshold is also at least the i.i.d. normal one, ``z * sd * sqrt(1/n + 1/(N - n))``;
for shares and 0/1 rates the per-text sd gets one pseudo-observation at the far end of [0, 1], so that a share
the reference never showed (say, no byte-fallback tokens at all) does not give a zero threshold.

Example:
    >>> profile = ReferenceProfile.fit(reference_texts, tokenizer="path/to/model")  # doctest: +SKIP
    >>> profile.save("reference.npz")  # doctest: +SKIP
    >>> profile = ReferenceProfile.load("reference.npz")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scipy import stats as scipy_stats

from hf_optim.core.atomic import write_file_atomically
from hf_optim.core.errors import ConfigError
from hf_optim.monitoring import features as lexical
from hf_optim.monitoring import stats

FORMAT_VERSION = 1
TEXT_FEATURES = ("char_length", "non_alpha_share")
TOKEN_FEATURES = ("token_length", "unknown_token_share")
SHARE_FEATURES = ("non_alpha_share", "unknown_token_share")
VOCABULARY_METRIC = "token_js_divergence"
EMBEDDING_METRIC = "embedding_mmd"
# numbers measured elsewhere that say how well the model does (the rest are inputs/outputs drifting, or system)
QUALITY_FEATURES = frozenset(
    {"prompt_perplexity", "output_entropy", "output_logprob", "empty_output", "truncated_output", "repeated_output"}
)
MIN_REFERENCE = 10
RFF_FEATURES = 256


def feature_kind(name: str) -> str:
    """``"quality"`` for the label-free quality numbers, ``"system"`` for timings/throughput, else ``"drift"``."""
    if name in QUALITY_FEATURES:
        return "quality"
    if name.endswith(("_seconds", "_per_second")) or name.startswith("latency"):
        return "system"
    return "drift"


@dataclass
class ThresholdCurve:
    """A metric's threshold at each calibrated window size (a high quantile over reference windows)."""

    sizes: list[int]
    values: list[float]

    def threshold(self, size: int) -> float:
        """The threshold at ``size``: log-log interpolation, held constant beyond the largest calibrated size."""
        return stats.interpolate_log_log(self.sizes, self.values, size)

    def to_dict(self) -> dict[str, list]:
        return {"sizes": self.sizes, "values": self.values}


@dataclass(frozen=True)
class CalibrationSettings:
    """How thresholds are learned: windows per size, per-metric false-alarm rate, smallest mean shift that counts."""

    windows: int = 1000
    false_alarm_rate: float = 0.002
    min_effect: float = 0.5


@dataclass
class FeatureSummary:
    """Reference statistics of one per-text number."""

    mean: float
    sd: float
    count: int
    kind: str
    curve: ThresholdCurve


def _as_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ConfigError(f"{what} must be a list of strings, got {type(texts).__name__}.")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"{what}[{bad}] is a {type(texts[bad]).__name__}, not a string.")
    return list(texts)


def _as_numbers(name: str, values: Sequence[float]) -> np.ndarray:
    try:
        array = np.asarray(values, np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"numeric feature {name!r} must be a sequence of numbers ({exc}).") from exc
    return array[np.isfinite(array)]


def load_tokenizer(tokenizer):
    """A tokenizer object from a tokenizer, a local path or a Hub id (``trust_remote_code`` stays off)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as exc:  # a missing folder or no network: one clear message
        raise ConfigError(f"Could not load a tokenizer from {str(tokenizer)!r} ({type(exc).__name__}: {exc}).") from exc


def vocabulary_ids(texts: Sequence[str], tokenizer) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids (or hashed word ids without a tokenizer) of all texts, per-text counts, and the id range."""
    if tokenizer is None:
        ids, counts = lexical.word_bucket_ids(texts)
        return ids, counts, lexical.WORD_BUCKETS
    ids, counts = lexical.tokenize(tokenizer, texts)
    return ids, counts, max(len(tokenizer), int(ids.max(initial=-1)) + 1)


def per_text_features(texts: Sequence[str], tokenizer, token_ids=None) -> dict[str, np.ndarray]:
    """The lexical per-text numbers of ``texts`` (token features only with a tokenizer)."""
    values = {"char_length": lexical.char_lengths(texts), "non_alpha_share": lexical.non_alpha_shares(texts)}
    if tokenizer is not None:
        ids, counts = token_ids if token_ids is not None else lexical.tokenize(tokenizer, texts)
        values["token_length"] = counts.astype(np.float64)
        values["unknown_token_share"] = lexical.unknown_token_shares(tokenizer, ids, counts)
    return values


def embedding_rows(total: int, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` evenly spaced items out of ``total`` (all of them when ``total <= limit``)."""
    if total <= limit:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, limit).round().astype(np.int64))


def _quantile(values: np.ndarray, false_alarm_rate: float) -> float:
    return max(float(np.quantile(values, 1.0 - false_alarm_rate)), 1e-12)


def _location_curve(
    values: np.ndarray, share: bool, settings: CalibrationSettings, rng: np.random.Generator
) -> ThresholdCurve:
    total = len(values)
    sd = float(values.std())
    if share:  # one pseudo-observation at the far end of [0, 1]
        far = 1.0 if values.mean() < 0.5 else 0.0
        sd = float(np.concatenate([values, [far]]).std())
    normal_quantile = float(scipy_stats.norm.isf(settings.false_alarm_rate / 2))
    sizes, thresholds = stats.calibration_sizes(total), []
    for size in sizes:
        starts = stats.circular_window_starts(total, size, settings.windows, rng)
        differences = np.abs(stats.window_minus_rest_means(values, starts, size))
        iid = normal_quantile * sd * math.sqrt(1 / size + 1 / (total - size))
        thresholds.append(max(_quantile(differences, settings.false_alarm_rate), iid, settings.min_effect * sd))
    return ThresholdCurve(sizes, thresholds)


def _vocabulary_curve(
    ids: np.ndarray, counts: np.ndarray, vocab: int, settings: CalibrationSettings, rng: np.random.Generator
) -> ThresholdCurve:
    total = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    all_counts = np.bincount(ids, minlength=vocab)
    sizes, thresholds = stats.calibration_sizes(total), []
    for size in sizes:
        values = []
        for start in stats.circular_window_starts(total, size, settings.windows, rng):
            end = start + size
            window_ids = ids[offsets[start] : offsets[min(end, total)]]
            if end > total:
                window_ids = np.concatenate([window_ids, ids[: offsets[end - total]]])
            window = np.bincount(window_ids, minlength=vocab)
            values.append(stats.js_divergence(window, all_counts - window))
        thresholds.append(_quantile(np.asarray(values), settings.false_alarm_rate))
    return ThresholdCurve(sizes, thresholds)


def _embedding_curve(mapped: np.ndarray, settings: CalibrationSettings, rng: np.random.Generator) -> ThresholdCurve:
    total = len(mapped)
    prefix = stats.doubled_prefix_sums(mapped)
    overall = mapped.sum(0)
    sizes, thresholds = stats.calibration_sizes(total), []
    for size in sizes:
        starts = stats.circular_window_starts(total, size, settings.windows, rng)
        window = stats.window_sums(prefix, starts, size)
        difference = window / size - (overall - window) / (total - size)
        thresholds.append(_quantile((difference**2).sum(1), settings.false_alarm_rate))
    return ThresholdCurve(sizes, thresholds)


class ReferenceProfile:
    """Summaries of reference texts and the thresholds learned from them (see the module docstring).

    Build with :meth:`fit`, keep with :meth:`save` / :meth:`load`, compare live windows with
    :class:`~hf_optim.monitoring.TextMonitor`.

    Example:
        >>> profile = ReferenceProfile.fit(texts, tokenizer="../shared/models/stories260K")  # doctest: +SKIP
        >>> sorted(profile.features)  # doctest: +SKIP
        ['char_length', 'non_alpha_share', 'token_length', 'unknown_token_share']
    """

    def __init__(
        self,
        *,
        num_texts: int,
        features: dict[str, FeatureSummary],
        vocabulary: dict[str, Any],
        embedding: dict[str, Any] | None,
        calibration: CalibrationSettings,
        tokenizer_path: str | None,
        tokenizer_fingerprint: str | None,
        model_path: str | None,
        seed: int,
    ) -> None:
        self.num_texts = num_texts
        self.features = features
        self.vocabulary = vocabulary
        self.embedding = embedding
        self.calibration = calibration
        self.tokenizer_path = tokenizer_path
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.model_path = model_path
        self.seed = seed

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        tokenizer=None,
        *,
        embeddings: bool = True,
        model=None,
        numeric_features: Mapping[str, Sequence[float]] | None = None,
        seed: int = 0,
        calibration: CalibrationSettings | None = None,
        embedding_sample_size: int = 1000,
        vocabulary_size: int = 1000,
        precomputed_embeddings: np.ndarray | None = None,
    ) -> ReferenceProfile:
        """Measure ``texts`` (healthy traffic, training or validation data) and learn each metric's thresholds.

        ``tokenizer``: the served model's tokenizer (object, local path or Hub id) for token length, unknown /
        byte-fallback share and the token distribution; without it those two features are skipped and the
        vocabulary is compared on hashed words. ``model``: a causal LM (object or path) whose perplexity of each
        text becomes the ``prompt_perplexity`` feature (needs ``tokenizer``). ``numeric_features``: other
        numbers per reference request (e.g. ``output_entropy``, ``latency_seconds``), each at least 10 finite
        values. ``embedding_sample_size``: texts embedded per live window at most (the reference embeds up to
        twice as many); ``vocabulary_size``: the most frequent reference tokens (or words) compared one by one,
        the rest pooled into one bin (rare names would otherwise dominate the divergence); ``precomputed_embeddings``: MiniLM embeddings of ``texts`` when they are already known.

        Example:
            >>> profile = ReferenceProfile.fit(texts, embeddings=False, numeric_features={"latency_seconds": lat})  # doctest: +SKIP
        """
        texts = _as_texts(texts, "texts")
        if len(texts) < MIN_REFERENCE:
            raise ConfigError(f"A reference needs at least {MIN_REFERENCE} texts, got {len(texts)}; pass more texts.")
        calibration = calibration or CalibrationSettings()
        if not (0 < calibration.false_alarm_rate < 0.5 and calibration.windows >= 10 and calibration.min_effect >= 0):
            raise ConfigError(
                f"{calibration} needs 0 < false_alarm_rate < 0.5, windows >= 10 and min_effect >= 0."
            )
        if embedding_sample_size < 10 or vocabulary_size < 1:
            raise ConfigError(
                f"embedding_sample_size={embedding_sample_size} must be >= 10 and vocabulary_size={vocabulary_size} >= 1."
            )
        tokenizer_path = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
        tokenizer = load_tokenizer(tokenizer)
        if tokenizer_path is None and tokenizer is not None and Path(str(tokenizer.name_or_path)).is_dir():
            tokenizer_path = str(Path(tokenizer.name_or_path).resolve())
        model_path = str(model) if isinstance(model, (str, os.PathLike)) else None
        if model_path is not None:
            model = load_model(model_path)
        if model is not None and tokenizer is None:
            raise ConfigError("Prompt perplexity needs the model's tokenizer: pass tokenizer= along with model=.")
        rng = np.random.default_rng(seed)

        ids, counts, vocab = vocabulary_ids(texts, tokenizer)
        values = per_text_features(texts, tokenizer, (ids, counts))
        if model is not None:
            from hf_optim.monitoring.quality import prompt_perplexities

            values["prompt_perplexity"] = prompt_perplexities(model, tokenizer, texts)
        for name, numbers in (numeric_features or {}).items():
            if not isinstance(name, str) or name in values:
                raise ConfigError(f"numeric feature name {name!r} must be a string not among {sorted(values)}.")
            values[name] = numbers
        features = {}
        for name, raw in values.items():
            array = _as_numbers(name, raw)
            if len(array) < MIN_REFERENCE:
                raise ConfigError(
                    f"numeric feature {name!r} has {len(array)} finite values; a reference needs at least {MIN_REFERENCE}."
                )
            share = name in SHARE_FEATURES or bool(np.isin(array, (0.0, 1.0)).all())
            features[name] = FeatureSummary(
                float(array.mean()), float(array.std()), len(array), "drift" if name in TEXT_FEATURES + TOKEN_FEATURES
                else feature_kind(name), _location_curve(array, share, calibration, rng),
            )
        all_counts = np.bincount(ids, minlength=vocab)
        kept = np.argsort(-all_counts, kind="stable")[: min(vocabulary_size, int(np.count_nonzero(all_counts)))]
        binned = stats.bin_ids(ids, kept)
        vocabulary = {
            "source": "tokenizer" if tokenizer is not None else "words",
            "ids": kept,
            "counts": np.bincount(binned, minlength=len(kept) + 1),
            "curve": _vocabulary_curve(binned, counts, len(kept) + 1, calibration, rng),
        }
        embedding = None
        if embeddings:
            embedding = _fit_embedding(texts, precomputed_embeddings, embedding_sample_size, calibration, rng, seed)
        return cls(
            num_texts=len(texts), features=features, vocabulary=vocabulary, embedding=embedding,
            calibration=calibration, tokenizer_path=tokenizer_path,
            tokenizer_fingerprint=lexical.vocabulary_fingerprint(tokenizer) if tokenizer is not None else None,
            model_path=model_path, seed=seed,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile to one ``.npz`` file (arrays + JSON metadata), atomically; returns the path.

        Example:
            >>> profile.save("reference.npz")  # doctest: +SKIP
        """
        path = Path(path)
        arrays = {"vocabulary_ids": self.vocabulary["ids"].astype(np.int64), "vocabulary_counts": self.vocabulary["counts"]}
        if self.embedding is not None:
            for key in ("frequencies", "phases", "mean"):
                arrays[f"embedding_{key}"] = self.embedding[key]
        meta = {
            "format_version": FORMAT_VERSION,
            "num_texts": self.num_texts,
            "calibration": asdict(self.calibration),
            "tokenizer_path": self.tokenizer_path,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "model_path": self.model_path,
            "seed": self.seed,
            "features": {
                name: {"mean": f.mean, "sd": f.sd, "count": f.count, "kind": f.kind, "curve": f.curve.to_dict()}
                for name, f in self.features.items()
            },
            "vocabulary": {
                "source": self.vocabulary["source"], "curve": self.vocabulary["curve"].to_dict(),
            },
            "embedding": None if self.embedding is None else {
                key: (value.to_dict() if isinstance(value, ThresholdCurve) else value)
                for key, value in self.embedding.items() if key not in ("frequencies", "phases", "mean")
            },
        }
        arrays["meta"] = np.array(json.dumps(meta))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return write_file_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceProfile:
        """Read a profile written by :meth:`save` (no pickles are loaded).

        Example:
            >>> profile = ReferenceProfile.load("reference.npz")  # doctest: +SKIP
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Reference profile {str(path)!r} does not exist; write one with ReferenceProfile.fit(...).save().")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            meta = json.loads(str(arrays.pop("meta")))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{str(path)!r} is not a reference profile written by hf_optim ({exc}).") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{str(path)!r} has profile format {meta.get('format_version')}; refit it with this version.")
        features = {
            name: FeatureSummary(f["mean"], f["sd"], f["count"], f["kind"], ThresholdCurve(**f["curve"]))
            for name, f in meta["features"].items()
        }
        vocabulary = {
            "source": meta["vocabulary"]["source"],
            "ids": arrays["vocabulary_ids"], "counts": arrays["vocabulary_counts"],
            "curve": ThresholdCurve(**meta["vocabulary"]["curve"]),
        }
        embedding = None
        if meta["embedding"] is not None:
            embedding = dict(meta["embedding"], curve=ThresholdCurve(**meta["embedding"]["curve"]))
            embedding.update({key: arrays[f"embedding_{key}"] for key in ("frequencies", "phases", "mean")})
        return cls(
            num_texts=meta["num_texts"], features=features, vocabulary=vocabulary, embedding=embedding,
            calibration=CalibrationSettings(**meta["calibration"]), tokenizer_path=meta["tokenizer_path"],
            tokenizer_fingerprint=meta["tokenizer_fingerprint"], model_path=meta["model_path"], seed=meta["seed"],
        )

    def __repr__(self) -> str:
        parts = [*self.features, f"{VOCABULARY_METRIC}({self.vocabulary['source']})"]
        if self.embedding is not None:
            parts.append(EMBEDDING_METRIC)
        return f"ReferenceProfile(num_texts={self.num_texts}, metrics=[{', '.join(parts)}])"


def load_model(path: str):
    """A causal LM from a folder written by hf_optim (packed weights decoded) or any Transformers folder / Hub id."""
    from hf_optim.compression.storage import load_optimized

    if not Path(path).is_dir():
        raise ConfigError(f"Model folder {path!r} does not exist.")
    return load_optimized(path)


def _fit_embedding(
    texts: list[str], precomputed: np.ndarray | None, sample_size: int, calibration: CalibrationSettings,
    rng: np.random.Generator, seed: int,
) -> dict[str, Any]:
    from hf_optim.monitoring.embeddings import EMBEDDING_DIM, embed_texts

    rows = embedding_rows(len(texts), 2 * sample_size)
    if precomputed is not None:
        if precomputed.shape != (len(texts), EMBEDDING_DIM):
            raise ConfigError(
                f"precomputed_embeddings has shape {precomputed.shape}; expected ({len(texts)}, {EMBEDDING_DIM})."
            )
        vectors = np.asarray(precomputed, np.float32)[rows]
    else:
        vectors = embed_texts([texts[i] for i in rows])
    bandwidth = stats.median_bandwidth(vectors, seed=seed)
    frequencies, phases = stats.random_fourier_basis(EMBEDDING_DIM, RFF_FEATURES, bandwidth, seed=seed)
    mapped = stats.random_fourier_features(vectors, frequencies, phases)
    return {
        "frequencies": frequencies, "phases": phases, "mean": mapped.mean(0).astype(np.float64),
        "bandwidth": bandwidth, "num_embedded": len(rows), "sample_size": sample_size,
        "curve": _embedding_curve(mapped, calibration, rng),
    }
