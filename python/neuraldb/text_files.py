"""The one reader of the text files the library is given: facts files, calibration corpora and evaluation data.

Each accepts the same things -- plain or gzip-compressed (told by gzip's magic bytes, not by the file's name), UTF-8
with or without a byte-order mark -- and rejects the rest with the file's name and, for a byte that is not UTF-8, its
line. Files are read whole so that the line can be found (a text stream only knows its offset in its buffer); the
files read here are at most tens of MB.

Example::

    >>> from neuraldb.text_files import read_text
    >>> read_text("corpus.txt.gz")[:20]          # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import os
import zlib

__all__ = ["TextFileError", "read_text"]

_GZIP_MAGIC = b"\x1f\x8b"


class TextFileError(ValueError):
    """A file that is not (gzipped) UTF-8 text; the message names the file and what is wrong."""


def read_text(path: str | os.PathLike) -> str:
    """The text of ``path``, gunzipped when it starts with gzip's magic bytes, decoded as UTF-8 (a BOM is dropped).

    Raises OSError when the file cannot be read and :class:`TextFileError` when it is a broken gzip file or not
    UTF-8.
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    gzipped = raw[:2] == _GZIP_MAGIC
    if gzipped:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise TextFileError(f"{name}: not a readable gzip file ({e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TextFileError(
            f"{name}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}"
            f"{' of the gunzipped text' if gzipped else ''})"
        ) from None
