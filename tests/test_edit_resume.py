"""Checkpointed editing jobs: a killed job resumes to exactly the database an uninterrupted job gives, a resume with
other facts or hyperparameters is refused, and the databases of disjoint slices merge into the whole job's."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _tiny_editing import FACTS
from neuraldb import NeuralKVDatabase
from neuraldb.editing import JobMismatchError, edit_checkpointed, job_record, merge_databases
from neuraldb.facts import Fact

pytestmark = pytest.mark.usefixtures("neuraldb_cache")

# Ten facts from the tiny tokenizer's words; with EVERY = 4 the job's chunks are 0:4, 4:8, 8:10.
JOB_FACTS = [Fact(f.subject, f.prompt, t, target_true=f.target_true) for f in FACTS for t in (f.target_new, "piano")]
EVERY = 4
HP = {"layer": 1, "gamma": 0.6, "batch_size": 2, "n_prefixes": 1, "prefix_len": 2, "steps": 2, "seed": 0}


@pytest.fixture(autouse=True)
def one_thread():
    # a subprocess and this process must compute the same bits: the same thread count on both sides
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _job(tiny, path, facts=JOB_FACTS, **kw):
    model, tok = tiny
    return edit_checkpointed(
        model, tok, facts, path, checkpoint_every=kw.pop("every", EVERY), progress=False, **HP | kw
    )


@pytest.fixture
def reference(tiny, tmp_path):
    """The database of one uninterrupted job over all the facts."""
    _job(tiny, tmp_path / "ref.safetensors")
    return NeuralKVDatabase.load(tmp_path / "ref.safetensors")


def assert_same(db: NeuralKVDatabase, ref: NeuralKVDatabase) -> None:
    assert db.ids() == ref.ids() and db.next_id == ref.next_id
    assert torch.equal(db.keys, ref.keys) and torch.equal(db.values, ref.values)  # bitwise
    assert [db.fact(i) for i in db.ids()] == [ref.fact(i) for i in ref.ids()]
    assert (db.layer, db.gamma, db.template, db.model_id) == (ref.layer, ref.gamma, ref.template, ref.model_id)
    assert {k: v for k, v in db.config.items() if k != "edit_job"} == {
        k: v for k, v in ref.config.items() if k != "edit_job"
    }
    a, b = job_record(db), job_record(ref)
    assert (a["start"], a["done"], a["facts"]) == (b["start"], b["done"], b["facts"])


class Killed(Exception):
    pass


def test_a_job_stopped_after_a_flush_resumes_without_redoing_a_fact(tiny, tmp_path, reference):
    path = tmp_path / "job.safetensors"
    flushes = []

    def stop_after_first(db, done):
        flushes.append(done)
        raise Killed

    with pytest.raises(Killed):
        _job(tiny, path, on_flush=stop_after_first)
    assert flushes == [4] and job_record(NeuralKVDatabase.load(path))["done"] == 4
    stats: dict = {}
    seen: list[int] = []
    _job(tiny, path, resume=True, stats=stats, on_flush=lambda db, done: seen.append(done))
    assert (stats["resumed_at"], stats["n"], seen) == (4, 6, [8, 10])  # only the unfinished facts, chunk by chunk
    db = NeuralKVDatabase.load(path)
    assert_same(db, reference)
    assert job_record(db)["done"] == 10
    # a finished job resumes to itself without editing anything
    stats = {}
    _job(tiny, path, resume=True, stats=stats)
    assert stats["n"] == 0 and NeuralKVDatabase.load(path).ids() == list(range(10))


_KILLED_JOB = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from _tiny_editing import word_llama
from test_edit_resume import EVERY, HP, JOB_FACTS
from neuraldb.editing import edit_checkpointed
batches = []
def tick(n):
    batches.append(n)
    if len(batches) == 3:  # the first batch of the second chunk is done, its second one not: kill -9 mid-chunk
        os.kill(os.getpid(), signal.SIGKILL)
edit_checkpointed(*word_llama(), JOB_FACTS, {path!r}, checkpoint_every=EVERY, progress=tick, **HP)
"""


def test_a_job_killed_mid_chunk_loses_only_that_chunk(tiny, tmp_path, reference):
    path = tmp_path / "job.safetensors"
    script = _KILLED_JOB.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = NeuralKVDatabase.load(path)
    assert killed.ids() == [0, 1, 2, 3] and job_record(killed)["done"] == 4
    stats: dict = {}
    _job(tiny, path, resume=True, stats=stats)
    assert stats["n"] == 6
    assert_same(NeuralKVDatabase.load(path), reference)


def test_resume_refuses_other_facts_slices_and_hyperparameters(tiny, tmp_path):
    path = tmp_path / "job.safetensors"

    def stop(db, done):
        raise Killed

    with pytest.raises(Killed):
        _job(tiny, path, on_flush=stop)
    before = path.read_bytes()
    refused = [
        ({"facts": JOB_FACTS[::-1]}, "was edited from other facts (10 facts, sha256"),
        ({"facts": JOB_FACTS[:9]}, "was edited from other facts"),
        ({"lr": 0.1}, "was edited with lr="),
        ({"gamma": 0.7}, "was edited with gamma=0.6 (asked: 0.7)"),
        ({"every": 2}, "was checkpointed every 4 facts, not 2"),
        ({"stop": 8}, "holds the job for slice 0:10, not 0:8"),
    ]
    for kw, message in refused:
        with pytest.raises(JobMismatchError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _job(tiny, path, resume=True, **kw)
    with pytest.raises(FileExistsError, match="resume"):
        _job(tiny, path)
    assert path.read_bytes() == before  # nothing was edited or saved


def test_merged_slices_equal_one_job_over_all_facts(tiny, tmp_path, reference):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _job(tiny, b, start=4)  # 4:10, given in reverse order to the merge
    _job(tiny, a, stop=4)
    part = NeuralKVDatabase.load(b)
    assert part.ids() == list(range(4, 10))  # a slice's ids are its facts' indices
    merged = merge_databases([part, NeuralKVDatabase.load(a)], names=["b", "a"])
    assert_same(merged, reference)
    merged.save(tmp_path / "m.safetensors")
    assert_same(NeuralKVDatabase.load(tmp_path / "m.safetensors"), reference)


def test_merge_refusals(tiny, tmp_path):
    paths = {}
    for name, kw in {"0:4": {"stop": 4}, "2:6": {"start": 2, "stop": 6}, "8:": {"start": 8}}.items():
        paths[name] = tmp_path / f"{name.replace(':', '_')}.safetensors"
        _job(tiny, paths[name], **kw)
    dbs = {k: NeuralKVDatabase.load(p) for k, p in paths.items()}
    with pytest.raises(JobMismatchError, match=r"0:4 \(facts 0:4\) and 2:6 \(facts 2:6\) overlap"):
        merge_databases([dbs["0:4"], dbs["2:6"]], names=["0:4", "2:6"])
    with pytest.raises(JobMismatchError, match=r"facts 4:8 are in none of the databases \(--allow-gaps"):
        merge_databases([dbs["0:4"], dbs["8:"]])
    gappy = merge_databases([dbs["8:"], dbs["0:4"]], allow_gaps=True)
    assert gappy.ids() == [0, 1, 2, 3, 8, 9]
    assert torch.equal(gappy.get(8)[1], dbs["8:"].get(8)[1])

    other = tmp_path / "other.safetensors"
    _job(tiny, other, start=4, stop=8, gamma=0.7)
    with pytest.raises(JobMismatchError, match=r"other differs from 0:4 in gamma: 0.7 vs 0.6"):
        merge_databases([dbs["0:4"], NeuralKVDatabase.load(other)], names=["0:4", "other"])
    plain = NeuralKVDatabase(dbs["0:4"].key_dim, dbs["0:4"].value_dim)
    with pytest.raises(JobMismatchError, match="plain was not written by a checkpointed edit"):
        merge_databases([dbs["0:4"], plain], names=["0:4", "plain"])
