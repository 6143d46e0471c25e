"""Atomic file replacement: the one way neuraldb writes a file that must never be left half-written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; on a clean exit it is fsynced and renamed over ``target``.

    On an exception the temporary file is removed and ``target`` keeps its previous content, so a crash or an
    interrupted write never leaves a truncated file under the real name.

    Example::

        >>> with atomic_path("/tmp/example.txt") as tmp:
        ...     _ = tmp.write_text("all or nothing")
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every platform can open a directory, and durability is best effort there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
