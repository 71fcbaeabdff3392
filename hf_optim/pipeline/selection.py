"""Which variants are worth shipping: inside the quality budget, and on the Pareto front of the chosen objectives.

Pure functions over result rows (mappings of metric name to value); every objective is lower-is-better.

Example:
    >>> rows = [{"name": "a", "perplexity": 5.0, "size_bytes": 100}, {"name": "b", "perplexity": 5.2, "size_bytes": 40},
    ...         {"name": "c", "perplexity": 5.3, "size_bytes": 60}]
    >>> pareto_front(rows, ["perplexity", "size_bytes"])
    ['a', 'b']
    >>> within_budget(rows[1], base_perplexity=5.0, budget={"max_perplexity_increase": 0.05})
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def has_metrics(row: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """Whether ``row`` holds a finite number under every key."""
    return all(isinstance(row.get(o), (int, float)) and math.isfinite(row[o]) for o in keys)


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], objectives: Sequence[str]) -> bool:
    """``a`` is no worse than ``b`` in every objective and strictly better in at least one."""
    return all(a[o] <= b[o] for o in objectives) and any(a[o] < b[o] for o in objectives)


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> list[str]:
    """Names of the rows no other row dominates, in input order; rows missing an objective take no part.

    Rows with identical objective values do not dominate each other, so ties all stay on the front.
    """
    candidates = [row for row in rows if has_metrics(row, objectives)]
    return [
        row["name"] for row in candidates
        if not any(dominates(other, row, objectives) for other in candidates if other is not row)
    ]


def perplexity_increase(perplexity: float, base_perplexity: float) -> float:
    """Relative change of perplexity against the base model: 0.02 means +2%."""
    return perplexity / base_perplexity - 1.0


def within_budget(row: Mapping[str, Any], base_perplexity: float, budget: Mapping[str, Any]) -> bool:
    """Whether a measured row meets every limit the budget sets (a limit it could not be measured on fails)."""
    limit = budget.get("max_perplexity_increase")
    if limit is not None:
        value = row.get("perplexity")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        # a tiny tolerance: a variant that reproduces the base model exactly must not fail on rounding
        if perplexity_increase(value, base_perplexity) > limit + 1e-9:
            return False
    minimum = budget.get("min_top1_agreement")
    if minimum is not None:
        agreement = row.get("top1_agreement")
        if not isinstance(agreement, (int, float)) or agreement < minimum:
            return False
    return True
