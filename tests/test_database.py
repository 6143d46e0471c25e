"""NeuralKVDatabase in memory: ids, normalisation, swap-remove, growth, metadata, and bad input leaving it unchanged."""

from __future__ import annotations

import copy
import itertools
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
    assert keys.data_ptr() == db._storage.keys_buf.data_ptr() and values.data_ptr() == db._storage.values_buf.data_ptr()
    out, idx, _score = gated_retrieval(db.keys[2:3].float() * 7, db.keys, db.values, 0.9)
    assert idx.tolist() == [2] and torch.equal(out[0], db.values[2].float())


def test_storage_grows_by_doubling():
    db = _db()
    caps = []
    for _ in range(40):
        db.add(torch.randn(3, D1), torch.randn(3, D2))
        caps.append(db.capacity)
    assert len(set(caps)) <= 5 and all(c >= 120 for c in caps[-1:])
    assert all(b in (a, 2 * a, 4 * a) for a, b in itertools.pairwise(caps))


def test_delete_swaps_the_last_row_in_and_keeps_ids():
    db = _db(5)
    before = {i: db.get(i) for i in db.ids()}
    db.delete([0, 4, 2])
    assert sorted(db.ids()) == [1, 3] and len(db) == 2 and db.next_id == 5
    for i in db.ids():
        key, value, _fact = db.get(i)
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
    ({"keys": _K.numpy(), "residuals": _V}, TypeError, "keys"),
    ({"keys": _K, "residuals": [[0.0] * D2] * 2}, TypeError, "residuals"),
    ({"keys": _K.long(), "residuals": _V}, TypeError, "keys"),
    ({"keys": _K, "residuals": _V.to(torch.complex64)}, TypeError, "residuals"),
    ({"keys": torch.randn(2, D1 + 1), "residuals": _V}, ValueError, "keys"),
    ({"keys": torch.randn(2, 1, D1), "residuals": _V}, ValueError, "keys"),
    ({"keys": _K, "residuals": torch.randn(2, D2 - 1)}, ValueError, "residuals"),
    ({"keys": _K, "residuals": torch.randn(3, D2)}, ValueError, "rows"),
    ({"keys": _with_row(_K, 1, 0.0), "residuals": _V}, ValueError, "keys"),
    ({"keys": _with_row(_K, 0, float("nan")), "residuals": _V}, ValueError, "keys"),
    ({"keys": _with_row(_K, 0, float("inf")), "residuals": _V}, ValueError, "keys"),
    ({"keys": _K, "residuals": _with_row(_V, 1, float("nan"))}, ValueError, "residuals"),
    ({"keys": _K, "residuals": _with_row(_V, 1, 1e6)}, ValueError, "overflow"),
    ({"keys": _K.to("meta"), "residuals": _V}, ValueError, "keys"),
    ({"keys": _K, "residuals": _V.to("meta")}, ValueError, "residuals"),
    ({"keys": _K, "residuals": _V, "facts": [None]}, ValueError, "facts"),
    ({"keys": _K, "residuals": _V, "facts": Fact("A", "{} is", "x")}, TypeError, "facts"),
    ({"keys": _K, "residuals": _V, "facts": [None, "text"]}, TypeError, r"facts\[1\]"),
    ({"keys": _K, "residuals": _V, "facts": [None, {"x": object()}]}, TypeError, r"facts\[1\]"),
    # what JSON would not give back as it went in, named by its path
    ({"keys": _K, "residuals": _V, "facts": [{1: "a"}, None]}, TypeError, r"facts\[0\] has the int key 1"),
    ({"keys": _K, "residuals": _V, "facts": [None, {"t": (1, 2)}]}, TypeError, r"facts\[1\]\['t'\] is a tuple"),
    ({"keys": _K, "residuals": _V, "facts": [None, {"s": [{1}]}]}, TypeError, r"facts\[1\]\['s'\]\[0\] is a set"),
    ({"keys": _K, "residuals": _V, "facts": [None, {"x": float("nan")}]}, ValueError, r"facts\[1\]\['x'\] is nan"),
    ({"keys": _K, "residuals": _V, "facts": [None, {"x": [float("-inf")]}]}, ValueError, r"\['x'\]\[0\] is -inf"),
    ({"keys": _K, "residuals": _V, "facts": [None, {"x": torch.tensor(1)}]}, TypeError, "is a Tensor"),
    (
        {"keys": _K, "residuals": _V, "facts": [Fact("A", "{} is", "x", extras={2: 1}), None]},
        TypeError,
        r"\.extras has",
    ),
    (
        {"keys": _K, "residuals": _V, "facts": [Fact("A", "{} is", "x", paraphrases=({1},)), None]},
        TypeError,
        r"facts\[0\]\.paraphrases\[0\] is a set",
    ),
]


def _self_referencing() -> dict:
    d: dict = {}
    d["me"] = d
    return d


BAD_ADDS.append(({"keys": _K, "residuals": _V, "facts": [_self_referencing(), None]}, ValueError, "contains itself"))


@pytest.mark.parametrize("kwargs,exc,match", BAD_ADDS)
def test_bad_add_changes_nothing(kwargs, exc, match):
    db = _db(3)
    before = state(db)
    with pytest.raises(exc, match=match):
        db.add(**kwargs)
    assert_same_state(state(db), before)


BAD_UPDATES = [
    ({"ids": [7], "residuals": torch.randn(1, D2)}, KeyError, "7"),
    ({"ids": [0, 7], "residuals": torch.randn(2, D2)}, KeyError, "7"),
    ({"ids": [1, 1], "residuals": torch.randn(2, D2)}, ValueError, "ids"),
    ({"ids": [0.0], "residuals": torch.randn(1, D2)}, TypeError, "ids"),
    ({"ids": [True], "residuals": torch.randn(1, D2)}, TypeError, "ids"),
    ({"ids": "0", "residuals": torch.randn(1, D2)}, TypeError, "ids"),
    ({"ids": torch.tensor([0.0]), "residuals": torch.randn(1, D2)}, TypeError, "ids"),
    ({"ids": [0, 1], "residuals": torch.randn(1, D2)}, ValueError, "residuals"),
    ({"ids": [0], "keys": torch.zeros(1, D1)}, ValueError, "keys"),
    ({"ids": [0], "keys": torch.randn(1, D1), "residuals": torch.full((1, D2), float("nan"))}, ValueError, "residuals"),
    ({"ids": [0], "keys": torch.randn(1, D1 + 2)}, ValueError, "keys"),
    ({"ids": [0], "facts": [object()]}, TypeError, r"facts\[0\]"),
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


def test_ids_are_ints_or_0d_integer_tensors_everywhere():
    db = _db(3)
    db.update([1], facts=[{"n": 1}])
    one = torch.tensor(1)
    assert one in db and db.get(one)[2] == {"n": 1} and db.fact(one) == {"n": 1} and db.row(one) == db.row(1)
    assert torch.tensor(1, dtype=torch.int32) in db and torch.tensor(7) not in db
    for bad in (1.0, True, torch.tensor(1.0), torch.tensor(True), torch.tensor([1]), "1", None):
        for lookup in (lambda i: i in db, db.get, db.fact, db.row):
            with pytest.raises(TypeError, match="id must be an int"):
                lookup(bad)
    with pytest.raises(TypeError, match="ids must be an int"):
        db.delete([1.0])
    db.delete(one)
    assert 1 not in db


def test_ids_stop_at_int64():
    db = _db(2)
    db = NeuralKVDatabase.from_state(db.state().replace(next_id=2**63 - 2))  # as a file's next_id could set it
    before = state(db)
    with pytest.raises(ValueError, match="2\\*\\*63 - 1"):
        db.add(torch.randn(3, D1), torch.randn(3, D2))
    assert_same_state(state(db), before)
    assert db.add(torch.randn(2, D1), torch.randn(2, D2)) == [2**63 - 2, 2**63 - 1]


def test_float64_keys_keep_their_direction_at_any_scale():
    direction = torch.randn(1, D1, dtype=torch.float64)
    db = NeuralKVDatabase(D1, D2, dtype=torch.float32)
    db.add(torch.cat([direction * 1e300, direction * 1e-300, direction]), torch.randn(3, D2))
    assert torch.equal(db.keys[0], db.keys[2]) and torch.equal(db.keys[1], db.keys[2])


def test_facts_with_tuples_round_trip_as_before(tmp_path):
    # A benchmark loader's Fact keeps tuples in extras: they come back as lists, and the Fact compares equal.
    fact = Fact("A", "{} is", "x", paraphrases=("p", "q"), extras={"neighborhood_answers": ("a", "b"), "n": {"k": 1}})
    db = _db()
    db.add(torch.randn(1, D1), torch.randn(1, D2), facts=[fact])
    db.save(tmp_path / "db.safetensors")
    back = NeuralKVDatabase.load(tmp_path / "db.safetensors").fact(0)
    assert back == fact and back.paraphrases == ("p", "q")
    assert back.extras == {"neighborhood_answers": ["a", "b"], "n": {"k": 1}}


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((0, 4), {}, ValueError, "key_dim"),
        ((4, 0), {}, ValueError, "value_dim must be a positive int"),
        ((4, -1), {}, ValueError, "value_dim"),
        ((2**31, 4), {}, ValueError, "key_dim must be a positive int of at most 2\\*\\*31 - 1"),
        ((4, 4), {"device": "meta"}, ValueError, "meta"),
        ((4, 4), {"capacity": -1}, ValueError, "capacity"),
        ((4, 4), {"capacity": 2.0}, TypeError, "capacity"),
        ((4.0, 4), {}, TypeError, "key_dim"),
        ((True, 4), {}, TypeError, "key_dim"),
        ((4, 4), {"dtype": torch.float64}, TypeError, "dtype"),
        ((4, 4), {"dtype": torch.int8}, TypeError, "dtype"),
        ((4, 4), {"device": "nowhere"}, TypeError, "device"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NeuralKVDatabase(*args, **kwargs)


def test_to_moves_in_place():
    db = _db(2)
    assert db.to("cpu") is db
    before = state(db)
    with pytest.raises(ValueError, match="meta device keeps shapes only"):
        db.to("meta")  # it would keep the shapes and lose every row
    with pytest.raises(TypeError, match="device"):
        db.to("nowhere")
    assert db.device.type == "cpu"
    assert_same_state(state(db), before)
