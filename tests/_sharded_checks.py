"""Checks of ``ShardedNeuralKVDatabase`` that run inside every rank of a gloo process group (see test_sharded.py).

Each check is a function ``check(tmp: Path)`` called collectively on all ranks; a failing assertion on any rank
fails the test. They share one spawned group because starting processes (and importing torch) is the slow part.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

D1, D2 = 24, 8


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def _data(m: int, seed: int, d1: int = D1, d2: int = D2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d1, generator=g), torch.randn(m, d2, generator=g)


def _queries(keys: torch.Tensor, seed: int, t: int = 40) -> torch.Tensor:
    """Stored keys with a little noise (gate opens), random rows (gate mostly shut) and a zero row."""
    g = torch.Generator().manual_seed(seed)
    picked = keys[torch.randint(len(keys), (t // 2,), generator=g)]
    near = picked + 0.05 * torch.randn(t // 2, keys.shape[1], generator=g)
    far = torch.randn(t - t // 2 - 1, keys.shape[1], generator=g)
    return torch.cat([near, far, torch.zeros(1, keys.shape[1])])


def assert_matches_single(sharded, single, queries: torch.Tensor, gamma: float, **kwargs) -> None:
    """``sharded.retrieve`` equals ``gated_retrieval`` on the single database, bit for bit."""
    from neuraldb_kernels import gated_retrieval

    assert sharded.ids() == single.ids(), "the single database must hold the same ids in id order"
    out, ids, score = sharded.retrieve(queries, gamma, **kwargs)
    ref_out, ref_idx, ref_score = gated_retrieval(queries, single.keys, single.values, gamma, **kwargs)
    ref_ids = torch.tensor(single.ids() + [-1], dtype=torch.int64)[ref_idx]  # idx -1 -> the appended -1
    assert torch.equal(ids, ref_ids), (ids, ref_ids)
    assert torch.equal(score, ref_score), (score - ref_score).abs().max()
    assert torch.equal(out, ref_out), (out.float() - ref_out.float()).abs().max()
    assert out.dtype == queries.dtype
    assert torch.equal(sharded.index_of(ids), ref_idx)


def check_random_keys_equal_single(tmp: Path) -> None:
    import neuraldb

    db = neuraldb.ShardedNeuralKVDatabase(D1, D2)
    single = neuraldb.NeuralKVDatabase(D1, D2)
    empty_q = _queries(torch.randn(3, D1), 0)
    out, ids, score = db.retrieve(empty_q, 0.5)  # empty everywhere
    assert (ids == -1).all() and torch.isinf(score).all() and (score < 0).all() and not out.any()
    for batch, m in enumerate([1, 37, 5]):  # after the first batch two of three shards are empty
        k, v = _data(m, seed=batch)
        assert db.add(k, v) == single.add(k, v)
        q = _queries(single.keys.float(), seed=10 + batch)
        for gamma in (-1.0, 0.3, 0.9):
            assert_matches_single(db, single, q, gamma)
    for dtype in (torch.float16, torch.bfloat16):
        assert_matches_single(db, single, q.to(dtype), 0.3)
    db.compact = False
    assert_matches_single(db, single, q.reshape(2, 20, D1), 0.3)
    db.compact = True
    for backend in ("torch", None):
        assert_matches_single(db, single, q, 0.3, backend=backend)
    assert len(db) == 43 and db.next_id == 43
    gathered = db.gather()
    assert gathered.ids() == single.ids() and torch.equal(gathered.keys, single.keys)
    assert torch.equal(gathered.values, single.values)


def check_ties_across_and_within_ranks(tmp: Path) -> None:
    import neuraldb

    db = neuraldb.ShardedNeuralKVDatabase(D1, D2, dtype=torch.float32)
    key = torch.randn(D1, generator=torch.Generator().manual_seed(2))  # the same on every rank
    keys = key.repeat(12, 1)  # ids 0..11 share one key: every rank holds four copies
    values = torch.arange(12.0)[:, None].repeat(1, D2)
    db.add(keys, values)
    q = torch.stack([key, -key, torch.zeros(D1)])
    # Shards by id % 3: rank 0 holds 0, 3, 6, 9; rank 1 holds 1, 4, 7, 10; rank 2 holds 2, 5, 8, 11.
    for expected, then_delete in ((0, [0]), (1, [1, 2]), (3, [3]), (4, [4]), (5, [5]), (6, [])):
        out, ids, _score = db.retrieve(q, 0.5)  # the lowest live id wins, whichever rank holds it
        assert ids[0] == expected and ids[2] == expected, (ids, expected)  # also for the zero query (all 0.0)
        assert out[0, 0] == expected and not out[1:].any()
        db.delete(then_delete)
    # The last winner, 6, sits on rank 0 after 0 and 3 were deleted there: a swap-remove would have moved 9
    # in front of it and the tie inside the shard would have gone to 9.
    if rank() == 0:
        assert db.local_ids() == [6, 9]
    single = db.gather()
    assert_matches_single(db, single, q, 0.5)


def check_routing_and_errors(tmp: Path) -> None:
    import neuraldb
    import pytest

    w, r = world(), rank()
    db = neuraldb.ShardedNeuralKVDatabase(D1, D2, dtype=torch.float32)
    k, v = _data(10, seed=3)
    facts = [{"n": i} for i in range(10)]
    ids = db.add(k, v, facts=facts)
    assert ids == list(range(10))
    assert db.local_ids() == [i for i in ids if i % w == r]
    db.delete([1, 4, 8])
    assert db.local_ids() == [i for i in ids if i % w == r and i not in (1, 4, 8)]
    assert len(db) == 7 and 4 not in db and 5 in db and db.ids() == [0, 2, 3, 5, 6, 7, 9]
    assert torch.tensor(5) in db
    for bad in (5.0, True, "5"):
        try:
            bad in db  # noqa: B015
        except TypeError:
            continue
        raise AssertionError(f"{bad!r} in db must be a TypeError, as for a NeuralKVDatabase")
    assert db.add(k[:2], v[:2]) == [10, 11]  # ids are never reused
    # Errors are raised on every rank (each validates everything), so no rank is left in a collective.
    with pytest.raises(KeyError):
        db.delete([4])
    with pytest.raises(KeyError):
        db.update([2, 8], residuals=v[:2])
    with pytest.raises(ValueError, match="repeat"):
        db.delete([2, 2])
    with pytest.raises(ValueError, match="zero"):
        db.add(torch.zeros(2, D1), v[:2])
    with pytest.raises(KeyError):
        db.get(1)
    assert len(db) == 9 and db.next_id == 12
    db.update([2, 3], residuals=v[5:7] * 3, facts=[{"n": -2}, None])
    key, residual, fact = db.get(2)  # collective: every rank receives the owner's row
    assert torch.equal(residual, v[5] * 3) and fact == {"n": -2} and db.fact(3) is None
    assert torch.allclose(key, k[2] / k[2].norm())
    assert db.fact(9) == {"n": 9}


def check_save_load_and_reshard(tmp: Path) -> None:
    import neuraldb
    import pytest

    db = neuraldb.ShardedNeuralKVDatabase(D1, D2)
    k, v = _data(30, seed=4)
    db.add(k, v, facts=[{"i": i} if i % 2 else None for i in range(30)])
    db.delete([0, 5, 7, 29])
    db.layer, db.gamma, db.template, db.config = 1, 0.4, "{} is", {"lr": 0.5}
    path = tmp / "edits.sharded"
    db.save(path)
    db.add(k[:3], v[:3])
    db.save(path)  # overwrite: the first save's shard files are gone, the manifest names the new ones
    files = sorted(p.name for p in path.iterdir())
    assert len(files) == world() + 1 and "manifest.json" in files, files
    single = db.gather()
    q = _queries(single.keys.float(), seed=5)

    back = neuraldb.ShardedNeuralKVDatabase.load(path)
    assert (back.layer, back.gamma, back.template, back.config) == (1, 0.4, "{} is", {"lr": 0.5})
    assert back.ids() == db.ids() and back.local_ids() == db.local_ids() and back.next_id == db.next_id
    assert back.get(13)[2] == {"i": 13}
    assert_matches_single(back, single, q, 0.3)
    # Each shard file is an ordinary single database.
    manifest = __import__("json").loads((path / "manifest.json").read_text())
    part = neuraldb.NeuralKVDatabase.load(path / manifest["shards"][rank()]["file"])
    assert part.ids() == db.local_ids()

    # Reshard: a group of two ranks reads the three shards and gets the same database.
    sub = dist.new_group([0, 1])
    if rank() in (0, 1):
        two = neuraldb.ShardedNeuralKVDatabase.load(path, process_group=sub)
        assert two.world_size == 2 and two.local_ids() == [i for i in db.ids() if i % 2 == rank()]
        assert_matches_single(two, single, q, 0.3)
    dist.barrier()

    # Empty shards save and load (one fact: ranks 1 and 2 hold nothing), and so does an empty database.
    for m in (1, 0):
        tiny = neuraldb.ShardedNeuralKVDatabase(D1, D2)
        tiny.add(k[:m], v[:m])
        tiny.save(tmp / f"tiny{m}")
        again = neuraldb.ShardedNeuralKVDatabase.load(tmp / f"tiny{m}")
        assert again.ids() == list(range(m)) and len(again.shard) == (m if rank() == 0 else 0)
        assert_matches_single(again, tiny.gather(), q, 0.3)

    # Errors reach every rank.
    with pytest.raises(FileNotFoundError):
        neuraldb.ShardedNeuralKVDatabase.load(tmp / "missing")
    if rank() == 0:
        os.remove(path / manifest["shards"][1]["file"])
    dist.barrier()
    with pytest.raises((FileNotFoundError, ValueError, RuntimeError)):
        neuraldb.ShardedNeuralKVDatabase.load(path)


def check_query_parallel(tmp: Path) -> None:
    import neuraldb

    d1 = 6 * world()
    db = neuraldb.ShardedNeuralKVDatabase(d1, D2, query_parallel=True)
    single = neuraldb.NeuralKVDatabase(d1, D2)
    k, v = _data(20, seed=6, d1=d1)
    db.add(k, v)
    single.add(k, v)
    q = _queries(k, seed=7)
    local = q.chunk(world(), dim=-1)[rank()]  # this rank's slice of a tensor-parallel down-projection's input
    out, ids, _score = db.retrieve(local, 0.3)
    db.query_parallel = False
    assert_matches_single(db, single, q, 0.3)
    assert torch.equal(out, db.retrieve(q, 0.3)[0]) and torch.equal(ids, db.retrieve(q, 0.3)[1])
    # A DTensor sharded along the features (what torch's RowwiseParallel hands the down-projection) is gathered
    # with full_tensor(), whatever query_parallel says.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world(),))
    dq = DTensor.from_local(local, mesh, [Shard(1)])
    out2, ids2, _ = db.retrieve(dq, 0.3)
    assert torch.equal(out2, out) and torch.equal(ids2, ids)


def check_patched_model_logits(tmp: Path) -> None:
    import neuraldb
    from _tiny_models import PATCH_LAYER, capture, per_token, prompt, tiny_model

    model = tiny_model("llama")  # seeded: the same weights on every rank
    ids = prompt(12, batch=2)
    _, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    with capture(module) as cap:
        base = model(ids).logits
    acts = per_token(cap.inputs[0], ids)
    keys = acts[:, 3:9].reshape(-1, acts.shape[-1])  # 12 positions' activations, stored as facts
    g = torch.Generator().manual_seed(8)
    residuals = torch.randn(len(keys), module.out_features, generator=g) * 3
    single = neuraldb.NeuralKVDatabase.for_model(model, PATCH_LAYER)
    single.add(keys, residuals)
    reference = tiny_model("llama")
    neuraldb.patch_model(reference, single, gamma=0.9)
    expected = reference(ids).logits

    db = neuraldb.ShardedNeuralKVDatabase.from_database(single)
    assert db.layer == PATCH_LAYER and db.local_ids() == [i for i in single.ids() if i % world() == rank()]
    neuraldb.patch_model(model, db, gamma=0.9)
    got = model(ids).logits
    assert not torch.equal(got, base)
    assert torch.equal(got, expected), (got - expected).abs().max()
    db.delete([3])
    single.delete([3])
    assert torch.equal(model(ids).logits, reference(ids).logits)
    with neuraldb.disabled(model):
        assert torch.equal(model(ids).logits, base)
    neuraldb.unpatch_model(model)


CHECKS = [
    check_random_keys_equal_single,
    check_ties_across_and_within_ranks,
    check_routing_and_errors,
    check_query_parallel,
    check_save_load_and_reshard,
    check_patched_model_logits,
]


# -- ranks that disagree (run by agreement_worker in a two-rank group, each check on a fresh subgroup) -------------

TIMEOUT = 2.0  # the database's wait for the other ranks in these checks, seconds
STALL = 20.0  # each check's subgroup times out after this: bounds a stall where nothing else does


def _call_error() -> type[BaseException]:
    """ShardedCallError; a class nothing raises where it does not exist (so these checks fail, not error, there)."""
    import neuraldb.sharded

    return getattr(neuraldb.sharded, "ShardedCallError", type("NoShardedCallError", (Exception,), {}))


def _db(group, m: int = 12):
    """``m`` facts (the same on every rank) in a database on ``group`` that waits TIMEOUT for the others."""
    import neuraldb

    db = neuraldb.ShardedNeuralKVDatabase(D1, D2, process_group=group, dtype=torch.float32)
    db.timeout = TIMEOUT
    k, v = _data(m, seed=30)
    db.add(k, v, facts=[{"i": i} for i in range(m)])
    return db


def _raising(message: str):
    """A stand-in for a step that fails on this rank only (memory running out, a kernel failing)."""

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    return fail


def _unchanged(db, ids: list[int], next_id: int, local: list[int]) -> None:
    assert db.ids() == ids and len(db) == len(ids) and db.next_id == next_id and db.local_ids() == local
    single = db.gather()  # collective: the ranks are still in step, and the shards still add up
    assert single.ids() == ids
    assert_matches_single(db, single, _queries(single.keys.float(), seed=31, t=6), 0.3)


def agree_add_with_other_arguments(tmp: Path, group) -> None:
    """Reported: 12 rows on one rank, 13 on the other, left len/next_id at 12 vs 13 with no error."""
    import pytest

    db = _db(group)
    before = (db.ids(), db.next_id, db.local_ids())
    k, v = _data(12 + rank(), seed=32)
    match = r"add: keys differs: rank 0: \(12, 24\) float32.*; rank 1: \(13, 24\)"
    with pytest.raises(_call_error(), match=match) as e:
        db.add(k, v)
    assert e.value.fields == ["keys", "residuals"] and e.value.ranks == [1], (e.value.fields, e.value.ranks)
    assert "Nothing changed on any rank" in str(e.value)
    k, v = _data(3, seed=33 + rank())  # the same shapes, other contents
    with pytest.raises(_call_error(), match=r"keys differs: rank 0: \(3, 24\) float32, contents #"):
        db.add(k, v)
    k, v = _data(3, seed=33)
    with pytest.raises(_call_error(), match=r"facts differs: rank 0: .*'r': 0.*rank 1: .*'r': 1|facts differs"):
        db.add(k, v, facts=[{"r": rank()}, None, None])
    _unchanged(db, *before)
    assert db.add(k, v) == [12, 13, 14]


def agree_add_failing_on_one_rank(tmp: Path, group) -> None:
    """Reported: a NaN key on one rank failed the add there only, leaving 12 facts vs 10. Also a failure where the
    arguments agree (memory running out on one rank): that rank's error there, and the others say which rank."""
    import pytest

    db = _db(group, 10)
    before = (db.ids(), db.next_id, db.local_ids())
    k, v = _data(2, seed=34)
    if rank() == 1:
        k[1, 3] = float("nan")
    with pytest.raises(_call_error(), match=r"keys differs.*it failed on rank 1: ValueError: keys must be finite"):
        db.add(k, v)
    _unchanged(db, *before)

    k, v = _data(4, seed=35)
    if rank() == 1:
        db.shard.stage_add = _raising("out of memory (simulated)")
    expected = RuntimeError if rank() == 1 else _call_error()
    with pytest.raises(expected, match=r"out of memory \(simulated\)" if rank() == 1 else r"add: it failed on rank 1"):
        db.add(k, v)
    db.shard.__dict__.pop("stage_add", None)
    _unchanged(db, *before)


def agree_delete_and_update_with_other_arguments(tmp: Path, group) -> None:
    """Reported: delete([rank]) left the ranks disagreeing about ids(). Likewise update, and a delete that fails on
    one rank only after its arguments agreed."""
    import pytest

    db = _db(group)
    before = (db.ids(), db.next_id, db.local_ids())
    with pytest.raises(_call_error(), match=r"delete: ids differs: rank 0: .*\[0\]\); rank 1: .*\[1\]\)") as e:
        db.delete([rank()])
    assert e.value.fields == ["ids"] and e.value.ranks == [1]
    with pytest.raises(_call_error(), match="update: residuals differs"):
        db.update([2], residuals=torch.full((1, D2), float(rank())))
    with pytest.raises(_call_error(), match="update: ids differs"):
        db.update([2 + rank()], facts=[None])
    _unchanged(db, *before)
    if rank() == 0:
        db.shard.stage_delete = _raising("out of memory (simulated)")
    with pytest.raises(RuntimeError, match=r"out of memory|delete: it failed on rank 0"):
        db.delete([0, 1])
    db.shard.__dict__.pop("stage_delete", None)
    _unchanged(db, *before)


def agree_methods_differ(tmp: Path, group) -> None:
    """One rank adds while the other retrieves: both raise at once, naming the methods."""
    import pytest

    db = _db(group)
    k, v = _data(2, seed=36)
    with pytest.raises(_call_error(), match=r"the ranks called different methods: rank 0: add; rank 1: retrieve"):
        if rank() == 0:
            db.add(k, v)
        else:
            db.retrieve(k, 0.5)
    with pytest.raises(_call_error(), match=r"get: id differs: rank 0: 0; rank 1: 1"):
        db.get(rank())
    _unchanged(db, list(range(12)), 12, [i for i in range(12) if i % 2 == rank()])


def agree_retrieve_query_rows_differ(tmp: Path, group) -> None:
    """Reported: 5 query rows on one rank, 6 on the other, stalled until the process group's timeout. Also
    through a patched model whose prompts differ in length."""
    import neuraldb
    import pytest
    from _tiny_models import PATCH_LAYER, prompt, tiny_model

    db = _db(group)
    q = _queries(_data(12, seed=30)[0], seed=37, t=6)
    with pytest.raises(_call_error(), match=r"retrieve: query rows differs: rank 0: 5; rank 1: 6") as e:
        db.retrieve(q[: 5 + rank()], 0.5)
    assert e.value.fields == ["query rows"]
    with pytest.raises(_call_error(), match=r"query dtype differs: rank 0: torch.float32; rank 1: torch.float16"):
        db.retrieve(q.half() if rank() else q, 0.5)
    model = tiny_model("llama")
    dims = (model.config.intermediate_size, model.config.hidden_size)
    patched = neuraldb.ShardedNeuralKVDatabase(*dims, process_group=group, timeout=TIMEOUT)
    k, v = _data(4, seed=38, d1=patched.key_dim, d2=patched.value_dim)
    patched.add(k, v)
    neuraldb.patch_model(model, patched, layer=PATCH_LAYER, gamma=0.5)
    with pytest.raises(_call_error(), match=r"retrieve: query rows differs: rank 0: 7; rank 1: 8"):
        model(prompt(7 + rank()))
    model(prompt(7))  # in step again
    _unchanged(db, list(range(12)), 12, [i for i in range(12) if i % 2 == rank()])


def agree_retrieve_gamma_differs(tmp: Path, group) -> None:
    """Reported: gamma 0.5 on one rank, 0.6 on the other, stalled; and gamma invalid on one rank only."""
    import pytest

    db = _db(group)
    q = _queries(_data(12, seed=30)[0], seed=39, t=6)
    with pytest.raises(_call_error(), match=r"retrieve: gamma differs: rank 0: 0.5; rank 1: 0.6") as e:
        db.retrieve(q, 0.5 + rank() / 10)
    assert e.value.fields == ["gamma"] and e.value.ranks == [1]
    with pytest.raises(_call_error(), match=r"gamma differs.*it failed on rank 1: ValueError"):
        db.retrieve(q, 0.5 if rank() == 0 else float("nan"))
    _unchanged(db, list(range(12)), 12, [i for i in range(12) if i % 2 == rank()])


def agree_retrieve_failing_on_one_rank(tmp: Path, group) -> None:
    """The local scan fails on one rank (after the arguments agreed): every rank raises, none waits."""
    import neuraldb.sharded
    import pytest

    db = _db(group)
    q = _queries(_data(12, seed=30)[0], seed=40, t=6)
    scan = neuraldb.sharded.gated_retrieval
    if rank() == 1:
        neuraldb.sharded.gated_retrieval = _raising("kernel failed (simulated)")
    try:
        for compact in (True, False):
            db.compact = compact
            match = r"kernel failed \(simulated\)" if rank() == 1 else r"retrieve: it failed on rank 1: RuntimeError"
            with pytest.raises(RuntimeError, match=match):
                db.retrieve(q, 0.3)
    finally:
        neuraldb.sharded.gated_retrieval = scan
    db.compact = True
    _unchanged(db, list(range(12)), 12, [i for i in range(12) if i % 2 == rank()])


def agree_retrieve_on_one_rank_times_out(tmp: Path, group) -> None:
    """Reported: retrieval called on one rank only stalled for the process group's timeout (30 minutes by default)
    and ended in a generic "Timed out waiting". Now it waits db.timeout and names the method."""
    import pytest

    db = _db(group)
    if rank() == 0:
        with pytest.raises(TimeoutError, match=r"retrieve: rank 0 waited 2 s .*a rank probably did not call it"):
            db.retrieve(_queries(_data(12, seed=30)[0], seed=41, t=3), 0.5)
    # The group is out of step now (rank 0's header is still posted); the worker drops it.


def agree_save_on_one_rank_times_out(tmp: Path, group) -> None:
    """Reported: save on one rank stalled for the process group's timeout."""
    import pytest

    db = _db(group)
    if rank() == 0:
        with pytest.raises(TimeoutError, match=r"save: rank 0 waited 2 s .*did not call it"):
            db.save(tmp / "one")
        assert not (tmp / "one" / "manifest.json").exists()


def agree_load_on_one_rank_times_out(tmp: Path, group) -> None:
    """``load(timeout=...)`` bounds the wait of a load that only one rank makes."""
    import neuraldb
    import pytest

    db = _db(group)
    db.save(tmp / "edits")
    if rank() == 1:
        with pytest.raises(TimeoutError, match=r"load: rank 1 waited 1.5 s"):
            neuraldb.ShardedNeuralKVDatabase.load(tmp / "edits", process_group=group, timeout=1.5)


def agree_load_checks_the_manifest_against_the_shards(tmp: Path, group) -> None:
    """Reported: a manifest claiming next_id = 2**30 made every rank allocate a 1 GiB bitmap. Claims the shard
    files do not bear out are refused, naming the field; a next_id they do bear out costs no memory of its own;
    ranks that read different manifests are told so."""
    import json

    import neuraldb
    import pytest

    db = _db(group)
    path = tmp / "edits"
    db.save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    bad = {
        "next_id": ({"next_id": 2**30}, r"the manifest's next_id \(1073741824\) is not the shard's own next_id \(12\)"),
        "count": ({"count": 13}, r"the manifest's count is 13, but the shards hold 12 rows"),
        "shards": ({"shards": [manifest["shards"][0], {**manifest["shards"][1], "count": 99}]}, r"\[1\].count is 99"),
        "huge": ({"next_id": 2**40}, r"next_id must be an int in \[0, 4294967294\]"),
    }
    for name, (change, match) in bad.items():
        if rank() == 0:
            (tmp / name).mkdir()
            for f in path.iterdir():
                (tmp / name / f.name).write_bytes(f.read_bytes())
            (tmp / name / "manifest.json").write_text(json.dumps({**manifest, **change}))
        dist.barrier(group)
        with pytest.raises((ValueError, _call_error()), match=match):
            neuraldb.ShardedNeuralKVDatabase.load(tmp / name, process_group=group)

    # Every file agrees on a next_id of 2**28 (ids are never reused, so it may lie far above the live ones): the
    # live ids cost what the shards hold, not next_id bytes.
    empty = neuraldb.ShardedNeuralKVDatabase(D1, D2, process_group=group)
    empty.shard.stage_add(torch.empty(0, D1), torch.empty(0, D2), ids=[], next_id=2**28).commit()
    empty.save(tmp / "empty")
    back = neuraldb.ShardedNeuralKVDatabase.load(tmp / "empty", process_group=group)
    assert back.next_id == 2**28 and len(back) == 0 and back.ids() == [] and 5 not in back
    assert back._live.numel() * back._live.element_size() <= 1024, back._live.shape
    k, v = _data(3, seed=42)
    assert back.add(k, v) == [2**28, 2**28 + 1, 2**28 + 2] and 2**28 + 1 in back

    # Each rank reads its own copy, and the copies differ.
    db.delete([3])
    db.save(tmp / "later")
    with pytest.raises(_call_error(), match=r"load: manifest.json differs: rank 0: #[0-9a-f]+ .*; rank 1: #"):
        neuraldb.ShardedNeuralKVDatabase.load(tmp / ("edits" if rank() == 0 else "later"), process_group=group)


AGREEMENT_CHECKS = [
    agree_add_with_other_arguments,
    agree_add_failing_on_one_rank,
    agree_delete_and_update_with_other_arguments,
    agree_methods_differ,
    agree_retrieve_query_rows_differ,
    agree_retrieve_gamma_differs,
    agree_retrieve_failing_on_one_rank,
    agree_retrieve_on_one_rank_times_out,
    agree_save_on_one_rank_times_out,
    agree_load_on_one_rank_times_out,
    agree_load_checks_the_manifest_against_the_shards,
]


def worker(local_rank: int, world_size: int, init_file: str, tmp: str, names: list[str], results: str) -> None:
    """Entry point of each spawned rank: run the named checks collectively, write 'ok' or the traceback."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=local_rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    report = Path(results) / f"rank{local_rank}.txt"
    try:
        for name in names:
            check = globals()[name]
            check(Path(tmp))
            dist.barrier()
        report.write_text("ok")
    except BaseException:
        report.write_text(f"check {name} failed on rank {local_rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def agreement_worker(
    local_rank: int, world_size: int, init_file: str, tmp: str, names: list[str], results: str
) -> None:
    """Entry point of each rank for the agreement checks: each runs on a fresh subgroup whose own timeout (STALL)
    bounds whatever it leaves waiting, and writes ``<check>.rank<r>.txt`` ('ok' or the traceback); the default
    group only brings the ranks together between checks."""
    torch.set_num_threads(1)
    init = f"file://{init_file}"
    stall = datetime.timedelta(seconds=3 * STALL)
    dist.init_process_group("gloo", init_method=init, rank=local_rank, world_size=world_size, timeout=stall)
    try:
        for name in names:
            group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=STALL))
            where = Path(tmp) / name
            where.mkdir(exist_ok=True)
            report = Path(results) / f"{name}.rank{local_rank}.txt"
            try:
                globals()[name](where, group)
                report.write_text("ok")
            except BaseException:
                report.write_text(f"check {name} failed on rank {local_rank}:\n{traceback.format_exc()}")
            dist.barrier()
            # A check that timed out left its subgroup out of step: destroying it on every rank ends what it left.
            dist.destroy_process_group(group)
    finally:
        dist.destroy_process_group()
