"""Per-row gate thresholds in the database: every write keeps them with their rows, files keep them, bad input
changes nothing, and retrieval (direct, the sketch path, a patched model's eager plan) enforces them."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import logits_and_down_proj_inputs, prompt, tiny_model
from neuraldb import NeuralKVDatabase, patch_model
from neuraldb.database_state import DatabaseState, check_state
from safetensors import safe_open

D1, D2 = 64, 8


def _db(n=40, ordered=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    db = NeuralKVDatabase(D1, D2, ordered=ordered)
    keys = torch.nn.functional.normalize(torch.randn(n, D1, generator=g), dim=1)
    ids = db.add(keys, torch.randn(n, D2, generator=g))
    return db, ids, keys


def _by_id(db):
    return dict(zip(db.ids(), db.thresholds.tolist()))


def test_new_rows_have_no_threshold_and_add_can_give_them():
    db, _, keys = _db(4)
    assert db.thresholds.tolist() == [-1.0] * 4
    new = db.add(keys[:2], torch.zeros(2, D2), thresholds=[0.5, 0.75])
    assert [_by_id(db)[i] for i in new] == [0.5, 0.75]
    new = db.add(keys[:3], torch.zeros(3, D2), thresholds=0.25)
    assert [_by_id(db)[i] for i in new] == [0.25] * 3


def test_select_rows_keeps_each_rows_threshold_and_refuses_bad_positions():
    db, ids, _ = _db(6)
    db.set_thresholds(ids, [0.1 * i for i in range(6)])
    state = db.state()
    sub = NeuralKVDatabase.from_state(state.select_rows([4, 1]))
    assert sub.ids() == [ids[4], ids[1]] and sub.next_id == db.next_id
    assert sub.thresholds.tolist() == pytest.approx([0.4, 0.1])
    assert torch.equal(sub.values, db.values[[4, 1]])
    with pytest.raises(IndexError, match=r"rows must be positions in \[0, 6\); got \[6\]"):
        state.select_rows([0, 6])


@pytest.mark.parametrize("ordered", [False, True])
def test_thresholds_follow_their_rows_through_deletes(ordered):
    db, ids, _ = _db(30, ordered=ordered)
    want = {i: (i % 7) / 10 for i in ids}
    db.set_thresholds(ids, [want[i] for i in ids])
    gone = ids[0:25:3]
    db.delete(gone)
    got = _by_id(db)
    assert set(got) == set(ids) - set(gone)
    assert all(got[i] == pytest.approx(want[i]) for i in got)


def test_a_new_key_drops_the_threshold_unless_one_is_given():
    db, ids, keys = _db(4)
    db.set_thresholds(ids, 0.5)
    db.update(ids[0], keys=keys[1])
    db.update(ids[1], residuals=torch.zeros(D2))
    db.update(ids[2], keys=keys[0], thresholds=0.75)
    assert db.thresholds.tolist() == [-1.0, 0.5, 0.75, 0.5]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda db, ids: db.set_thresholds(ids[:2], [0.5, 1.5]),
            ValueError,
            r"thresholds must be finite numbers in \[-1, 1\]",
        ),
        (lambda db, ids: db.set_thresholds(ids[:2], [0.5, float("nan")]), ValueError, r"in \[-1, 1\]"),
        (lambda db, ids: db.set_thresholds(ids[:2], [0.5]), ValueError, "one threshold per row: expected 2"),
        (lambda db, ids: db.set_thresholds(ids[:2], "0.5"), TypeError, "thresholds must be"),
        (lambda db, ids: db.set_thresholds([ids[0], 10_000], 0.5), KeyError, "10000"),
        (lambda db, ids: db.add(torch.ones(2, D1), torch.ones(2, D2), thresholds=[2.0, 0.0]), ValueError, r"\[-1, 1\]"),
        (lambda db, ids: db.update(ids[:2], residuals=torch.ones(2, D2), thresholds=[0.1]), ValueError, "expected 2"),
    ],
)
def test_bad_thresholds_change_nothing(call, error, match):
    db, ids, _ = _db(5)
    db.set_thresholds(ids, 0.3)
    before = db.state()
    keys, values, thr = before.keys.clone(), before.values.clone(), db.thresholds
    with pytest.raises(error, match=match):
        call(db, ids)
    assert len(db) == 5 and torch.equal(db.thresholds, thr)
    assert torch.equal(db.keys, keys) and torch.equal(db.values, values)


def test_files_keep_thresholds_and_stay_version_1_without_them(tmp_path):
    db, ids, _ = _db(6)
    db.save(tmp_path / "plain.safetensors")
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert "thresholds" not in set(f.keys())
        assert json.loads(f.metadata()["neuraldb"])["format_version"] == 1
    db.set_thresholds(ids[1:3], [0.6, 0.9])
    db.save(tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["neuraldb"])["format_version"] == 2
    back = NeuralKVDatabase.load(tmp_path / "t.safetensors")
    assert torch.equal(back.thresholds, db.thresholds)
    assert NeuralKVDatabase.load(tmp_path / "plain.safetensors").thresholds.tolist() == [-1.0] * 6


def test_a_corrupted_threshold_is_reported(tmp_path):
    db, ids, _ = _db(6)
    db.set_thresholds(ids, 0.5)
    path = tmp_path / "db.safetensors"
    db.save(path)
    raw = bytearray(path.read_bytes())
    at = raw.rfind(torch.tensor([0.5] * 6).numpy().tobytes())
    assert at > 0
    raw[at + 3] ^= 0x01  # 0.5 -> another finite float
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="'thresholds' does not match its checksum"):
        NeuralKVDatabase.load(path)


def test_state_checks_thresholds():
    db, _, _ = _db(3)
    s = db.state()
    check_state(s.replace(thresholds=torch.zeros(3)))
    for bad in (torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.full((3,), 1.5)):
        with pytest.raises(ValueError, match="state.thresholds"):
            check_state(s.replace(thresholds=bad))
    assert isinstance(s, DatabaseState) and s.thresholds is None


def test_retrieval_enforces_thresholds_on_every_path():
    db, ids, keys = _db(3000, seed=1)
    g = torch.Generator().manual_seed(2)
    q = keys[:16] + 0.04 * torch.randn(16, D1, generator=g)
    plain_out, _, score = db.retrieve(q, 0.65)
    assert plain_out.ne(0).any(1).all()
    db.set_thresholds([ids[i] for i in range(16)], score.median().item())
    shut = score <= score.median()
    out, _, _ = db.retrieve(q, 0.65)
    assert torch.equal(out.ne(0).any(1), ~shut)
    # Decode-sized calls take the key sketches (the database builds them on first use).
    for rows in (1, 3, 16):
        got = db.retrieve_residuals(q[:rows], 0.65)
        assert torch.equal(got, out[:rows])


def test_a_patched_model_enforces_thresholds():
    model = tiny_model("llama")
    module = model.model.layers[1].mlp.down_proj
    x = prompt(12)
    base, q = logits_and_down_proj_inputs(model, module, x)
    db = NeuralKVDatabase(module.in_features, module.out_features, dtype=torch.float32)
    ids = db.add(q[[3, 7]], torch.randn(2, module.out_features) * 5)
    patch_model(model, db, layer=1, gamma=0.9)
    with torch.no_grad():
        both = model(x).logits
        db.set_thresholds(ids[0], 1.0)  # row 0 can never pass: only position 7 changes, from there on
        one = model(x).logits
        db.set_thresholds(ids, -1.0)
        again = model(x).logits
    assert not torch.allclose(both[0, 3], base[0, 3])
    assert torch.equal(one[0, :7], base[0, :7]) and not torch.allclose(one[0, 7], base[0, 7])
    assert torch.equal(again, both)
