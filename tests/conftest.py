"""Fixtures shared by the editing and evaluation tests, and the process settings every test run needs."""

from __future__ import annotations

import getpass
import os
import tempfile

import pytest

# torch.compile's on-disk cache is keyed without $ATEN_CPU_CAPABILITY: code generated for 8-lane AVX2 vectors in a
# run with ATEN_CPU_CAPABILITY=avx2 is later rebuilt with AVX-512's 16-lane vectors, and its stores run past the end
# of buffers (heap corruption, seen as "malloc(): unaligned tcache chunk" in a later plain run). One cache per
# capability keeps the runs of `make test` (plain, then with the AVX2 paths forced) apart.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"),
    )


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of ``_tiny_editing.word_llama``, shared by a module's tests (they do not modify it)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from _tiny_editing import word_llama

    return word_llama()


@pytest.fixture
def neuraldb_cache(tmp_path, monkeypatch):
    """A private NEURALDB_CACHE_DIR, so generated prefixes are not shared between tests or with the user's cache."""
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
