"""Edits as a portable artifact, PEFT-style: save a database next to (or apart from) a model, load it back onto a
model after checking that the model is the one the edits were made for.

Example::

    >>> db.save_pretrained("my-edits", model=model)                                  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> neuraldb.from_pretrained(model, "my-edits")        # checks the weights, patches  # doctest: +SKIP
    >>> model.save_pretrained("edited")   # a patched model: weights + the edits beside them  # doctest: +SKIP

Model identity is :func:`fingerprint` (a hash of the weights rounded to bf16, the same in fp32 and bf16 and after
``save_pretrained``/``from_pretrained``; see :mod:`neuraldb.pretrained_io`) and the architecture
(``config.model_type``), never a folder name or a quantisation suffix. A database records both
(``db.model_identity``, set by ``edit`` and ``NeuralKVDatabase.for_model``), and :func:`check_model` is the one
check that ``neuraldb.from_pretrained``, ``patch_model``, ``edit(db=...)`` and the CLI make. The base model's Hub id
is recorded for people to read (``neuraldb_config.json``) and compared only for records without a fingerprint
(database files written before neuraldb recorded one).

``save_pretrained`` takes the model as an argument (``db.save_pretrained(dir, model=model)``) for databases that do
not know the weights they were made for (built by hand, or loaded from an older file): without either, the directory
holds no fingerprint, and loading it can only check the architecture (if recorded) and the dimensions
(``patch_model`` does), with a warning at both ends.
"""

from __future__ import annotations

import os

import torch

from neuraldb import patching, pretrained_io
from neuraldb.database import NeuralKVDatabase
from neuraldb.pretrained_io import (
    CONFIG_NAME,
    DATABASE_NAME,
    ModelMismatchError,
    base_model_id,
    check_model,
    fingerprint,
    model_identity,
    read_config,
)

__all__ = [
    "CONFIG_NAME",
    "DATABASE_NAME",
    "ModelMismatchError",
    "base_model_id",
    "check_model",
    "fingerprint",
    "from_pretrained",
    "model_identity",
    "read_config",
    "save_pretrained",
]


def save_pretrained(db: NeuralKVDatabase, directory: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
    """Write ``db`` into ``directory`` as ``neuraldb_database.safetensors`` (atomically, by ``db.save``) plus
    ``neuraldb_config.json``: base model id (normalised: no local paths, the GGUF quantisation apart), revision when
    known, architecture, module path, layer, gamma, template and, when ``model`` is given, its weights' fingerprint.
    The same as ``db.save_pretrained(directory, model=model)``. Pass ``model``: without it nothing can later tell
    whether a model is the one the edits belong to (a warning says so).

    Example::

        >>> neuraldb.save_pretrained(db, "my-edits", model=model)   # doctest: +SKIP
    """
    if not isinstance(db, NeuralKVDatabase):
        raise TypeError(f"db must be a neuraldb.NeuralKVDatabase, got {type(db).__name__} (a sharded one: db.save)")
    pretrained_io.save(db, directory, model)


def from_pretrained(
    model: torch.nn.Module, directory: str | os.PathLike, *, force: bool = False, backend: str | None = None
) -> torch.nn.Module:
    """Load the edits in ``directory`` (written by ``db.save_pretrained`` or a patched model's ``save_pretrained``),
    check that ``model`` is the model they were made for (:func:`check_model`: architecture and weights
    fingerprint), and patch it (:func:`neuraldb.patch_model`, with the database's layer, module and gamma).

    Args:
        model: the base model, e.g. ``AutoModelForCausalLM.from_pretrained(directory)`` for a directory a patched
            model's ``save_pretrained`` wrote.
        directory: the edits directory.
        force: patch even when architecture or fingerprint differ (a warning instead of the ValueError).
        backend: passed to ``patch_model``.

    Returns:
        ``model``, patched; ``neuraldb.patch_info(model).db`` is the loaded database.

    Example::

        >>> model = neuraldb.from_pretrained(AutoModelForCausalLM.from_pretrained("edited"), "edited")  # doctest: +SKIP
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = read_config(directory)
    check_model(model, config, force=force, source=f"the edits in {os.fspath(directory)!r}")
    db = NeuralKVDatabase.from_pretrained(directory)
    # checked above, against the directory's record (which names the directory in its messages)
    return patching.patch_checked(model, db, backend=backend)
