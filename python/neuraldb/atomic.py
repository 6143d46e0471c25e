"""Atomic file replacement: the one way neuraldb writes a file that must never be left half-written.

What a write to a path replaces (:func:`resolve_target`): a symlink is followed and its target replaced, the link
itself stays; an existing regular file is replaced by one with the same permission bits (a new file gets the
umask's default, like ``open``); anything else that exists there (a directory, a device, a FIFO, a socket) is refused
before a byte is written. Temporary files are named ``.NAME.tmp-PID-RANDOM`` beside the file they replace; one
whose writer was killed (``kill -9``, power loss) is removed by the next write to the same file.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
)


def file_kind(mode: int) -> str:
    """What ``mode`` (an ``st_mode``) describes, in words: "regular file", "directory", "FIFO", ..."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def resolve_target(target: str | os.PathLike) -> Path:
    """The regular file that a write to ``target`` replaces: ``target`` itself, or where its symlinks lead.

    Raises ValueError when something other than a regular file exists there and FileNotFoundError when its
    directory does not exist, both naming ``target``; nothing is written.
    """
    given = Path(target)
    real = Path(os.path.realpath(given))
    via = "" if real == given.absolute() else f" (it leads to {str(real)!r})"
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        if not real.parent.is_dir():
            raise FileNotFoundError(
                f"path {str(given)!r}: directory {str(real.parent)!r} does not exist{via}"
            ) from None
        return real
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"path {str(given)!r} is a {file_kind(st.st_mode)}{via}, not a regular file; give a file name to write"
        )
    return real


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; on a clean exit it is fsynced and renamed over ``target``.

    On an exception the temporary file is removed and ``target`` keeps its previous content, so a crash or an
    interrupted write never leaves a truncated file under the real name. ``target`` is resolved first
    (:func:`resolve_target`: symlinks followed, only regular files replaced) and the new file keeps the old one's
    permission bits. The temporary file exists, empty, when the body starts; the body may write it or replace it.

    Example::

        >>> with atomic_path("/tmp/example.txt") as tmp:
        ...     _ = tmp.write_text("all or nothing")
    """
    target = resolve_target(target)
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    # O_EXCL: a temporary name is never shared. 0o666 less the umask is the mode open() would give a new file.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
    if mode is None:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            # After the body: a writer that replaced the file by renaming its own over it set its own mode.
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(target.parent)


def _temp_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[0-9a-f]{{8}}")


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left beside ``target`` in processes that died before they
    could (``kill -9``); returns what it removed.

    Only names of exactly ``target``'s temporary-file pattern whose process id is not running on this machine are
    touched. On a directory that several machines write (a network file system) a writer on another machine can
    look dead; its save then fails, leaving the target as it was. On non-POSIX systems nothing is removed (there is
    no harmless way to ask whether a process id is alive).
    """
    target = Path(target)
    if os.name != "posix":
        return []
    pattern = _temp_pattern(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already (another writer cleaned it), or not ours to remove
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process, or a number no process can have
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
