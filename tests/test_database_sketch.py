"""The int4 key sketch a NeuralKVDatabase keeps for the pre-filtered retrieval: in step with the keys through add,
growth, update, swap-remove delete, load, copies and moves; and retrieve_residuals equal to the plain retrieval."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from neuraldb import NeuralKVDatabase
from neuraldb.sharded import _Shard

import neuraldb_kernels
from neuraldb_kernels import build_sketch

D1, D2 = 131, 6  # a tail group (131 = 2 x 64 + 3)


def _keys(n, seed):
    return torch.randn(n, D1, generator=torch.Generator().manual_seed(seed))


def assert_in_step(db):
    assert db.sketch.shape[0] == len(db)
    assert torch.equal(db.sketch, build_sketch(db.keys)), "the sketch is not the sketch of the keys, row for row"


def test_sketch_follows_every_change(tmp_path):
    db = NeuralKVDatabase(D1, D2)
    ids = db.add(_keys(40, 0), torch.randn(40, D2))  # grows 16 -> 64 rows
    assert_in_step(db)
    db.delete([ids[0], ids[5], ids[39], ids[17]])  # swap-removes: the last rows move into the holes
    assert_in_step(db)
    db.update([ids[3], ids[7]], keys=_keys(2, 1))
    db.update([ids[8]], residuals=torch.randn(1, D2))
    assert_in_step(db)
    db.add(_keys(30, 2), torch.randn(30, D2))
    db.delete(db.ids()[::3])
    assert_in_step(db)
    path = tmp_path / "db.safetensors"
    db.save(path)
    loaded = NeuralKVDatabase.load(path)
    assert_in_step(loaded)
    assert torch.equal(loaded.sketch, db.sketch)
    for other in (copy.deepcopy(db), pickle.loads(pickle.dumps(db)), db.to("cpu")):
        assert torch.equal(other.sketch, db.sketch)


def test_failed_update_leaves_the_sketch_alone():
    db = NeuralKVDatabase(D1, D2)
    ids = db.add(_keys(20, 3), torch.randn(20, D2))
    before = db.sketch.clone()
    bad = _keys(2, 4)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError):
        db.update(ids[:2], keys=bad)
    with pytest.raises(KeyError):
        db.update([ids[0], 999], keys=_keys(2, 5))
    assert torch.equal(db.sketch, before)


def test_shard_appends_and_ordered_deletes_keep_the_sketch():
    shard = _Shard(D1, D2)
    k = torch.nn.functional.normalize(_keys(30, 6), dim=1).half()
    shard._append(list(range(0, 60, 2)), k, torch.randn(30, D2).half(), [None] * 30)
    shard._delete_ordered([0, 10, 58])
    assert_in_step(shard)


def _counting(monkeypatch):
    calls = []
    real = neuraldb_kernels.gated_retrieval_prefiltered

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(neuraldb_kernels, "gated_retrieval_prefiltered", spy)
    return calls


@pytest.mark.skipif("cpu" not in neuraldb_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")
def test_retrieve_residuals_is_the_plain_retrieval(monkeypatch):
    calls = _counting(monkeypatch)
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
    assert db.retrieve_residuals(one, 0.65).abs().sum() > 0
    # One query row: the sketch scan; three rows, or prefilter off: the plain op.
    assert len(calls) == 3 * 3 + 1


@pytest.mark.skipif("cpu" not in neuraldb_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")
def test_key_moved_by_a_delete_is_still_found():
    # After a swap-remove the last key lives in the deleted row: with a stale sketch row there it would be missed.
    g = torch.Generator().manual_seed(8)
    db = NeuralKVDatabase(256, 8)
    ids = db.add(torch.randn(1500, 256, generator=g), torch.randn(1500, 8, generator=g))
    last_key, last_residual, _ = db.get(ids[-1])
    db.delete([ids[0]])
    assert db.row(ids[-1]) == 0
    q = last_key.float()[None] * 2
    out = db.retrieve_residuals(q, 0.9)
    assert torch.equal(out[0], last_residual.float()) and torch.equal(out, db.retrieve(q, 0.9)[0])
