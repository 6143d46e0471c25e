"""Edits as a portable artifact, PEFT-style: save a database next to (or apart from) a model, load it back onto a
model after checking that the model is the one the edits were made for.

Example::

    >>> db.save_pretrained("my-edits", model=model)                                  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> neuraldb.from_pretrained(model, "my-edits")        # checks the weights, patches  # doctest: +SKIP
    >>> model.save_pretrained("edited")   # a patched model: weights + the edits beside them  # doctest: +SKIP

Model identity is :func:`fingerprint` (a hash of the weights rounded to bf16, the same in fp32 and bf16 and after
``save_pretrained``/``from_pretrained``; see :mod:`neuraldb.pretrained_io`) and the architecture
(``config.model_type``), never a folder name or a quantisation suffix. The base model's Hub id is recorded for
people to read (``neuraldb_config.json``), not compared.

``save_pretrained`` takes the model as an argument (``db.save_pretrained(dir, model=model)``) because a database does
not know the weights it was made for: without ``model`` the directory holds no fingerprint, and loading it can only
check the architecture (if recorded) and the dimensions (``patch_model`` does), with a warning at both ends.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from neuraldb import pretrained_io
from neuraldb.database import NeuralKVDatabase
from neuraldb.models import model_id
from neuraldb.patching import patch_model
from neuraldb.pretrained_io import CONFIG_NAME, DATABASE_NAME, base_model_id, fingerprint, read_config

__all__ = [
    "CONFIG_NAME",
    "DATABASE_NAME",
    "base_model_id",
    "check_model",
    "fingerprint",
    "from_pretrained",
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


def _describe(name: str | None, arch: str | None, digest: str | None, dtype: str | None) -> str:
    return f"{name or '(no Hub id recorded)'} ({arch or 'architecture unknown'}, fingerprint {digest}, {dtype})"


def check_model(
    model: torch.nn.Module, config: dict[str, Any], *, force: bool = False, source: str = "the edits"
) -> None:
    """Check that ``model`` has the architecture and weights ``config`` (a ``neuraldb_config.json``) records.

    Raises ValueError naming both sides on a mismatch; with ``force=True`` warns instead. A config that records no
    fingerprint (saved without ``model=``), or one made by another fingerprint method, cannot be checked: a warning.
    """
    arch, want = pretrained_io.architecture(model), config.get("architecture")
    digest, want_digest = None, config.get("fingerprint")
    problems = []
    if want and arch and want != arch:
        problems.append(f"architecture {want!r} != {arch!r}")
    if want_digest is None:
        warnings.warn(
            f"{source} record no fingerprint of their base weights (saved without model=): cannot check that "
            f"{type(model).__name__} is the model they were made for",
            UserWarning,
            stacklevel=3,
        )
    elif config.get("fingerprint_method") != pretrained_io.FINGERPRINT_METHOD:
        warnings.warn(
            f"{source} record a fingerprint made by {config.get('fingerprint_method')!r}, which this neuraldb does "
            f"not compute ({pretrained_io.FINGERPRINT_METHOD!r}): the weights are not checked",
            UserWarning,
            stacklevel=3,
        )
    else:
        digest = fingerprint(model)
        if digest != want_digest:
            problems.append("other weights (the fingerprints differ)")
    if not problems:
        return
    dtype, want_dtype = pretrained_io.weights_dtype(model), config.get("fingerprint_dtype")
    mine = _describe(base_model_id(model_id(model) if hasattr(model, "config") else None)[0], arch, digest, dtype)
    theirs = _describe(config.get("base_model"), want, want_digest, want_dtype)
    msg = f"{source} were made for {theirs}, but this model is {mine}: {'; '.join(problems)}"
    if "float16" in (dtype, want_dtype) and dtype != want_dtype:
        msg += " (an fp16 copy of fp32/bf16 weights, or the reverse, has another fingerprint: fp16 rounds differently)"
    if not force:
        raise ValueError(msg + ". Pass force=True to patch anyway")
    warnings.warn(msg + ". Patching anyway (force=True)", UserWarning, stacklevel=3)


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
    return patch_model(model, db, backend=backend)
