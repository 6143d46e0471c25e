"""NeuralKVDatabase in memory: ids, normalisation, swap-remove, growth, metadata, and bad input leaving it unchanged."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuraldb import NeuralKVDatabase, gated_retrieval
from neuraldb.facts import Fact

D1, D2 = 8, 4


def _db(n=0, dtype=torch.float16, seed=0):
    db = NeuralKVDatabase(D1, D2, dtype=dtype)
    if n:
        g = torch.Generator().manual_seed(seed)
        db.add(torch.randn(n, D1, generator=g), torch.randn(n, D2, generator=g))
    return db


def state(db: NeuralKVDatabase) -> dict:
    """Everything observable about a database, to compare before and after a failed call."""
    return {
        "keys": db.keys.clone(),
        "values": db.values.clone(),
        "ids": db.ids(),
        "facts": {i: db.fact(i) for i in db.ids()},
        "next_id": db.next_id,
        "capacity": db.capacity,
        "meta": (db.layer, db.gamma, db.template, db.model_id, db.module_path, dict(db.config)),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert torch.equal(a["keys"], b["keys"]) and torch.equal(a["values"], b["values"])
    assert {k: v for k, v in a.items() if k not in ("keys", "values")} == {
        k: v for k, v in b.items() if k not in ("keys", "values")
    }


def test_add_returns_increasing_ids_and_normalises_keys():
    db = _db()
    keys = torch.randn(3, D1) * torch.tensor([[1e-20], [1.0], [1e20]])  # fp32 norms would under/overflow naively
    ids = db.add(keys, torch.randn(3, D2), facts=[Fact("A", "{} is", "x"), {"k": [1, 2]}, None])
    assert ids == [0, 1, 2] and len(db) == 3 and db.ids() == ids
    assert db.keys.dtype == torch.float16 and db.keys.shape == (3, D1)
    torch.testing.assert_close(db.keys.float().norm(dim=1), torch.ones(3), atol=2e-3, rtol=0)
    assert db.fact(0) == Fact("A", "{} is", "x") and db.fact(1) == {"k": [1, 2]} and db.fact(2) is None
    assert db.add(torch.randn(1, D1), torch.randn(1, D2)) == [3]
    assert db.add(torch.randn(D1), torch.randn(D2)) == [4]  # one fact as 1-D rows
    assert db.add(torch.empty(0, D1), torch.empty(0, D2)) == []
    assert 4 in db and 5 not in db


def test_keys_and_values_are_live_views_the_op_uses():
    db = _db(5)
    keys, values = db.keys, db.values
    assert keys.data_ptr() == db._keys.data_ptr() and values.data_ptr() == db._values.data_ptr()
    out, idx, score = gated_retrieval(db.keys[2:3].float() * 7, db.keys, db.values, 0.9)
    assert idx.tolist() == [2] and torch.equal(out[0], db.values[2].float())


def test_storage_grows_by_doubling():
    db = _db()
    caps = []
    for _ in range(40):
        db.add(torch.randn(3, D1), torch.randn(3, D2))
        caps.append(db.capacity)
    assert len(set(caps)) <= 5 and all(c >= 120 for c in caps[-1:])
    assert all(b in (a, 2 * a, 4 * a) for a, b in zip(caps, caps[1:]))


def test_delete_swaps_the_last_row_in_and_keeps_ids():
    db = _db(5)
    before = {i: db.get(i) for i in db.ids()}
    db.delete([0, 4, 2])
    assert sorted(db.ids()) == [1, 3] and len(db) == 2 and db.next_id == 5
    for i in db.ids():
        key, value, fact = db.get(i)
        assert torch.equal(key, before[i][0]) and torch.equal(value, before[i][1])
        assert torch.equal(db.keys[db.row(i)], key)
    with pytest.raises(KeyError):
        db.get(0)
    assert db.add(torch.randn(1, D1), torch.randn(1, D2)) == [5]  # ids are never reused
    db.delete(db.ids())
    assert len(db) == 0 and db.keys.shape == (0, D1)
    db.delete([])


def test_update_replaces_rows_and_facts():
    db = _db(3)
    old_key, _, _ = db.get(1)
    db.update([1], residuals=torch.full((1, D2), 2.0))
    key, value, _ = db.get(1)
    assert torch.equal(key, old_key) and torch.equal(value, torch.full((D2,), 2.0, dtype=torch.float16))
    db.update(2, keys=torch.ones(D1) * 3, facts=[{"new": True}])
    key, _, fact = db.get(2)
    assert torch.allclose(key.float(), torch.full((D1,), D1**-0.5), atol=1e-3) and fact == {"new": True}
    db.update([], keys=torch.empty(0, D1))


def test_metadata_attributes():
    db = _db()
    db.layer, db.gamma, db.template, db.model_id, db.module_path = 8, 0.7, "{}", "m", "model.layers.8.mlp.down_proj"
    db.config["lr"] = 0.5
    assert (db.layer, db.gamma) == (8, 0.7)
    with pytest.raises(TypeError, match="layer"):
        db.layer = -1
    with pytest.raises(ValueError, match="gamma"):
        db.gamma = 3
    assert "layer=8" in repr(db)


def test_copies_are_independent():
    db = _db(3)
    for twin in (copy.deepcopy(db), pickle.loads(pickle.dumps(db))):
        twin.delete([0])
        assert len(db) == 3 and len(twin) == 2
        with twin.lock:
            pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_storage_dtypes(dtype):
    db = _db(4, dtype=dtype)
    assert db.keys.dtype == dtype and db.values.dtype == dtype


@st.composite
def _ops(draw):
    return draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("add"), st.integers(0, 5)),
                st.tuples(st.just("delete"), st.lists(st.integers(0, 40), max_size=6, unique=True)),
                st.tuples(st.just("update"), st.lists(st.integers(0, 40), max_size=4, unique=True)),
            ),
            max_size=25,
        )
    )


@settings(max_examples=60, deadline=None)
@given(_ops())
def test_random_operations_match_a_dict_model(ops):
    db = NeuralKVDatabase(D1, D2, dtype=torch.float32)
    model: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    g = torch.Generator().manual_seed(0)
    for op, arg in ops:
        if op == "add":
            k, v = torch.randn(arg, D1, generator=g), torch.randn(arg, D2, generator=g)
            for i, kk, vv in zip(db.add(k, v, facts=[{"row": j} for j in range(arg)]), k, v):
                model[i] = (kk / kk.norm(), vv)
        else:
            known = [i for i in arg if i in model]
            if len(known) != len(arg):
                with pytest.raises(KeyError):
                    db.delete(arg) if op == "delete" else db.update(arg, residuals=torch.zeros(len(arg), D2))
                continue
            if op == "delete":
                db.delete(arg)
                for i in arg:
                    del model[i]
            else:
                v = torch.randn(len(arg), D2, generator=g)
                db.update(arg, residuals=v)
                for i, vv in zip(arg, v):
                    model[i] = (model[i][0], vv)
        assert sorted(db.ids()) == sorted(model) and len(db) == len(model)
        for row, i in enumerate(db.ids()):
            torch.testing.assert_close(db.keys[row], model[i][0])
            assert torch.equal(db.values[row], model[i][1])


# ---- bad input: the right exception naming the argument, and nothing changed -----------------------------------

_K, _V = torch.randn(2, D1), torch.randn(2, D2)


def _with_row(t, row, value):
    t = t.clone()
    t[row] = value
    return t


BAD_ADDS = [
    (dict(keys=_K.numpy(), residuals=_V), TypeError, "keys"),
    (dict(keys=_K, residuals=[[0.0] * D2] * 2), TypeError, "residuals"),
    (dict(keys=_K.long(), residuals=_V), TypeError, "keys"),
    (dict(keys=_K, residuals=_V.to(torch.complex64)), TypeError, "residuals"),
    (dict(keys=torch.randn(2, D1 + 1), residuals=_V), ValueError, "keys"),
    (dict(keys=torch.randn(2, 1, D1), residuals=_V), ValueError, "keys"),
    (dict(keys=_K, residuals=torch.randn(2, D2 - 1)), ValueError, "residuals"),
    (dict(keys=_K, residuals=torch.randn(3, D2)), ValueError, "rows"),
    (dict(keys=_with_row(_K, 1, 0.0), residuals=_V), ValueError, "keys"),
    (dict(keys=_with_row(_K, 0, float("nan")), residuals=_V), ValueError, "keys"),
    (dict(keys=_with_row(_K, 0, float("inf")), residuals=_V), ValueError, "keys"),
    (dict(keys=_K, residuals=_with_row(_V, 1, float("nan"))), ValueError, "residuals"),
    (dict(keys=_K, residuals=_with_row(_V, 1, 1e6)), ValueError, "overflow"),
    (dict(keys=_K.to("meta"), residuals=_V), ValueError, "keys"),
    (dict(keys=_K, residuals=_V.to("meta")), ValueError, "residuals"),
    (dict(keys=_K, residuals=_V, facts=[None]), ValueError, "facts"),
    (dict(keys=_K, residuals=_V, facts=Fact("A", "{} is", "x")), TypeError, "facts"),
    (dict(keys=_K, residuals=_V, facts=[None, "text"]), TypeError, r"facts\[1\]"),
    (dict(keys=_K, residuals=_V, facts=[None, {"x": object()}]), TypeError, r"facts\[1\]"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ADDS)
def test_bad_add_changes_nothing(kwargs, exc, match):
    db = _db(3)
    before = state(db)
    with pytest.raises(exc, match=match):
        db.add(**kwargs)
    assert_same_state(state(db), before)


BAD_UPDATES = [
    (dict(ids=[7], residuals=torch.randn(1, D2)), KeyError, "7"),
    (dict(ids=[0, 7], residuals=torch.randn(2, D2)), KeyError, "7"),
    (dict(ids=[1, 1], residuals=torch.randn(2, D2)), ValueError, "ids"),
    (dict(ids=[0.0], residuals=torch.randn(1, D2)), TypeError, "ids"),
    (dict(ids=[True], residuals=torch.randn(1, D2)), TypeError, "ids"),
    (dict(ids="0", residuals=torch.randn(1, D2)), TypeError, "ids"),
    (dict(ids=torch.tensor([0.0]), residuals=torch.randn(1, D2)), TypeError, "ids"),
    (dict(ids=[0, 1], residuals=torch.randn(1, D2)), ValueError, "residuals"),
    (dict(ids=[0], keys=torch.zeros(1, D1)), ValueError, "keys"),
    (dict(ids=[0], keys=torch.randn(1, D1), residuals=torch.full((1, D2), float("nan"))), ValueError, "residuals"),
    (dict(ids=[0], keys=torch.randn(1, D1 + 2)), ValueError, "keys"),
    (dict(ids=[0], facts=[object()]), TypeError, r"facts\[0\]"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_UPDATES)
def test_bad_update_changes_nothing(kwargs, exc, match):
    db = _db(3)
    before = state(db)
    with pytest.raises(exc, match=match):
        db.update(**kwargs)
    assert_same_state(state(db), before)


@pytest.mark.parametrize(
    "ids,exc,match",
    [
        ([5], KeyError, "5"),
        ([0, 5], KeyError, "5"),
        ([0, 0], ValueError, "ids"),
        ([None], TypeError, "ids"),
        (1.5, TypeError, "ids"),
    ],
)
def test_bad_delete_changes_nothing(ids, exc, match):
    db = _db(3)
    before = state(db)
    with pytest.raises(exc, match=match):
        db.delete(ids)
    assert_same_state(state(db), before)


def test_bad_lookups():
    db = _db(2)
    with pytest.raises(KeyError, match="9"):
        db.get(9)
    with pytest.raises(KeyError):
        db.fact(-1)
    with pytest.raises(TypeError, match="id"):
        db.get("0")


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((0, 4), {}, ValueError, "key_dim"),
        ((4, -1), {}, ValueError, "value_dim"),
        ((4.0, 4), {}, TypeError, "key_dim"),
        ((True, 4), {}, TypeError, "key_dim"),
        ((4, 4), dict(dtype=torch.float64), TypeError, "dtype"),
        ((4, 4), dict(dtype=torch.int8), TypeError, "dtype"),
        ((4, 4), dict(device="nowhere"), TypeError, "device"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NeuralKVDatabase(*args, **kwargs)


def test_to_moves_in_place():
    db = _db(2)
    assert db.to("cpu") is db
    meta = _db(2).to("meta")
    assert meta.device.type == "meta" and meta.keys.shape == (2, D1)
    with pytest.raises(ValueError, match="meta"):
        meta.to("cpu")
    with pytest.raises(TypeError, match="device"):
        db.to("nowhere")
