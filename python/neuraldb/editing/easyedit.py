"""EasyEdit-style calls of :func:`neuraldb.edit`: parallel keyword lists in, the database and per-fact rewrite success
out.

Example::

    >>> import neuraldb
    >>> model, tok = neuraldb.load_model("smollm2")                                          # doctest: +SKIP
    >>> db, ok = neuraldb.edit(
    ...     model, tok,
    ...     prompts=["The mother tongue of Danielle Darrieux is", "Spike Hughes originates from"],
    ...     target_new=["English", "Philadelphia"],
    ...     subject=["Danielle Darrieux", "Spike Hughes"],
    ... )                                                                                    # doctest: +SKIP
    >>> ok                                                                                   # doctest: +SKIP
    [True, True]

**Rewrite success** of a fact: the model patched with the returned database, given the fact's prompt inside the
database's template (``db.template``, the text the edit was made on), continues greedily with the target, i.e. at
every token of the target (tokenised as it follows the prompt, :func:`neuraldb.templates.encode_target`) the model's
top-1 next token, teacher-forced, is that token. A yes/no per fact; EasyEdit's ``rewrite_acc`` is the mean of the
same per-token test, so a fact is a success here exactly when its ``rewrite_acc`` is 1.0.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from neuraldb import templates
from neuraldb.facts import Fact, _place_subject, _Unusable

if TYPE_CHECKING:
    from neuraldb.database import NeuralKVDatabase

__all__ = ["EditResult", "as_facts", "facts_from_lists", "rewrite_success"]


class EditResult(NamedTuple):
    """What ``neuraldb.edit(model, tok, prompts=..., target_new=..., subject=...)`` returns: unpack it as
    ``db, ok = ...``. ``rewrite_success[i]`` is fact ``i``'s rewrite success (see :mod:`neuraldb.editing.easyedit`);
    the model itself is left as it was, unpatched (``neuraldb.patch_model(model, db)`` applies the edits)."""

    db: NeuralKVDatabase
    rewrite_success: list[bool]


def as_facts(facts: Iterable[Fact] | Fact) -> list[Fact]:
    """``facts`` as a list, every element checked to be a :class:`~neuraldb.Fact`."""
    if isinstance(facts, Fact):
        return [facts]
    out = list(facts)
    for i, f in enumerate(out):
        if not isinstance(f, Fact):
            raise TypeError(f"facts[{i}] must be a neuraldb.Fact, got {type(f).__name__}")
    return out


def _strings(name: str, value, *, optional: bool = False) -> list:
    if isinstance(value, str):  # EasyEdit accepts a lone string for a single edit
        return [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    out = list(value)
    for i, v in enumerate(out):
        if optional and v is None:
            continue
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty string, got {v!r}")
    return out


def facts_from_lists(
    prompts: Sequence[str] | str,
    target_new: Sequence[str] | str,
    subject: Sequence[str] | str,
    ground_truth: Sequence[str | None] | str | None = None,
) -> list[Fact]:
    """One :class:`~neuraldb.Fact` per position of the parallel lists. ``prompts[i]`` is the full prompt, with
    ``subject[i]`` written in it (found exactly, else ignoring case; a prompt may instead mark the subject with
    "{}"); ``ground_truth[i]`` (optional) becomes ``target_true``. Every list is checked before any fact is made:
    a TypeError or ValueError names the argument and the position."""
    lists = {"prompts": _strings("prompts", prompts), "target_new": _strings("target_new", target_new)}
    lists["subject"] = _strings("subject", subject)
    if ground_truth is not None:
        lists["ground_truth"] = _strings("ground_truth", ground_truth, optional=True)
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"{', '.join(lengths)} must have the same length (one entry per fact), got "
            + ", ".join(f"{name}: {n}" for name, n in lengths.items())
        )
    facts = []
    truths = lists.get("ground_truth") or [None] * lengths["prompts"]
    for i, (prompt, target, subj, truth) in enumerate(
        zip(lists["prompts"], lists["target_new"], lists["subject"], truths)
    ):
        if prompt.count("{}") == 1:
            template, written = prompt, subj
        else:
            try:
                template, written = _place_subject(prompt, subj)
            except _Unusable:
                raise ValueError(f"subject[{i}] {subj!r} does not occur in prompts[{i}] {prompt!r}") from None
        facts.append(Fact(written, template, target, target_true=truth))
    return facts


@contextlib.contextmanager
def _patched_with(model, db: NeuralKVDatabase) -> Iterator[None]:
    """``model`` patched with ``db`` inside the block; its previous patch (or none) restored afterwards."""
    from neuraldb.patching import patch_info, patch_model, unpatch_model

    previous = patch_info(model)
    if previous is not None and previous.db is db and previous.enabled:
        yield
        return
    patch_model(model, db)
    try:
        yield
    finally:
        if previous is None:
            unpatch_model(model)
        else:
            # The previous database was accepted for this model when it was patched; re-checking it would only
            # repeat any warning its owner already saw.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                where = {"layer": previous.layer} if previous.layer is not None else {"module": previous.module_path}
                patch_model(model, previous.db, gamma=previous.gamma, backend=previous.backend, force=True, **where)
            patch_info(model).enabled = previous.enabled


@torch.no_grad()
def rewrite_success(model, tok, db: NeuralKVDatabase, facts: Sequence[Fact], *, batch_size: int = 32) -> list[bool]:
    """Per fact: does ``model`` patched with ``db`` continue the fact's prompt greedily with its ``target_new``?
    (The definition: :mod:`neuraldb.editing.easyedit`.) The model's patch is as it was afterwards."""
    from neuraldb.evaluation.scoring import score_token_ids

    pairs = [(templates.encode(tok, db.template, f.text), templates.encode_target(tok, f.target_new)) for f in facts]
    was_training = model.training
    model.eval()
    try:
        with _patched_with(model, db):
            scores = score_token_ids(
                model, pairs, pad_id=templates.pad_id(tok), batch_size=batch_size, show_progress=False
            )
    finally:
        model.train(was_training)
    return [s.is_greedy for s in scores]
