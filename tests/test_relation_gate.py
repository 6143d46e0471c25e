"""The relation gate: ``confirm``'s rule, relation keys kept with their rows through every write and file, and
retrieval (direct, residuals, a patched model) enforcing it exactly where ``db.relation_gate`` is set."""

from __future__ import annotations

import pytest
import torch
from _tiny_editing import FACTS, word_llama
from _tiny_models import logits_and_down_proj_inputs, prompt, tiny_model
from neuraldb import NeuralKVDatabase, patch_model
from neuraldb.calibration import enable_relation_gate
from neuraldb.relation_gate import check_relation_gate, confirm

E = torch.eye(6)


def _reference(queries, out, idx, rel, rho, window, offset=0):
    """The rule, one position at a time: some t in [s + offset, s + offset + window] (cut at the sequence's end)
    shows the row's key, or reaches before the sequence's start."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    want = out.clone()
    for b in range(q.shape[0]):
        for s in range(q.shape[1]):
            j = int(idx[b, s])
            if j < 0 or not out[b, s].any() or not rel[j].any():
                continue
            ts = range(s + offset, s + offset + window + 1)
            if any(t < 0 for t in ts):
                continue
            seen = max(float(q[b, min(t, q.shape[1] - 1)] @ rel[j]) for t in ts)
            if seen <= rho:
                want[b, s] = 0
    return want


@pytest.mark.parametrize(("window", "offset"), [(0, 0), (1, 0), (3, 0), (50, 0), (0, -1), (2, -2), (1, 2)])
def test_confirm_follows_the_rule(window, offset):
    g = torch.Generator().manual_seed(window + 10 * offset)
    q = torch.randn(3, 9, 6, generator=g)
    idx = torch.randint(-1, 4, (3, 9), generator=g)
    out = torch.randn(3, 9, 2, generator=g) * (idx >= 0)[..., None]
    rel = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    rel[2] = 0  # a row without a relation key is never shut
    want = _reference(q, out, idx, rel, 0.2, window, offset)
    got = confirm(q, out.clone(), idx, rel, rho=0.2, window=window, offset=offset)
    assert torch.equal(got, want)
    assert 0 < int(want.ne(0).any(-1).sum()) < int(out.ne(0).any(-1).sum()), "the case must shut some, keep some"


def test_confirm_in_chunks_and_on_one_sequence():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(700, 6, generator=g)  # 2-D: one sequence of 700 positions, more than one chunk opened
    idx = torch.randint(0, 3, (700,), generator=g)
    out = torch.randn(700, 2, generator=g)
    rel = torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=-1)
    want = _reference(q[None], out[None], idx[None], rel, 0.5, 2)[0]
    assert torch.equal(confirm(q, out.clone(), idx, rel, rho=0.5, window=2), want)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"rho": 2.0, "window": 3}, r"rho'\] must be a number in \[-1, 1\]"),
        ({"rho": 0.5, "window": -1}, r"window'\] must be an int"),
        ({"rho": 0.5, "window": 2.5}, r"window'\] must be an int"),
        ({"rho": 0.5}, "keys 'rho', 'window' and optionally 'offset'"),
        ({"rho": 0.5, "window": 0, "shift": 1}, "keys 'rho', 'window' and optionally 'offset'"),
        ({"rho": 0.5, "window": 0, "offset": True}, r"offset'\] must be an int"),
        ({"rho": 0.5, "window": 0, "offset": -5000}, r"offset'\] must be an int in \[-4096, 4096\]"),
        (0.5, "keys 'rho', 'window' and optionally 'offset'"),
    ],
)
def test_bad_gates_are_refused(value, match):
    with pytest.raises((TypeError, ValueError), match=match):
        check_relation_gate(value)
    db = NeuralKVDatabase(4, 1)
    with pytest.raises((TypeError, ValueError), match=match):
        db.relation_gate = value
    assert db.relation_gate is None and db.config == {}


def _db(ordered=False):
    db = NeuralKVDatabase(6, 1, dtype=torch.float32, ordered=ordered)
    # rows 0..3: subject key e_j, relation key e_{j+1 mod 4}... a subject followed by its relation word opens it
    ids = db.add(E[:4], torch.arange(1.0, 5.0)[:, None], relation_keys=E[[4, 5, 4, 5]])
    return db, ids


def test_retrieval_enforces_the_gate_only_when_set(tmp_path):
    db, _ = _db()
    seq = torch.stack([E[0], E[2], E[4], E[1]])[None]  # row 0 then its relation; row 2 and 1 without theirs nearby
    plain = db.retrieve_residuals(seq, 0.5)
    assert plain.flatten().tolist() == [1.0, 3.0, 0.0, 2.0]
    db.relation_gate = {"rho": 0.5, "window": 2}
    assert db.retrieve_residuals(seq, 0.5).flatten().tolist() == [1.0, 3.0, 0.0, 0.0]
    assert db.retrieve(seq, 0.5)[0].flatten().tolist() == [1.0, 3.0, 0.0, 0.0]
    db.relation_gate = {"rho": 0.5, "window": 1}
    assert db.retrieve_residuals(seq, 0.5).flatten().tolist() == [0.0, 3.0, 0.0, 0.0]
    db.save(tmp_path / "db.safetensors")
    back = NeuralKVDatabase.load(tmp_path / "db.safetensors")
    assert back.relation_gate == {"rho": 0.5, "window": 1}
    assert torch.equal(back.relation_keys, db.relation_keys)
    assert torch.equal(back.retrieve_residuals(seq, 0.5), db.retrieve_residuals(seq, 0.5))
    db.relation_gate = None
    assert db.retrieve_residuals(seq, 0.5).flatten().tolist() == [1.0, 3.0, 0.0, 2.0]


@pytest.mark.parametrize("ordered", [False, True])
def test_relation_keys_follow_their_rows(ordered):
    db, ids = _db(ordered)
    new = db.add(E[4], torch.zeros(1, 1))  # no relation key: a zero row
    db.delete([ids[0], ids[2]])
    by_id = dict(zip(db.ids(), db.relation_keys))
    assert torch.equal(by_id[ids[1]], E[5]) and torch.equal(by_id[ids[3]], E[5])
    assert not by_id[new[0]].any()
    db.update(ids[1], relation_keys=E[0] * 3)  # normalised on the way in
    assert torch.equal(dict(zip(db.ids(), db.relation_keys))[ids[1]], E[0])


def test_a_database_without_relation_keys_has_none():
    db = NeuralKVDatabase(6, 1)
    db.add(E[:2], torch.ones(2, 1))
    assert db.relation_keys is None and db.state().relation_keys is None


@pytest.mark.parametrize(
    ("keys", "error", "match"),
    [
        (torch.ones(3, 5), ValueError, r"relation_keys must have shape \(m, 6\)"),
        (torch.ones(2, 6), ValueError, "one row per fact: expected 4"),
        (torch.full((4, 6), float("nan")), ValueError, "not finite"),
        ([[1.0] * 6] * 4, TypeError, "relation_keys must be a torch.Tensor"),
    ],
)
def test_bad_relation_keys_change_nothing(keys, error, match):
    db = NeuralKVDatabase(6, 1)
    with pytest.raises(error, match=match):
        db.add(E[:4], torch.ones(4, 1), relation_keys=keys)
    assert len(db) == 0


def test_a_patched_model_enforces_the_gate():
    model = tiny_model("llama")
    module = model.model.layers[1].mlp.down_proj
    x = prompt(12)
    base, q = logits_and_down_proj_inputs(model, module, x)
    db = NeuralKVDatabase(module.in_features, module.out_features, dtype=torch.float32)
    db.add(q[[3]], torch.randn(1, module.out_features) * 5, relation_keys=q[[5]])
    unit = torch.nn.functional.normalize(q, dim=-1)
    assert int(((unit @ unit[3]) > 0.99).sum()) == 1, "only the subject position opens at gamma 0.99"
    patch_model(model, db, layer=1, gamma=0.99)
    with torch.no_grad():
        opened = model(x).logits
        db.relation_gate = {"rho": 0.9, "window": 2}  # position 5 is within 2 of the subject at 3: still opens
        near = model(x).logits
        db.relation_gate = {"rho": 0.9, "window": 1}  # not within 1: shut, the model is the unedited one
        far = model(x).logits
    assert not torch.allclose(opened[0, 3], base[0, 3])
    assert torch.equal(near, opened)
    assert torch.equal(far, base)


def test_the_sharded_database_refuses_relation_keys():
    import torch.distributed as dist
    from neuraldb import ShardedNeuralKVDatabase

    if not dist.is_available():
        pytest.skip("no torch.distributed")
    db, _ = _db()
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29581", rank=0, world_size=1)
    try:
        db.relation_gate = {"rho": 0.5, "window": 0, "offset": -1}
        with pytest.raises(ValueError, match=r"set db.relation_gate = None to shard it without the gate"):
            ShardedNeuralKVDatabase.from_database(db)
        db.relation_gate = None  # the keys are inert: sharded without them
        sharded = ShardedNeuralKVDatabase.from_database(db)
        assert sharded.ids() == db.ids() and "relation_gate" not in (sharded.config or {})
    finally:
        if started:
            dist.destroy_process_group()


def test_enable_relation_gate_gives_fact_rows_their_keys():
    model, tok = word_llama()
    from neuraldb.editing import compute_keys

    keys = compute_keys(model, tok, FACTS[:3], 1, n_prefixes=0, template="<s>{}")
    db = NeuralKVDatabase(keys.shape[1], 4, dtype=torch.float32)
    db.add(keys, torch.ones(3, 4), facts=[*FACTS[:2], {"not": "a Fact"}])
    db.layer, db.template = 1, "<s>{}"
    assert enable_relation_gate(model, tok, db, rho=0.3, window=8) == 2
    rk = db.relation_keys
    assert rk[:2].norm(dim=1).allclose(torch.ones(2)) and not rk[2].any()
    assert db.relation_gate == {"rho": 0.3, "window": 8}
    with pytest.raises(ValueError, match="rho"):
        enable_relation_gate(model, tok, db, rho=3.0)
