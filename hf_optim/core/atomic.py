"""Writing folders and files atomically: build them beside the target, then swap them in with renames.

Example:
    >>> with staged_directory("out/model") as staging:  # doctest: +SKIP
    ...     (staging / "config.json").write_text("{}")
    >>> # out/model now holds config.json; had the block raised, out/model would be untouched
    >>> write_file_atomically("out/report.md", b"# Report")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
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
    """Yield an empty folder named like ``target`` inside a hidden folder beside it; on success it replaces
    ``target``, on error it is removed.

    The staging folder already has the final name, so whatever reads a name from it while it is being built (a
    model card's title, a recorded path's last part) gets the right one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    parent = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}"
    staging = parent / target.name
    staging.mkdir(parents=True)  # plain mkdir keeps the user's umask (tempfile.mkdtemp would make it private)
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def write_file_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a hidden file beside ``path``, then rename it over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:  # os.open with mode 0o666 keeps the user's umask (mkstemp would make the file private)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
