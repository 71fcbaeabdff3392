"""Pure statistics behind drift detection: divergences, kernel two-sample distances, windows and threshold curves.

- Jensen-Shannon divergence (base 2, in [0, 1]) between two count vectors over the same vocabulary.
- MMD with a Gaussian kernel, approximated with random Fourier features (Rahimi & Recht, 2007): the squared MMD
  of two samples is the squared distance between their mean feature vectors, so a reference is summarised by
  one mean vector and a window costs O(n) instead of O(n * reference).
- Circular contiguous windows of a reference and their "window minus rest" statistics, via prefix sums.
- Threshold curves: a statistic's mean and spread over reference windows at a grid of sizes, interpolated
  log-log in the window size and held constant beyond the largest calibrated size.

Example:
    >>> float(js_divergence(np.array([1, 0]), np.array([0, 1])))
    1.0
    >>> float(interpolate_log_log([10, 100], [1.0, 0.1], 1000))  # held at the largest calibrated size
    0.1
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def js_divergence(counts_a: np.ndarray, counts_b: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between the distributions of two non-negative count vectors.

    0 for identical distributions, 1 for disjoint supports; an all-zero vector is treated as disjoint from
    anything (1.0), or identical to another all-zero vector (0.0).
    """
    counts_a, counts_b = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    total_a, total_b = counts_a.sum(), counts_b.sum()
    if total_a == 0 or total_b == 0:
        return float(total_a != total_b)
    support = (counts_a > 0) | (counts_b > 0)
    p, q = counts_a[support] / total_a, counts_b[support] / total_b
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(min(max((kl_p + kl_q) / 2, 0.0), 1.0))


def bin_ids(ids: np.ndarray, kept_ids: np.ndarray) -> np.ndarray:
    """Map ``ids`` to their position in ``kept_ids``; every other id goes to one shared last bin ``len(kept_ids)``."""
    ids = np.asarray(ids, np.int64)
    kept_ids = np.asarray(kept_ids, np.int64)
    size = max(int(kept_ids.max(initial=-1)), int(ids.max(initial=-1))) + 1
    table = np.full(size, len(kept_ids), np.int64)
    table[kept_ids] = np.arange(len(kept_ids))
    return table[ids]


def median_bandwidth(points: np.ndarray, max_points: int = 500, seed: int = 0) -> float:
    """The median heuristic for a Gaussian kernel's bandwidth: median pairwise distance of (up to) ``max_points``."""
    points = np.asarray(points, np.float64)
    if len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    squared = (points**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * points @ points.T, 0.0))
    upper = distances[np.triu_indices(len(points), k=1)]
    median = float(np.median(upper)) if upper.size else 0.0
    return median if median > 0 else 1.0


def random_fourier_basis(dim: int, num_features: int, bandwidth: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies ``(dim, num_features)`` and phases ``(num_features,)`` for ``exp(-|x-y|^2 / (2 bandwidth^2))``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim, num_features)) / bandwidth).astype(np.float32), rng.uniform(
        0, 2 * np.pi, num_features
    ).astype(np.float32)


def random_fourier_features(points: np.ndarray, frequencies: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Feature map whose inner products approximate the Gaussian kernel: ``sqrt(2/D) cos(x W + b)``."""
    return np.sqrt(2.0 / frequencies.shape[1]) * np.cos(np.asarray(points, np.float32) @ frequencies + phases)


def mmd_squared(mean_features_a: np.ndarray, mean_features_b: np.ndarray) -> float:
    """Squared MMD (biased, V-statistic) between two samples given their mean random-Fourier feature vectors."""
    difference = np.asarray(mean_features_a, np.float64) - np.asarray(mean_features_b, np.float64)
    return float(difference @ difference)


def calibration_sizes(total: int, smallest: int = 5) -> list[int]:
    """Window sizes 5, 10, 20, 50, 100, ... up to half of ``total`` (and half itself), for threshold curves."""
    half = total // 2
    sizes = [s * 10**e for e in range(9) for s in (1, 2, 5) if smallest <= s * 10**e < half]
    return [*sizes, half] if half >= smallest else []


def circular_window_starts(total: int, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` start positions of contiguous windows of ``size`` items that may wrap around the end."""
    if not 0 < size <= total:
        raise ValueError(f"window size {size} must be in [1, {total}]")
    return rng.integers(0, total, count)


def window_sums(prefix: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """Sums of circular windows from the prefix sums of the values written twice (``prefix[0] = 0``).

    ``prefix`` has shape ``(2 * total + 1, ...)``: the cumulative sum of ``concatenate([values, values])``.
    """
    return prefix[starts + size] - prefix[starts]


def doubled_prefix_sums(values: np.ndarray) -> np.ndarray:
    """Prefix sums of ``values`` written twice along axis 0, with a leading zero row (see :func:`window_sums`)."""
    values = np.asarray(values, np.float64)
    doubled = np.concatenate([values, values])
    return np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(doubled, axis=0)])


def window_minus_rest_means(values: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """For each circular window: mean of the window minus mean of the rest of ``values``."""
    values = np.asarray(values, np.float64)
    total = len(values)
    window = window_sums(doubled_prefix_sums(values), starts, size)
    return window / size - (values.sum() - window) / (total - size)


def interpolate_log_log(sizes: Sequence[float], values: Sequence[float], size: float) -> float:
    """A positive quantity known at ``sizes``, at ``size``: linear in log-log between calibrated sizes,
    extrapolated as a power law below the smallest, held at the largest calibrated value beyond the largest.

    Holding it beyond the largest size is deliberate: a window larger than half the reference is judged by the
    spread between reference halves, so that large windows do not alert on differences the reference has itself.
    """
    sizes_arr = np.asarray(sizes, np.float64)
    logs = np.log(np.maximum(np.asarray(values, np.float64), 1e-300))
    if size >= sizes_arr[-1]:
        return float(np.exp(logs[-1]))
    if len(sizes_arr) == 1:
        return float(np.exp(logs[0]))
    if size <= sizes_arr[0]:
        slope = (logs[1] - logs[0]) / (np.log(sizes_arr[1]) - np.log(sizes_arr[0]))
        return float(np.exp(logs[0] + slope * (np.log(size) - np.log(sizes_arr[0]))))
    return float(np.exp(np.interp(np.log(size), np.log(sizes_arr), logs)))
