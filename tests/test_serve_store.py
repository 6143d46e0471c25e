"""The server's fact store without HTTP: an accepted job survives a server that dies before editing it (the journal
is replayed at the next start), ids are never given twice, and a failed job changes nothing."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from _tiny_editing import FACTS
from neuraldb import NeuralKVDatabase
from neuraldb.calibration import DatabaseChangedError
from neuraldb.serve.store import FactStore, journal_path


def _editor(calls):
    def run(facts):
        calls.append(len(facts))
        return torch.randn(len(facts), 8), torch.randn(len(facts), 4)

    return run


def _saved_store(tmp_path, rows: int) -> tuple[FactStore, object]:
    """A store over a saved database of ``rows`` of FACTS, and its path."""
    path = tmp_path / "facts.safetensors"
    db = NeuralKVDatabase(8, 4)
    db.add(torch.randn(rows, 8), torch.randn(rows, 4), FACTS[:rows])
    db.save(path)
    return FactStore(NeuralKVDatabase.load(path), path, _editor([])), path


def _thresholds_settled(job, timeout: float = 30) -> str | None:
    deadline = time.time() + timeout
    while job.thresholds in (None, "pending") and time.time() < deadline:
        time.sleep(0.01)
    return job.thresholds


def test_journal_replays_a_job_the_dead_server_never_edited(tmp_path):
    path = tmp_path / "facts.safetensors"
    NeuralKVDatabase(8, 4).save(path)
    release = threading.Event()

    def stuck(facts):  # the first server "dies" while editing: it never adds the rows
        release.wait(30)
        raise RuntimeError("killed")

    first = FactStore(NeuralKVDatabase.load(path), path, stuck)
    job = first.submit(FACTS[:2])  # acknowledged: in the journal, fsynced
    assert job.fact_ids == [0, 1] and journal_path(path).stat().st_size > 0
    calls: list[int] = []
    db = NeuralKVDatabase.load(path)
    second = FactStore(db, path, _editor(calls))
    [replayed] = [second.job(1)]
    assert replayed.fact_ids == [0, 1] and replayed.done.wait(30) and replayed.status == "succeeded"
    assert calls == [2] and db.ids() == [0, 1] and [db.fact(i) for i in db.ids()] == FACTS[:2]
    assert NeuralKVDatabase.load(path).ids() == [0, 1]
    assert journal_path(path).read_text() == '{"next_id": 2}\n'  # no job left to replay
    third = second.submit(FACTS[2:3])
    assert third.fact_ids == [2] and third.done.wait(30)
    second.close()
    release.set()
    first.close()


def test_failed_job_changes_nothing_and_its_ids_stay_unused(tmp_path):
    path = tmp_path / "facts.safetensors"
    NeuralKVDatabase(8, 4).save(path)

    def broken(facts):
        raise ValueError("no")

    db = NeuralKVDatabase.load(path)
    store = FactStore(db, path, broken)
    job = store.submit(FACTS[:1])
    assert job.done.wait(30) and job.status == "failed" and "no" in job.error
    assert len(db) == 0 and NeuralKVDatabase.load(path).next_id == 0
    store.close()
    calls: list[int] = []
    store = FactStore(NeuralKVDatabase.load(path), path, _editor(calls))
    assert store.job(1) is None  # the failed job is not replayed
    assert store.submit(FACTS[1:2]).fact_ids == [1]
    store.close()


def test_delete_whose_save_fails_is_replayed_from_the_journal(tmp_path, monkeypatch):
    store, path = _saved_store(tmp_path, 3)

    def full_disk(self, p):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NeuralKVDatabase, "save", full_disk)
    store.delete(1)  # acknowledged: the journal holds it although the database file could not be written
    assert store.db.ids() == [0, 2]
    job = store.submit(FACTS[3:4])  # a later job fails to save too; the journal must keep the delete
    assert job.done.wait(30) and job.status == "failed"
    store.close()
    monkeypatch.undo()
    assert NeuralKVDatabase.load(path).ids() == [0, 1, 2]  # the file missed the delete ...
    again = FactStore(NeuralKVDatabase.load(path), path, _editor([]))
    assert again.db.ids() == [0, 2] and NeuralKVDatabase.load(path).ids() == [0, 2]  # ... the restart applied it
    again.close()


def test_delete_that_cannot_reach_the_journal_changes_nothing(tmp_path, monkeypatch):
    store, path = _saved_store(tmp_path, 2)

    def broken(record):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "_append", broken)
    with pytest.raises(OSError):
        store.delete(0)
    assert store.db.ids() == [0, 1] and NeuralKVDatabase.load(path).ids() == [0, 1]
    store.close()


def test_thresholds_are_fitted_once_for_the_jobs_that_finished_and_saved(tmp_path):
    path = tmp_path / "facts.safetensors"
    NeuralKVDatabase(8, 4).save(path)
    db = NeuralKVDatabase.load(path)
    gate = threading.Event()
    passes: list[list[int]] = []

    def slow_editor(facts):
        gate.wait(30)
        return torch.randn(len(facts), 8), torch.randn(len(facts), 4)

    def calibrator():  # what calibrate does: a threshold for every row, from all of them
        passes.append(db.ids())
        db.set_thresholds(db.ids(), [0.9] * len(db))

    store = FactStore(db, path, slow_editor, calibrator)
    first, second = store.submit(FACTS[:1]), store.submit(FACTS[1:3])
    gate.set()
    assert first.done.wait(30) and second.done.wait(30) and _thresholds_settled(second) == "fitted"
    assert first.thresholds == second.thresholds == "fitted" and first.to_json()["thresholds"] == "fitted"
    assert passes == [[0, 1, 2]]  # the second job was queued when the first finished: one pass for both
    assert NeuralKVDatabase.load(path).thresholds.tolist() == pytest.approx([0.9] * 3)  # saved after fitting
    store.close()


def test_a_pass_overtaken_by_a_delete_runs_again_and_a_failed_one_is_reported(tmp_path):
    db = NeuralKVDatabase(8, 4)
    calls = []

    def overtaken():
        calls.append(1)
        if len(calls) == 1:
            raise DatabaseChangedError("db changed while it was being calibrated; calibrate again")

    store = FactStore(db, None, _editor([]), overtaken)
    job = store.submit(FACTS[:1])
    assert _thresholds_settled(job) == "fitted" and len(calls) == 2
    store.close()

    def broken():
        raise ValueError("no layer")

    store = FactStore(NeuralKVDatabase(8, 4), None, _editor([]), broken)
    job = store.submit(FACTS[:1])
    assert _thresholds_settled(job) == "failed: ValueError: no layer" and job.status == "succeeded"
    store.close()
