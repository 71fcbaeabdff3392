"""Local ``evaluate`` metric modules (the Hub copies of evaluate's metric scripts are unreachable offline).

Example:
    >>> import evaluate
    >>> from hf_optim.core.evaluate_modules import metric_path
    >>> perplexity = evaluate.load(metric_path("perplexity"))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path


def metric_path(name: str) -> str:
    """The folder of the local evaluate module ``name``, for ``evaluate.load``."""
    path = Path(__file__).parent / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"No local evaluate module {name!r}; available: {sorted(p.name for p in path.parent.iterdir() if p.is_dir() and not p.name.startswith('_'))}.")
    return str(path)
