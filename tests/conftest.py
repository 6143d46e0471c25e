"""Fixtures shared by the editing and evaluation tests."""

from __future__ import annotations

import pytest


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
