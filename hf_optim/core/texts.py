"""Reading text documents from a file or a dataset, for evaluation, calibration and monitoring.

Example:
    >>> docs = load_texts("stories.txt")  # blank-line separated documents  # doctest: +SKIP
    >>> docs = load_texts("requests.jsonl", text_column="prompt")  # one JSON object per line  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_optim.core.errors import ConfigError


def load_texts(source: str | Path, text_column: str = "text", unit: str = "paragraph", split: str = "train") -> list[str]:
    """Non-empty documents from ``source``.

    - ``.txt``: one document per blank-line separated paragraph (``unit="paragraph"``) or per line (``"line"``);
      read as UTF-8, undecodable bytes replaced.
    - ``.jsonl``/``.json``: one JSON object per line with a ``text_column`` field.
    - anything else: a ``datasets`` dataset name (or local dataset folder), column ``text_column`` of ``split``.
    """
    if unit not in ("paragraph", "line"):
        raise ConfigError(f"unit={unit!r} must be 'paragraph' or 'line'.")
    path = Path(source)
    if path.suffix in (".txt", ".jsonl", ".json"):
        if not path.is_file():
            raise ConfigError(f"Text file {str(source)!r} does not exist.")
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".txt":
            texts = raw.split("\n\n") if unit == "paragraph" else raw.splitlines()
        else:
            texts = []
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[text_column])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ConfigError(
                        f"{str(source)!r} line {number}: expected a JSON object with a {text_column!r} field ({exc!r})."
                    ) from exc
    else:
        import datasets

        try:
            texts = datasets.load_dataset(str(source), split=split)[text_column]
        except Exception as exc:  # a missing dataset, no network, a missing column: one clear message
            raise ConfigError(f"Could not load texts from dataset {str(source)!r} ({type(exc).__name__}: {exc}).") from exc
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ConfigError(f"{str(source)!r} holds no text.")
    return texts
