"""The server's facts: the live database, its file, the jobs that edit new facts in, and their journal.

Durability. Every change is on disk before the server acknowledges it:

- a delete is appended to the journal (fsynced), then applied and the database saved (:meth:`NeuralKVDatabase.save`,
  an atomic replace) before the answer. When that save fails the delete is still acknowledged: the journal holds it,
  the next successful save or the next start applies it, and the journal is not compacted until a save succeeds;
- an add is acknowledged as a *job* once its facts and the ids reserved for them are appended to a journal beside
  the database (``DB.jobs.jsonl``, fsynced) -- editing takes seconds, and a client must not wait for it to know its
  facts will be there. The edit worker adds the rows under those ids and saves the database; a server killed before
  that finds the job in the journal at the next start and edits it again. A job is done when the database's
  ``next_id`` has passed its ids (ids are only ever added in increasing order), so replaying is idempotent.

Gate thresholds. A database that ``neuraldb edit`` builds has per-row gate thresholds fitted from its facts
(:func:`neuraldb.calibration.calibrate` without text). With a calibrator, the worker fits them again once the queued
jobs are in -- one pass for however many jobs finished meanwhile, since every row's threshold depends on every other
fact -- and saves the database; a job's facts answer from the moment they are added, their thresholds follow
(``job.thresholds``: "pending", then "fitted"). A pass that a delete overtakes is run again.

Ids are reserved when a job is accepted, so the answer to ``POST /v1/facts`` can name them; a failed job's ids are
never used. Once no job is pending and the file holds every delete, the journal is replaced (atomically) by one line,
the next id to give. Without a database file the server keeps its facts in memory, and "on disk" does not apply.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuraldb.atomic import atomic_path
from neuraldb.facts import Fact, to_record

if TYPE_CHECKING:
    import torch

    from neuraldb.database import NeuralKVDatabase

__all__ = ["FactStore", "Job", "PendingFactError", "UnknownFactError", "journal_path"]

# computes (keys, residuals) for facts, in their order
Editor = Callable[[Sequence[Fact]], tuple["torch.Tensor", "torch.Tensor"]]
# fits the database's gate thresholds in place (calibration.DatabaseChangedError when it changed meanwhile)
Calibrator = Callable[[], object]


class UnknownFactError(KeyError):
    """No fact with this id in the database."""


class PendingFactError(ValueError):
    """The fact is still being edited in; it can be deleted once its job has finished."""


@dataclass
class Job:
    """One accepted ``POST /v1/facts``: its facts, the ids reserved for them and where editing stands."""

    id: int
    fact_ids: list[int]
    facts: list[Fact]
    status: str = "queued"  # queued -> running -> succeeded | failed
    error: str | None = None
    thresholds: str | None = None  # with a calibrator: pending -> fitted | failed: ...
    created: float = field(default_factory=time.time)
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The job as the API shows it."""
        return {
            "id": self.id,
            "object": "neuraldb.job",
            "status": self.status,
            "fact_ids": list(self.fact_ids),
            "error": self.error,
            "thresholds": self.thresholds,
            "created": self.created,
            "finished": self.finished,
        }


def journal_path(db_path: Path) -> Path:
    """Where the jobs journal of the database file ``db_path`` lives: beside it, ``NAME.jobs.jsonl``."""
    return db_path.with_name(db_path.name + ".jobs.jsonl")


class FactStore:
    """The served database with durable writes and a background edit worker.

    Args:
        db: the database the served model is patched with (its lock orders writes against forwards).
        path: its file, or None to keep facts in memory only. Jobs left in the journal are queued again.
        editor: computes ``(keys, residuals)`` for facts; :func:`editor_for` builds the usual one on
            :func:`neuraldb.edit`.
        calibrator: None, or fits ``db``'s gate thresholds in place once jobs are in (see the module docstring;
            :func:`editor_for` builds the usual one).
    """

    def __init__(
        self, db: NeuralKVDatabase, path: Path | None, editor: Editor, calibrator: Calibrator | None = None
    ) -> None:
        self.db = db
        self.path = path
        self.editor = editor
        self.calibrator = calibrator
        self._uncalibrated: list[Job] = []  # succeeded jobs whose thresholds are still to fit
        self.journal = journal_path(path) if path is not None else None
        self._lock = threading.Lock()  # orders reservations, journal appends and saves
        self._jobs: dict[int, Job] = {}
        self._pending: dict[int, Job] = {}  # fact id -> its unfinished job
        self._next_job = 1
        self._next_id = db.next_id
        self._wake = threading.Condition(self._lock)
        self._queue: list[Job] = []
        self._closing = False
        self._unsaved = False  # memory holds deletes the file lacks (their journal lines must stay)
        if self.journal is not None:
            self._replay()
        self._thread = threading.Thread(target=self._loop, name="neuraldb-edit", daemon=True)
        self._thread.start()

    # -- reads ---------------------------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        """The job ``job_id`` (this server's run only), or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def pending_facts(self) -> list[tuple[int, Fact]]:
        """``(id, fact)`` of the facts accepted but not yet edited in, by id."""
        with self._lock:
            return [(i, job.facts[i - job.fact_ids[0]]) for i, job in sorted(self._pending.items())]

    # -- writes --------------------------------------------------------------------------------------------------

    def submit(self, facts: Sequence[Fact]) -> Job:
        """Accept ``facts``: reserve their ids, write the job to the journal (fsynced), queue it. The job is durable
        when this returns."""
        if not facts:
            raise ValueError("facts must hold at least one fact")
        with self._lock:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            ids = list(range(self._next_id, self._next_id + len(facts)))
            job = Job(self._next_job, ids, list(facts))
            if self.journal is not None:
                self._append({"job": job.id, "ids": ids, "facts": [to_record(f) for f in facts]})
            self._next_id += len(facts)
            self._next_job += 1
            self._jobs[job.id] = job
            self._pending.update(dict.fromkeys(ids, job))
            self._queue.append(job)
            self._wake.notify()
            return job

    def delete(self, fact_id: int) -> None:
        """Delete ``fact_id``: durable (in the journal, fsynced) before it is applied and before this returns.

        Raises UnknownFactError when no such fact exists, PendingFactError while it is still being edited in, and
        OSError when the journal cannot be written (nothing changed then). A database save that fails after the
        journal write is not an error: the journal replays the delete (see the module's docstring).
        """
        with self._lock:
            job = self._pending.get(fact_id)
            if job is not None:
                raise PendingFactError(
                    f"fact {fact_id} is still being edited in (job {job.id}); delete it once the job has finished"
                )
            if fact_id not in self.db:
                raise UnknownFactError(fact_id)
            if self.journal is not None:
                self._append({"delete": fact_id})
            self.db.delete([fact_id])
            self._unsaved = True
            with contextlib.suppress(OSError):
                self._save()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the edit worker once the job it is running has finished (queued jobs stay in the journal)."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._uncalibrated and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                if not self._queue:  # every queued job is in: one calibration for all of them
                    self._calibrate()
                    continue
                job = self._queue.pop(0)
                job.status = "running"
            self._run(job)

    def _calibrate(self) -> None:
        """Fit the thresholds for ``_uncalibrated`` (called with the lock held; released while fitting)."""
        from neuraldb.database_state import DatabaseChangedError

        assert self.calibrator is not None
        jobs, self._uncalibrated = self._uncalibrated, []
        self._lock.release()
        try:
            self.calibrator()
            outcome = "fitted"
        except DatabaseChangedError:
            outcome = "again"
        except Exception as e:  # noqa: BLE001 -- the facts are in; only their thresholds are missing
            outcome = f"failed: {type(e).__name__}: {e}"
        finally:
            self._lock.acquire()
        if outcome == "again":  # a delete came between reading the rows and setting the thresholds
            self._uncalibrated = jobs + self._uncalibrated
            return
        if outcome == "fitted":
            try:
                self._save()
            except OSError as e:
                outcome = f"failed: the database could not be saved ({e})"
        for job in jobs:
            job.thresholds = outcome

    def _run(self, job: Job) -> None:
        try:
            keys, residuals = self.editor(job.facts)
            with self._lock:
                self.db.stage_add(keys, residuals, job.facts, ids=job.fact_ids).commit()
                self._save()
                job.status = "succeeded"
                if self.calibrator is not None:
                    job.thresholds = "pending"
                    self._uncalibrated.append(job)
                self._finish(job)
        except Exception as e:  # noqa: BLE001 -- any failure fails the job; the worker goes on
            with self._lock:
                job.status, job.error = "failed", f"{type(e).__name__}: {e}"
                if job.fact_ids and job.fact_ids[0] in self.db:  # added but not saved: not acknowledged, undo
                    self.db.delete(job.fact_ids)
                if self.journal is not None:
                    try:
                        self._append({"job": job.id, "failed": job.error})
                    except OSError:
                        pass  # replayed at the next start, which is the safe side
                self._finish(job)

    def _finish(self, job: Job) -> None:
        job.finished = time.time()
        for i in job.fact_ids:
            self._pending.pop(i, None)
        if not self._pending and not self._unsaved and self.journal is not None and self.journal.exists():
            # Every job is in the database (or failed): nothing to replay. Only the next id to give is kept, so that
            # a failed job's ids, which its client was told, never name another fact after a restart.
            with atomic_path(self.journal) as tmp:
                tmp.write_text(json.dumps({"next_id": self._next_id}) + "\n", encoding="utf-8")
        job.done.set()

    # -- files ---------------------------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.path is not None:
            self.db.save(self.path)
            self._unsaved = False

    def _append(self, record: dict[str, Any]) -> None:
        assert self.journal is not None
        line = json.dumps(record, ensure_ascii=False) + "\n"
        fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _replay(self) -> None:
        assert self.journal is not None
        if not self.journal.exists():
            return
        jobs: dict[int, dict] = {}
        failed: set[int] = set()
        deleted: list[int] = []
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill: its job was never acknowledged
            if not isinstance(rec, dict):
                continue
            if "next_id" in rec:
                self._next_id = max(self._next_id, int(rec["next_id"]))
            elif "delete" in rec:
                deleted.append(int(rec["delete"]))
            elif "failed" in rec:
                failed.add(rec["job"])
            elif "ids" in rec:
                jobs[rec["job"]] = rec
        gone = [i for i in dict.fromkeys(deleted) if i in self.db]  # ids are never reused: a stale line is harmless
        if gone:
            self.db.delete(gone)
            self._unsaved = True
            with contextlib.suppress(OSError):
                self._save()
        from neuraldb.facts import parse

        for rec in jobs.values():  # a failed job's ids are never given to another fact either
            self._next_id = max(self._next_id, rec["ids"][-1] + 1 if rec["ids"] else 0)
        for number in sorted(jobs):
            rec = jobs[number]
            if number in failed or not rec["ids"] or rec["ids"][-1] < self.db.next_id:
                continue
            facts = parse(rec["facts"], format="neuraldb", on_invalid="error")
            job = Job(self._next_job, list(rec["ids"]), facts)
            self._next_job += 1
            self._jobs[job.id] = job
            self._pending.update(dict.fromkeys(job.fact_ids, job))
            self._queue.append(job)


def editor_for(
    model: torch.nn.Module,
    tok: Any,
    db: NeuralKVDatabase,
    *,
    on_copy: bool = True,
    lock: threading.Lock | None = None,
    **hparams: Any,
) -> tuple[Editor, Calibrator]:
    """The usual editor and calibrator: :func:`neuraldb.edit` with ``db``'s layer, template, gamma and editing
    config (``hparams`` override them), and :func:`neuraldb.gate_fit.fit_defaults` of ``db`` (thresholds from its
    facts alone and the subject gate, as ``neuraldb edit`` fits them). Both run on a copy of ``model`` when ``on_copy`` (so generation goes on while a
    fact is edited) or on ``model`` itself, holding ``lock`` (which the generation worker holds around its forwards:
    editing turns the patch off and may swap the weights' dtype, and both hook the edited layer). ``model`` must not
    be patched yet when ``on_copy``."""
    from neuraldb.database import NeuralKVDatabase
    from neuraldb.editing import edit
    from neuraldb.gate_fit import fit_defaults

    editing_model = copy.deepcopy(model) if on_copy else model
    editing_tok = copy.deepcopy(tok)  # a fast tokenizer is not safe to use from two threads at once

    def holding() -> contextlib.AbstractContextManager:
        return lock if lock is not None and not on_copy else contextlib.nullcontext()

    def run(facts: Sequence[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        scratch = NeuralKVDatabase(db.key_dim, db.value_dim, dtype=db.dtype)
        scratch.layer, scratch.template, scratch.gamma = db.layer, db.template, db.gamma
        scratch.config = dict(db.config or {})
        with holding():
            edit(editing_model, editing_tok, list(facts), db=scratch, progress=False, **hparams)
        if not db.config and scratch.config:
            db.config = dict(scratch.config)  # a new database records the config its first facts were edited with
        return scratch.keys.clone(), scratch.values.clone()

    def fit() -> None:
        with holding():
            fit_defaults(editing_model, editing_tok, db)

    return run, fit
