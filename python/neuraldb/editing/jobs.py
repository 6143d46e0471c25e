"""Long editing jobs: checkpointed, resumable editing of a slice of a facts list into a database file, and merging
the files of disjoint slices.

A job edits ``facts[start:stop]`` in chunks that end at the multiples of ``checkpoint_every`` (global fact indices),
one :func:`neuraldb.edit` call per chunk, and saves the database after each chunk (an atomic save: a kill at any
moment leaves the previous checkpoint). The database's ``config["edit_job"]`` records what was done::

    {"facts": {"n": 21919, "sha256": "...", "path": "...", "size": 123}, "start": 0, "stop": 21919, "done": 512,
     "checkpoint_every": 256}

and the ids of the facts are their global indices, so a resumed job continues at ``done`` and gives, chunk for chunk,
the database an uninterrupted job gives (the chunks decide the batches, hence the bits of the residuals).
Jobs over disjoint slices (one per process or device) whose boundaries are multiples of ``checkpoint_every`` merge
(:func:`merge_databases`) into the database one job over all the facts gives, bit for bit with ``warm_start`` off;
with it on, each slice warms its facts up from its own rows only, so the bits differ (the facts are the same).

Example::

    >>> import neuraldb
    >>> from neuraldb.editing import edit_checkpointed
    >>> model, tok = neuraldb.load_model("smollm2")                                                 # doctest: +SKIP
    >>> facts = neuraldb.facts.load("counterfact_mend_edit.json.gz")                               # doctest: +SKIP
    >>> db = edit_checkpointed(model, tok, facts, "cf.safetensors", checkpoint_every=256, resume=True)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuraldb.editing.defaults import EditConfig, recorded, resolve
from neuraldb.editing.progress import fact_bar

if TYPE_CHECKING:
    from neuraldb.database import NeuralKVDatabase
    from neuraldb.facts import Fact

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "JOB_KEY",
    "JobMismatchError",
    "check_resume",
    "edit_checkpointed",
    "facts_fingerprint",
    "job_record",
    "merge_databases",
]

JOB_KEY = "edit_job"
DEFAULT_CHECKPOINT_EVERY = 256
# The machine's choice (neuraldb.edit lets an append differ in it too); every other EditConfig field must match.
_MACHINE_FIELDS = frozenset({"compute_dtype"})
# Placeholder rows added (and deleted) at a time to move a database's next id up to a slice's first fact.
_ADVANCE_ROWS = 4096


class JobMismatchError(ValueError):
    """A database cannot continue (or be merged with) a job: other facts, hyperparameters, slice or model."""


def facts_fingerprint(facts: Sequence[Fact]) -> str:
    """SHA-256 of the facts' records (every field, extras included) in order: what identifies a job's facts, whatever
    file they were read from.

    Example::

        >>> from neuraldb.facts import Fact
        >>> len(facts_fingerprint([Fact("Rome", "{} is in", "France")]))
        64
    """
    h = hashlib.sha256()
    for f in facts:
        record = dataclasses.asdict(f)
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=repr).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def job_record(db: NeuralKVDatabase) -> dict | None:
    """The ``edit_job`` record of a database written by :func:`edit_checkpointed` (or :func:`merge_databases`), or
    None. Keys: ``facts`` (``n``, ``sha256`` and, from the command line, ``path`` and ``size``), ``start``, ``stop``,
    ``done`` (facts ``start..done-1`` are in the database, with those ids), ``checkpoint_every``."""
    job = (db.config or {}).get(JOB_KEY)
    return dict(job) if isinstance(job, dict) else None


def _short(sha: str) -> str:
    return sha[:12]


def _check_slice(n: int, start: int, stop: int | None) -> tuple[int, int]:
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"slice {start}:{stop} is not a non-empty part of the {n} facts (0 <= start < stop <= {n})")
    return start, stop


def _ids_match(db: NeuralKVDatabase, start: int, done: int) -> bool:
    return len(db) == done - start and db.ids() == list(range(start, done))


def _hparam_conflicts(fixed: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}={fixed.get(k)!r} (asked: {v!r})"
        for k, v in asked.items()
        if v is not None and k not in _MACHINE_FIELDS and fixed.get(k) != v
    ]


def check_resume(
    db: NeuralKVDatabase,
    facts: Sequence[Fact],
    *,
    path: str | Path = "the database",
    start: int = 0,
    stop: int | None = None,
    checkpoint_every: int | None = None,
    template: str | None = None,
    **asked: Any,
) -> dict:
    """The job record of ``db`` if :func:`edit_checkpointed` can continue it with these arguments, which it checks
    without a model (the command line calls it before loading one); :class:`JobMismatchError` naming ``path`` and
    the first difference otherwise. ``asked``: the hyperparameters given explicitly (``layer``, ``gamma``,
    :class:`EditConfig` fields; None means not given).

    Example::

        >>> check_resume(NeuralKVDatabase.load("cf.safetensors"), facts, layer=6)["done"]   # doctest: +SKIP
        4096
    """
    start, stop = _check_slice(len(facts), start, stop)
    job = job_record(db)
    if job is None:
        raise JobMismatchError(
            f"{path} was not written by a checkpointed edit (it has no job record); nothing to resume"
        )
    rec = job.get("facts") or {}
    n, sha = len(facts), facts_fingerprint(facts)
    if (rec.get("n"), rec.get("sha256")) != (n, sha):
        raise JobMismatchError(
            f"{path} was edited from other facts ({rec.get('n')} facts, sha256 {_short(str(rec.get('sha256')))}, "
            f"from {rec.get('path') or 'a list'}), not these ({n} facts, sha256 {_short(sha)}): "
            "resume with the same facts file and --limit"
        )
    if (job.get("start"), job.get("stop")) != (start, stop):
        raise JobMismatchError(
            f"{path} holds the job for slice {job.get('start')}:{job.get('stop')}, not {start}:{stop}"
        )
    if checkpoint_every is not None and checkpoint_every != job.get("checkpoint_every"):
        raise JobMismatchError(
            f"{path} was checkpointed every {job.get('checkpoint_every')} facts, not {checkpoint_every} "
            "(the chunks decide the batches, hence the results): resume with the same --checkpoint-every"
        )
    if not _ids_match(db, start, job.get("done", -1)):
        raise JobMismatchError(
            f"{path} does not hold exactly the facts {start}..{job.get('done')} of its job as ids "
            "(were facts deleted or appended after editing?)"
        )
    fixed = {**recorded(db.config, EditConfig.names()), "layer": db.layer, "gamma": db.gamma}
    conflicts = _hparam_conflicts(fixed, asked)
    if template is not None and db.template is not None and template != db.template:
        conflicts.append(f"template={db.template!r} (asked: {template!r})")
    if conflicts:
        raise JobMismatchError(f"{path} was edited with {', '.join(conflicts)}: resume with its hyperparameters")
    return job


def _advance_ids(db: NeuralKVDatabase, to: int) -> None:
    """Move ``db.next_id`` up to ``to`` with the public API only: add placeholder rows and delete them (ids are never
    reused, so the next fact added gets id ``to``)."""
    while db.next_id < to:
        m = min(_ADVANCE_ROWS, to - db.next_id)
        db.delete(db.add(torch.ones(m, db.key_dim), torch.zeros(m, db.value_dim)))


def edit_checkpointed(
    model,
    tok,
    facts: Sequence[Fact],
    path: str | Path,
    *,
    checkpoint_every: int | None = None,
    resume: bool = False,
    start: int = 0,
    stop: int | None = None,
    source: Mapping[str, Any] | None = None,
    layer: int | None = None,
    gamma: float | None = None,
    batch_size: int | None = None,
    template: str | None = None,
    progress: bool | Callable[[int], None] = True,
    on_flush: Callable[[NeuralKVDatabase, int], None] | None = None,
    stats: dict | None = None,
    **hparams,
) -> NeuralKVDatabase:
    """Edit ``facts[start:stop]`` into the database file ``path``, saving it every ``checkpoint_every`` facts.

    ``facts`` is the whole list (a job's fact indices and the database's ids are positions in it); ``source``
    (e.g. ``{"path": ..., "size": ...}``) is recorded with its fingerprint for the record's reader. Chunks end at the
    multiples of ``checkpoint_every`` (default 256), so slices whose boundaries are multiples of it merge into
    exactly the database of one job over their union (with ``warm_start`` off; see the module docstring).

    With ``resume``, an existing ``path`` is continued where its last checkpoint stopped (nothing is redone or
    duplicated); :class:`JobMismatchError` before any editing if it was edited from other facts, another slice,
    another ``checkpoint_every`` or other hyperparameters (those not given are taken from the database; the
    compute dtype is this machine's choice). A missing ``path`` starts the job. Without ``resume`` an existing
    ``path`` is a :class:`FileExistsError`.

    ``progress``: a bar over the slice (unit ``fact``) that advances as each fact finishes and shows the batch and
    step, or a callable given how many facts just finished.
    ``on_flush(db, done)`` runs after each checkpoint (facts ``start..done-1`` saved). ``stats``, if a dict, gets
    ``seconds`` (editing time of this call), ``n`` (facts edited by this call), ``resumed_at``.
    Other keyword arguments are :class:`EditConfig` fields, as for :func:`neuraldb.edit`.

    Example::

        >>> db = edit_checkpointed(model, tok, facts, "part0.safetensors", start=0, stop=5000)   # doctest: +SKIP
        >>> job_record(db)["done"]                                                               # doctest: +SKIP
        5000
    """
    from neuraldb.database import NeuralKVDatabase
    from neuraldb.editing import _as_facts, _dims, _template_for, edit, model_access

    facts = _as_facts(facts)
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every <= 0):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    start, stop = _check_slice(len(facts), start, stop)
    path = Path(path)
    identity = {"n": len(facts), "sha256": facts_fingerprint(facts), **dict(source or {})}
    if batch_size is not None:
        hparams["batch_size"] = batch_size
    asked = {"layer": layer, "gamma": gamma, **hparams}
    unknown = set(hparams) - EditConfig.names()
    if unknown:
        raise TypeError(f"unknown editing hyperparameters: {sorted(unknown)} (known: {sorted(EditConfig.names())})")

    db: NeuralKVDatabase | None = None
    done = start
    if path.exists():
        if not resume:
            raise FileExistsError(f"{path} exists: resume it (resume=True / --resume) or choose another path")
        db = NeuralKVDatabase.load(path)
        job = check_resume(
            db, facts, path=path, start=start, stop=stop, checkpoint_every=checkpoint_every, template=template, **asked
        )
        checkpoint_every, done = job["checkpoint_every"], job["done"]
        inherited = recorded(db.config, EditConfig.names() - _MACHINE_FIELDS)
        cfg = resolve(model, **{**inherited, "layer": db.layer, "gamma": db.gamma})
        template = db.template if template is None else template
    else:
        cfg = resolve(model, **asked)
    checkpoint_every = checkpoint_every or DEFAULT_CHECKPOINT_EVERY
    template = _template_for(tok, template)
    if cfg.layer is None:
        raise ValueError("layer is unknown for this model: pass layer=")
    if db is None:
        d1, d2 = _dims(model_access.handles(model, cfg.layer))
        db = NeuralKVDatabase(d1, d2)
        _advance_ids(db, start)
    job = {"facts": identity, "start": start, "stop": stop, "done": done, "checkpoint_every": checkpoint_every}
    per_chunk = {k: v for k, v in cfg.to_dict().items() if k not in ("layer", "gamma")}

    bar = fact_bar(stop - start, initial=done - start) if progress is True else None
    tick = bar if bar is not None else (progress if callable(progress) else False)
    stats = {} if stats is None else stats
    stats.update(resumed_at=done, n=0, seconds=0.0)
    try:
        while done < stop:
            end = min(stop, (done // checkpoint_every + 1) * checkpoint_every)
            t0 = time.perf_counter()
            db = edit(
                model, tok, facts[done:end], db=db, layer=cfg.layer, gamma=cfg.gamma, template=template,
                progress=tick, **per_chunk,
            )  # fmt: skip
            job["done"] = done = end
            db.config = {**db.config, JOB_KEY: dict(job)}
            db.save(path)
            stats["seconds"] += time.perf_counter() - t0
            stats["n"] = done - stats["resumed_at"]
            if on_flush is not None:
                on_flush(db, done)
    finally:
        if bar is not None:
            bar.close()
    return db


def _describe(name: str, job: dict) -> str:
    return f"{name} (facts {job['start']}:{job['done']})"


def merge_databases(
    dbs: Sequence[NeuralKVDatabase], *, names: Sequence[str] | None = None, allow_gaps: bool = False
) -> NeuralKVDatabase:
    """One database from the databases of checkpointed jobs over disjoint slices of the same facts, edited with the
    same model, layer, gamma, template and hyperparameters: its ids are the facts' global indices, in order.

    A job that stopped early contributes the facts it finished. :class:`JobMismatchError` (``names`` label the
    inputs in it) for a database without a job record, other facts, other metadata, overlapping slices, or facts
    that none holds (unless ``allow_gaps``: their ids are then simply absent).

    Example::

        >>> a, b = (NeuralKVDatabase.load(p) for p in ("part0.safetensors", "part1.safetensors"))  # doctest: +SKIP
        >>> merge_databases([a, b]).ids() == list(range(len(a) + len(b)))                       # doctest: +SKIP
        True
    """
    from neuraldb.database import NeuralKVDatabase

    if not dbs:
        raise ValueError("nothing to merge: give at least one database")
    names = list(names) if names is not None else [f"database {i}" for i in range(len(dbs))]
    jobs = []
    for name, db in zip(names, dbs):
        job = job_record(db)
        if job is None:
            raise JobMismatchError(f"{name} was not written by a checkpointed edit (it has no job record)")
        if not _ids_match(db, job["start"], job["done"]):
            raise JobMismatchError(f"{name} does not hold exactly the facts {job['start']}..{job['done']} of its job")
        jobs.append(job)
    first, first_job = dbs[0], jobs[0]

    def same(db: NeuralKVDatabase) -> dict:
        config = {k: v for k, v in (db.config or {}).items() if k != JOB_KEY and k not in _MACHINE_FIELDS}
        return {
            "facts": (db_job := job_record(db))["facts"].get("n"), "facts sha256": db_job["facts"].get("sha256"),
            "key_dim": db.key_dim, "value_dim": db.value_dim, "dtype": str(db.dtype), "layer": db.layer,
            "gamma": db.gamma, "template": db.template, "model": db.model_id, "module": db.module_path,
            "model identity": db.model_identity,
            **{f"config.{k}": v for k, v in sorted(config.items())},
        }  # fmt: skip

    ref = same(first)
    for name, db in zip(names[1:], dbs[1:]):
        got = same(db)
        diff = [k for k in ref.keys() | got.keys() if ref.get(k) != got.get(k)]
        if diff:
            k = min(diff)
            raise JobMismatchError(f"{name} differs from {names[0]} in {k}: {got.get(k)!r} vs {ref.get(k)!r}")
    order = sorted(range(len(dbs)), key=lambda i: (jobs[i]["start"], jobs[i]["done"]))
    n = first_job["facts"]["n"]
    covered = 0
    gaps = []
    for prev, i in zip([None, *order], order):
        job = jobs[i]
        if prev is not None and job["start"] < jobs[prev]["done"]:
            raise JobMismatchError(f"{_describe(names[prev], jobs[prev])} and {_describe(names[i], job)} overlap")
        if job["start"] > covered:
            gaps.append((covered, job["start"]))
        covered = max(covered, job["done"])
    if covered < n:
        gaps.append((covered, n))
    if gaps and not allow_gaps:
        shown = ", ".join(f"{a}:{b}" for a, b in gaps[:3]) + (" ..." if len(gaps) > 3 else "")
        raise JobMismatchError(
            f"facts {shown} are in none of the databases (--allow-gaps / allow_gaps=True merges anyway)"
        )

    out = NeuralKVDatabase(first.key_dim, first.value_dim, dtype=first.dtype)
    out.layer, out.gamma, out.template = first.layer, first.gamma, first.template
    out.model_id, out.module_path, out.model_identity = first.model_id, first.module_path, first.model_identity
    for i in order:
        db, job = dbs[i], jobs[i]
        if len(db) == 0:
            continue
        _advance_ids(out, job["start"])
        ids = db.ids()
        out.add(db.keys, db.values, facts=[db.fact(j) for j in ids])
    starts = [jobs[i]["start"] for i in order]
    steps = {j.get("checkpoint_every") for j in jobs}
    merged = {
        "facts": first_job["facts"], "start": min(starts), "stop": max(j["stop"] for j in jobs), "done": covered,
        "checkpoint_every": steps.pop() if len(steps) == 1 else None,
        "merged": [[jobs[i]["start"], jobs[i]["done"]] for i in order],
    }  # fmt: skip
    out.config = {**{k: v for k, v in (first.config or {}).items() if k != JOB_KEY}, JOB_KEY: merged}
    return out
