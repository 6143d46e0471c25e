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
    """``sharded.retrieve`` equals the single database's ``retrieve`` (``gated_retrieval`` with its per-row gate
    thresholds), bit for bit."""
    assert sharded.ids() == single.ids(), "the single database must hold the same ids in id order"
    out, ids, score = sharded.retrieve(queries, gamma, **kwargs)
    ref_out, ref_idx, ref_score = single.retrieve(queries, gamma, **kwargs)
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
