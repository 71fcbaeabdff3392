"""Writing a folder atomically: build it beside the target, then swap it in with renames.

Example:
    >>> with staged_directory("out/model") as staging:  # doctest: +SKIP
    ...     (staging / "config.json").write_text("{}")
    >>> # out/model now holds config.json; had the block raised, out/model would be untouched
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an older ``target`` is moved aside first and deleted only after the rename."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target``; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, target)
