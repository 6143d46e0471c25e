"""Where the tests find the real evaluation data (``../shared/data`` beside the checkout, or $NEURALDB_DATA_DIR).

The one place that knows the location, so every skip message names the same resolved directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("NEURALDB_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data")
).resolve()


def data_file(relative: str) -> Path:
    """``SHARED_DATA / relative``, or skip the calling test saying which file is missing and how to point at it."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not found (set NEURALDB_DATA_DIR to the shared data directory)")
    return path
