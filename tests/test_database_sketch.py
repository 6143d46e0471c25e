"""The int4 key sketch a NeuralKVDatabase keeps for the pre-filtered retrieval: absent until a CPU decode step needs
it (never loaded, freed by prefilter = False, dropped off the CPU); once built, in step with the keys through add,
growth, update, swap-remove delete, copies and moves; and retrieve_residuals equal to the plain retrieval."""

from __future__ import annotations

import copy
import pickle

import neuraldb.database
import neuraldb.database_storage
import pytest
import torch
from neuraldb import NeuralKVDatabase

import neuraldb_kernels
from neuraldb_kernels import build_signs, build_sketch

D1, D2 = 131, 6  # a tail group (131 = 2 x 64 + 3)


def _keys(n, seed):
    return torch.randn(n, D1, generator=torch.Generator().manual_seed(seed))


def _built(db):
    """``db`` with its sketch built, as the first qualifying retrieve_residuals call does (without needing the kernel)."""
    with db.lock:
        db._storage.ensure_sketch()
    return db


def _tensor_bytes(db):
    return sum(t.untyped_storage().nbytes() for t in vars(db._storage).values() if isinstance(t, torch.Tensor))


@pytest.fixture
def fake_accelerator(monkeypatch):
    """A device other than the CPU on a machine without one: "cuda" for the database's bookkeeping, while its buffers
    go to the meta device (shapes only)."""
    monkeypatch.setattr(neuraldb.database_storage, "moved", lambda buf, device: buf.to("meta"))
    return torch.device("cuda")


def assert_in_step(db):
    assert db.sketch is not None and db.sketch.shape[0] == len(db)
    assert torch.equal(db.sketch, build_sketch(db.keys)), "the sketch is not the sketch of the keys, row for row"
    assert torch.equal(db.signs, build_signs(db.keys)), "the 1-bit rows are not those of the keys, row for row"


def test_sketch_follows_every_change(tmp_path, fake_accelerator):
    db = NeuralKVDatabase(D1, D2)
    ids = db.add(_keys(40, 0), torch.randn(40, D2))  # grows 16 -> 64 rows
    assert db.sketch is None
    assert_in_step(_built(db))
    db.delete([ids[0], ids[5], ids[39], ids[17]])  # swap-removes: the last rows move into the holes
    assert_in_step(db)
    db.update([ids[3], ids[7]], keys=_keys(2, 1))
    db.update([ids[8]], residuals=torch.randn(1, D2))
    assert_in_step(db)
    db.add(_keys(30, 2), torch.randn(30, D2))  # grows 64 -> 128 rows, sketch included
    db.delete(db.ids()[::3])
    assert_in_step(db)
    path = tmp_path / "db.safetensors"
    db.save(path)
    loaded = NeuralKVDatabase.load(path)
    assert loaded.sketch is None
    assert torch.equal(_built(loaded).sketch, db.sketch)
    for other in (copy.deepcopy(db), pickle.loads(pickle.dumps(db)), db.to("cpu")):
        assert torch.equal(other.sketch, db.sketch)
    off_cpu = copy.deepcopy(db).to(fake_accelerator)
    assert off_cpu.sketch is None and off_cpu.signs is None
    db.prefilter = False
    assert db.sketch is None and db.signs is None
    db.prefilter = True
    assert db.sketch is None, "turning the pre-filter back on builds nothing until a decode step needs it"


def test_failed_update_leaves_the_sketch_alone():
    db = NeuralKVDatabase(D1, D2)
    ids = db.add(_keys(20, 3), torch.randn(20, D2))
    before = _built(db).sketch.clone()
    bad = _keys(2, 4)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError):
        db.update(ids[:2], keys=bad)
    with pytest.raises(KeyError):
        db.update([ids[0], 999], keys=_keys(2, 5))
    assert torch.equal(db.sketch, before)


def test_shard_appends_and_ordered_deletes_keep_the_sketch():
    shard = NeuralKVDatabase(D1, D2, ordered=True)
    k = _keys(30, 6)
    shard.stage_add(k[:15], torch.randn(15, D2), ids=range(0, 30, 2)).commit()
    shard.stage_delete([0, 10]).commit()
    assert shard.sketch is None
    _built(shard)
    rows = shard.stage_add(k[15:], torch.randn(15, D2), ids=range(30, 60, 2))  # grows 16 -> 32 rows, sketch included
    rows.commit()
    shard.stage_delete([2, 36, 58]).commit()
    assert shard.ids() == sorted(shard.ids())
    assert_in_step(shard)


def _prefiltered_calls(monkeypatch) -> list[tuple[torch.Size, bool]]:
    """Records (query shape, signs given) of every pre-filtered kernel call the database makes."""
    calls = []
    real = neuraldb_kernels.plan.gated_retrieval_unchecked

    def spy(queries, keys, values, gamma, backend, sketch=None, signs=None):
        if sketch is not None:
            calls.append((queries.shape, signs is not None))
        return real(queries, keys, values, gamma, backend, sketch, signs)

    monkeypatch.setattr(neuraldb_kernels.plan, "gated_retrieval_unchecked", spy)
    return calls


@pytest.mark.skipif("cpu" not in neuraldb_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")
def test_retrieve_residuals_is_the_plain_retrieval(monkeypatch):
    calls = _prefiltered_calls(monkeypatch)
    g = torch.Generator().manual_seed(7)
    db = NeuralKVDatabase(1536, 64)
    db.add(torch.randn(3000, 1536, generator=g), torch.randn(3000, 64, generator=g))
    assert len(db) >= db.PREFILTER_MIN_KEYS
    keys = db.keys.float()
    one = (keys[1234] * 3 + 0.2 * torch.randn(1536, generator=g) / 1536**0.5)[None]
    for q in (one, one[None], torch.randn(1, 1536, generator=g), torch.cat([one, keys[:2]])):
        for gamma in (0.65, 0.3, -0.2):
            expected = db.retrieve(q, gamma)[0]
            assert torch.equal(db.retrieve_residuals(q, gamma), expected)
            db.prefilter = False
            assert torch.equal(db.retrieve_residuals(q, gamma), expected)
            db.prefilter = True
            db.PREFILTER_SIGNS = False  # the int4 stage alone
            assert torch.equal(db.retrieve_residuals(q, gamma), expected)
            db.PREFILTER_SIGNS = True
            db.prefilter = False  # drops what the call above built
            db.prefilter = True
    assert db.sketch is None, "several query rows or prefilter = False build no sketch"
    assert db.retrieve_residuals(one, 0.65).abs().sum() > 0
    assert_in_step(db)
    # One query row: the sketch scan; three rows: the cascade where gamma allows its 1-bit stage (once per gamma
    # 0.65), else the plain op; prefilter off: the plain op.
    assert len(calls) == 3 * 3 * 2 + 1 + 1
    assert [(shape[0], signs) for shape, signs in calls if shape[0] > 1] == [(3, True)]


@pytest.mark.skipif("cpu" not in neuraldb_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")
def test_signs_only_where_gamma_is_high_enough(monkeypatch):
    calls = _prefiltered_calls(monkeypatch)
    db = NeuralKVDatabase(256, 8)
    db.add(torch.randn(1200, 256, generator=torch.Generator().manual_seed(9)), torch.randn(1200, 8))
    q = torch.randn(1, 256)
    for gamma in (db.PREFILTER_SIGNS_MIN_GAMMA, 0.9, db.PREFILTER_SIGNS_MIN_GAMMA - 0.01):
        assert torch.equal(db.retrieve_residuals(q, gamma), db.retrieve(q, gamma)[0])
    assert [signs for _, signs in calls] == [True, True, False]
    assert_in_step(db)


@pytest.mark.skipif("cpu" not in neuraldb_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")
def test_key_moved_by_a_delete_is_still_found():
    # After a swap-remove the last key lives in the deleted row: with a stale sketch row there it would be missed.
    g = torch.Generator().manual_seed(8)
    db = NeuralKVDatabase(256, 8)
    ids = db.add(torch.randn(1500, 256, generator=g), torch.randn(1500, 8, generator=g))
    last_key, last_residual, _ = db.get(ids[-1])
    db.retrieve_residuals(torch.randn(1, 256, generator=g), 0.9)  # builds the sketch before the delete
    assert db.sketch is not None
    db.delete([ids[0]])
    assert db.row(ids[-1]) == 0
    q = last_key.float()[None] * 2
    out = db.retrieve_residuals(q, 0.9)
    assert torch.equal(out[0], last_residual.float()) and torch.equal(out, db.retrieve(q, 0.9)[0])


@pytest.mark.skipif("cpu" not in neuraldb_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")
def test_batched_decode_takes_the_cascade_up_to_its_row_limit(monkeypatch):
    # Up to PREFILTER_SIGNS_MAX_ROWS rows at a gamma where the 1-bit stage applies, the cascade; one row more, or a
    # gamma below it, the plain op (the int4 stage alone serves a single row only). Same output every way.
    calls = _prefiltered_calls(monkeypatch)
    g = torch.Generator().manual_seed(12)
    db = NeuralKVDatabase(256, 8)
    db.add(torch.randn(1500, 256, generator=g), torch.randn(1500, 8, generator=g))
    n = db.PREFILTER_SIGNS_MAX_ROWS
    assert n > db.PREFILTER_MAX_ROWS
    q = torch.cat([db.keys[: n + 1].float() * 2, torch.randn(1, 256, generator=g)])  # gates open, and one closed
    for rows, gamma in ((n, 0.65), (n + 1, 0.65), (n, db.PREFILTER_SIGNS_MIN_GAMMA - 0.01), (2, 0.9)):
        x = q[-rows:]
        assert torch.equal(db.retrieve_residuals(x, gamma), db.retrieve(x, gamma)[0])
    assert [(shape[0], signs) for shape, signs in calls] == [(n, True), (2, True)]
    assert_in_step(db)


@pytest.mark.skipif("cpu" not in neuraldb_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")
def test_only_a_cpu_decode_step_builds_the_sketch(tmp_path):
    g = torch.Generator().manual_seed(9)
    db = NeuralKVDatabase(256, 8)
    db.add(torch.randn(1500, 256, generator=g), torch.randn(1500, 8, generator=g))
    one, three = torch.randn(1, 256, generator=g), torch.randn(3, 256, generator=g)
    db.retrieve(one, 0.5)
    db.retrieve_residuals(three, 0.5)
    db.retrieve_residuals(one, 0.5, backend="torch")
    db.prefilter = False
    db.retrieve_residuals(one, 0.5)
    db.prefilter = True
    assert db.sketch is None
    path = tmp_path / "db.safetensors"
    db.save(path)
    loaded = NeuralKVDatabase.load(path)
    assert loaded.sketch is None
    for d in (db, loaded):
        expected = d.retrieve(one, 0.5)[0]
        assert torch.equal(d.retrieve_residuals(one, 0.5), expected)
        assert_in_step(d)
        assert torch.equal(d.retrieve_residuals(one, 0.5), expected)
    small = NeuralKVDatabase(256, 8)
    small.add(torch.randn(500, 256, generator=g), torch.randn(500, 8, generator=g))
    small.retrieve_residuals(one, 0.5)
    assert small.sketch is None, f"fewer than PREFILTER_MIN_KEYS ({small.PREFILTER_MIN_KEYS}) keys use no sketch"


def test_a_database_never_decoded_on_cpu_allocates_no_sketch(tmp_path):
    g = torch.Generator().manual_seed(10)
    d1, d2 = 1536, 64
    db = NeuralKVDatabase(d1, d2)
    for _ in range(20):
        db.add(torch.randn(1000, d1, generator=g), torch.randn(1000, d2, generator=g))
    ids = db.ids()
    db.update(ids[:100], keys=torch.randn(100, d1, generator=g))
    db.delete(ids[::7])
    db.retrieve_residuals(torch.randn(8, d1, generator=g), 0.5)  # a prefill: several query rows
    db.retrieve(torch.randn(1, d1, generator=g), 0.5)
    path = tmp_path / "db.safetensors"
    db.save(path)
    for d in (db, NeuralKVDatabase.load(path)):
        assert d.sketch is None
        # fp16 keys and residuals, and a float32 gate threshold per row
        assert _tensor_bytes(d) == d.capacity * ((d1 + d2) * 2 + 4), "only the rows and thresholds are allocated"


@pytest.mark.parametrize("change", ["grow", "prefilter_off", "to_accelerator"])
def test_cached_views_do_not_keep_replaced_buffers_alive(change, fake_accelerator):
    # retrieve_residuals caches views of the live rows; a buffer the database replaces must not stay pinned by them.
    db = NeuralKVDatabase(256, 8)
    g = torch.Generator().manual_seed(3)
    db.add(torch.randn(1100, 256, generator=g), torch.randn(1100, 8, generator=g))
    db.retrieve_residuals(torch.randn(1, 256, generator=g), 0.7)
    assert db.sketch is not None
    s = db._storage
    old = {t.untyped_storage().data_ptr() for t in (s.keys_buf, s.values_buf, s.sketch_buf, s.signs_buf)}
    if change == "grow":
        db.add(torch.randn(db.capacity, 256, generator=g), torch.randn(db.capacity, 8, generator=g))
    elif change == "prefilter_off":
        db.prefilter = False
    else:
        db.to(fake_accelerator)
    cached = {t.untyped_storage().data_ptr() for t in db._storage.cached_views[1:] if t is not None and not t.is_meta}
    assert not cached & old


@pytest.mark.parametrize(
    "queries,gamma,exc,words",
    [
        (torch.randn(1, 255), 0.5, ValueError, ["queries", "(..., 256)"]),
        (torch.randn(1, 256).long(), 0.5, TypeError, ["queries", "int64"]),
        (torch.tensor(1.0), 0.5, ValueError, ["queries", "0-d"]),
        (torch.randn(1, 256, device="meta"), 0.5, ValueError, ["queries", "device"]),
        ([0.0] * 256, 0.5, TypeError, ["queries", "torch.Tensor"]),
        (torch.randn(1, 256), 1.5, ValueError, ["gamma"]),
    ],
)
def test_retrieve_residuals_checks_its_arguments(queries, gamma, exc, words):
    # The patch skips these checks (it owns its inputs); a direct call must still get a clear error.
    db = NeuralKVDatabase(256, 8)
    db.add(torch.randn(1200, 256), torch.randn(1200, 8))
    with pytest.raises(exc) as info:
        db.retrieve_residuals(queries, gamma)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert db.sketch is None, "a rejected call builds nothing"
