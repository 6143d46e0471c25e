"""The agreement checks of ``ShardedNeuralKVDatabase``: ranks that call it with different arguments, fail on one
rank only, or never call. Each runs in a two-rank gloo group on a fresh subgroup (see test_sharded.py); the
helpers shared with the equivalence checks are in _sharded_checks.py.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from _sharded_checks import D1, D2, _data, _queries, assert_matches_single, rank

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
    import neuraldb.sharded_retrieval
    import pytest

    db = _db(group)
    q = _queries(_data(12, seed=30)[0], seed=40, t=6)
    scan = neuraldb.sharded_retrieval.gated_retrieval
    if rank() == 1:
        neuraldb.sharded_retrieval.gated_retrieval = _raising("kernel failed (simulated)")
    try:
        for compact in (True, False):
            db.compact = compact
            match = r"kernel failed \(simulated\)" if rank() == 1 else r"retrieve: it failed on rank 1: RuntimeError"
            with pytest.raises(RuntimeError, match=match):
                db.retrieve(q, 0.3)
    finally:
        neuraldb.sharded_retrieval.gated_retrieval = scan
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
