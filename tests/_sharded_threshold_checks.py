"""Checks of per-row gate thresholds in ``ShardedNeuralKVDatabase``, run inside every rank of a gloo process group
(see test_sharded_thresholds.py): retrieval equals one ``NeuralKVDatabase`` holding all rows with the same
thresholds, the writes keep them with their rows, conversions and files keep them, and bad thresholds change
nothing on any rank.

Each check is a function ``check(tmp: Path)`` called collectively on all ranks of a three-rank group (some also use
a two-rank subgroup); a failing assertion on any rank fails the test.
"""

from __future__ import annotations

import datetime
import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from _sharded_checks import D1, D2, _data, _queries, assert_matches_single, rank, world


def _by_id(db) -> dict[int, float]:
    """A single database's thresholds by id."""
    return dict(zip(db.ids(), db.thresholds.tolist()))


def _split_thresholds(single, queries: torch.Tensor, gamma: float, seed: int) -> torch.Tensor:
    """Thresholds for ``single``'s rows (row order) that split the gates ``queries`` open at ``gamma``: the rows
    that win an open gate get a threshold just below or just above their score, in turn; the other rows random
    ones (a third of them none)."""
    from neuraldb_kernels import gated_retrieval

    g = torch.Generator().manual_seed(seed)
    m = len(single)
    t = torch.empty(m).uniform_(-1, 1, generator=g)
    t[torch.rand(m, generator=g) < 0.3] = -1.0
    _, idx, score = gated_retrieval(queries, single.keys, single.values, gamma)
    opened = (idx >= 0) & (score > gamma)
    for n, (j, s) in enumerate(zip(idx[opened].tolist(), score[opened].tolist())):
        t[j] = min(1.0, s + 1e-3) if n % 2 else max(-1.0, s - 1e-3)
    return t


def _assert_thresholds_matter(sharded, single, queries: torch.Tensor, gamma: float) -> None:
    """The thresholds shut some gates that gamma alone opens, and leave others open (so a sharded retrieval that
    ignored them, or shut every gate, would not equal the single database's)."""
    from neuraldb_kernels import gated_retrieval

    plain = gated_retrieval(queries, single.keys, single.values, gamma)[0].ne(0).any(-1)
    got = sharded.retrieve(queries, gamma)[0].ne(0).any(-1)
    assert (plain & ~got).any(), "no gate was shut by a row's threshold: the case tests nothing"
    assert got.any(), "every gate was shut: the case tests nothing"


def check_retrieval_with_thresholds_equals_single(tmp: Path) -> None:
    import neuraldb

    db = neuraldb.ShardedNeuralKVDatabase(D1, D2)
    single = neuraldb.NeuralKVDatabase(D1, D2)
    for batch, m in enumerate([1, 37, 5]):  # after the first batch two of three shards are empty
        k, v = _data(m, seed=60 + batch)
        probe = neuraldb.NeuralKVDatabase(D1, D2)
        probe.add(k, v)
        t = _split_thresholds(probe, _queries(probe.keys.float(), seed=70 + batch), 0.3, seed=batch)
        assert db.add(k, v, thresholds=t) == single.add(k, v, thresholds=t)
        q = _queries(single.keys.float(), seed=80 + batch)
        for gamma in (-1.0, 0.3, 0.9):
            assert_matches_single(db, single, q, gamma)
    # Thresholds that split the gates of these queries, set on rows of every shard.
    t = _split_thresholds(single, q, 0.3, seed=9)
    db.set_thresholds(single.ids(), t)
    single.set_thresholds(single.ids(), t)
    _assert_thresholds_matter(db, single, q, 0.3)
    for gamma in (-1.0, 0.3, 0.9):
        assert_matches_single(db, single, q, gamma)
    for dtype in (torch.float16, torch.bfloat16):
        assert_matches_single(db, single, q.to(dtype), 0.3)
    for compact in (False, True):
        db.compact = compact
        assert_matches_single(db, single, q.reshape(2, 20, D1), 0.3)
        for backend in ("torch", None):
            assert_matches_single(db, single, q, 0.3, backend=backend)
    # And on a two-rank group holding the same rows (ranks 0 and 1; rank 2 waits at the barrier).
    sub = dist.new_group([0, 1])
    if rank() in (0, 1):
        two = neuraldb.ShardedNeuralKVDatabase.from_database(single, process_group=sub)
        assert two.world_size == 2 and _by_id(two.gather()) == _by_id(single)
        _assert_thresholds_matter(two, single, q, 0.3)
        for compact in (True, False):
            two.compact = compact
            assert_matches_single(two, single, q, 0.3)
    dist.barrier()


def check_a_winner_that_fails_its_threshold_gives_zeros(tmp: Path) -> None:
    """The global argmax row's own threshold decides: where it fails, the result is zeros with the winner's id and
    score -- never the residual of a lower-scoring (or equally scoring, higher-id) row on another shard, nor of
    another row on the winner's own shard."""
    import neuraldb

    assert world() == 3, "the ids below are placed for three ranks"
    e = torch.eye(D1)
    a, b, c, d = e[0], torch.nn.functional.normalize(e[0] + 0.2 * e[1], dim=0), e[2], e[3]
    # ids 0..9 on ranks id % 3: for query a, id 1 (rank 1, key a) beats id 0 (rank 0, key b, cosine 0.98); key c
    # is shared by ids 3, 4 and 5 (ranks 0, 1, 2); key d by ids 6 and 9, a tie inside rank 0. Ids 1, 3 and 6 win
    # their queries and get threshold 1.0, which no score passes.
    keys = torch.stack([b, a, e[5], c, c, c, d, e[6], e[7], d])
    values = torch.arange(1.0, 11.0)[:, None].repeat(1, D2)
    thresholds = [-1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0]
    db = neuraldb.ShardedNeuralKVDatabase(D1, D2, dtype=torch.float32)
    single = neuraldb.NeuralKVDatabase(D1, D2, dtype=torch.float32)
    assert db.add(keys, values, thresholds=thresholds) == single.add(keys, values, thresholds=thresholds)
    assert db.owner(9) == db.owner(6) == 0
    q = torch.stack([a, c, d, b])
    for compact in (True, False):
        db.compact = compact
        out, ids, score = db.retrieve(q, 0.5)
        assert ids.tolist() == [1, 3, 6, 0], ids
        assert score[:3].tolist() == [1.0, 1.0, 1.0]
        assert not out[:3].any(), out  # ids 1, 3 and 6 win and fail their thresholds (1.0: never passed)
        assert out[3].tolist() == [1.0] * D2  # b's own row, without a threshold
        assert_matches_single(db, single, q, 0.5)
    for compact in (True, False):
        db.compact = compact
        db.set_thresholds([1, 3, 6], [0.99, -1.0, 0.5])  # now they pass
        single.set_thresholds([1, 3, 6], [0.99, -1.0, 0.5])
        out, ids, _ = db.retrieve(q, 0.5)
        assert ids.tolist() == [1, 3, 6, 0] and out[:, 0].tolist() == [2.0, 4.0, 7.0, 1.0]
        assert_matches_single(db, single, q, 0.5)
        db.set_thresholds([1, 3, 6], 1.0)
        single.set_thresholds([1, 3, 6], 1.0)
        assert_matches_single(db, single, q, 0.5)
    # A threshold at or below gamma changes nothing.
    db.set_thresholds([1, 3, 6], 0.5)
    out, _, _ = db.retrieve(q, 0.5)
    assert out[:, 0].tolist() == [2.0, 4.0, 7.0, 1.0]


def check_writes_keep_thresholds_with_their_rows(tmp: Path) -> None:
    import neuraldb

    db = neuraldb.ShardedNeuralKVDatabase(D1, D2)
    single = neuraldb.NeuralKVDatabase(D1, D2, ordered=True)  # rows in id order, as the sharded database's
    k, v = _data(20, seed=90)

    def both(method: str, *args, **kwargs) -> None:
        assert getattr(db, method)(*args, **kwargs) == getattr(single, method)(*args, **kwargs)

    def same() -> None:
        gathered = db.gather()
        assert gathered.ids() == single.ids() and torch.equal(gathered.thresholds, single.thresholds)
        by_id = _by_id(single)
        assert db.shard.thresholds.tolist() == [by_id[i] for i in db.local_ids()]
        assert_matches_single(db, single, _queries(single.keys.float(), seed=91), 0.3)

    both("add", k[:6], v[:6], thresholds=0.25)
    both("add", k[6:12], v[6:12], thresholds=[0.1 * i for i in range(6)])
    both("add", k[12:16], v[12:16])
    both("add", k[16:20], v[16:20], thresholds=torch.tensor([0.9, -1.0, 0.95, 0.99]))
    same()
    assert _by_id(single)[3] == 0.25 and _by_id(single)[14] == -1.0 and _by_id(single)[19] != -1.0
    both("set_thresholds", [1, 5, 13, 14], [0.5, -1.0, 0.97, 0.6])
    both("set_thresholds", 2, 0.95)
    both("update", [6, 7], residuals=v[:2] * 2)  # keeps the thresholds
    both("update", [8, 16], keys=k[:2])  # a new key drops them
    both("update", [9, 17], keys=k[2:4], thresholds=[0.8, 0.85])
    both("update", [10], thresholds=0.4)
    both("update", [11], facts=[{"f": 11}])
    same()
    by_id = _by_id(single)
    assert by_id[7] == _by_id(db.gather())[7] != -1.0 and by_id[8] == by_id[16] == -1.0 and by_id[10] != -1.0
    both("delete", [0, 4, 11, 13])  # each owner compacts its tail: the thresholds move with their rows
    same()
    both("add", k[:3], v[:3], thresholds=[0.3, 0.6, 0.9])
    both("set_thresholds", [], [])
    same()


def check_thresholds_survive_conversions_and_files(tmp: Path) -> None:
    import neuraldb
    from safetensors import safe_open

    single = neuraldb.NeuralKVDatabase(D1, D2)
    k, v = _data(30, seed=100)
    single.add(k, v)
    single.delete([0, 5, 7])  # swap-removes: the rows leave id order, so from_database must follow the rows
    live = single.ids()
    assert live != sorted(live)
    single.set_thresholds(live, [-1.0 if i % 4 == 0 else (i * 37 % 20) / 20 for i in live])
    q = _queries(single.keys.float(), seed=101)

    db = neuraldb.ShardedNeuralKVDatabase.from_database(single)
    in_order = db.gather()
    assert in_order.ids() == sorted(live) and _by_id(in_order) == _by_id(single)
    assert db.shard.thresholds.tolist() == [_by_id(single)[i] for i in db.local_ids()]
    assert_matches_single(db, in_order, q, 0.3)
    out, ids, _ = db.retrieve(q, 0.3)
    # Against the unordered database itself: the same rows win, but for the last query (zero: every score ties, and
    # its lowest row is not its lowest id).
    ref_out, ref_idx, _ = single.retrieve(q, 0.3)
    assert torch.equal(out, ref_out) and ids[:-1].tolist() == [live[j] for j in ref_idx[:-1].tolist()]

    path = tmp / "thresholds.sharded"
    db.save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1, "the manifest does not change: the shard files carry the thresholds"
    part = neuraldb.NeuralKVDatabase.load(path / manifest["shards"][rank()]["file"])
    assert part.ids() == db.local_ids() and torch.equal(part.thresholds, db.shard.thresholds)
    back = neuraldb.ShardedNeuralKVDatabase.load(path)
    assert back.local_ids() == db.local_ids() and torch.equal(back.shard.thresholds, db.shard.thresholds)
    assert _by_id(back.gather()) == _by_id(single)
    assert_matches_single(back, in_order, q, 0.3)

    # Reshard: two ranks read the three shards, each keeping its rows' thresholds.
    sub = dist.new_group([0, 1])
    if rank() in (0, 1):
        two = neuraldb.ShardedNeuralKVDatabase.load(path, process_group=sub)
        assert two.local_ids() == [i for i in sorted(live) if i % 2 == rank()]
        assert two.shard.thresholds.tolist() == [_by_id(single)[i] for i in two.local_ids()]
        assert _by_id(two.gather()) == _by_id(single)
        assert_matches_single(two, in_order, q, 0.3)
    dist.barrier()

    # Thresholds on rank 0's rows only: its file is format_version 2, the others' stay 1 (no thresholds tensor),
    # and a load gives each rank back exactly its rows' thresholds.
    some = neuraldb.ShardedNeuralKVDatabase(D1, D2)
    some.add(k[:7], v[:7])
    some.set_thresholds([0, 3, 6], [0.5, 0.6, 0.7])
    some.save(tmp / "some")
    files = json.loads((tmp / "some" / "manifest.json").read_text())["shards"]
    with safe_open(str(tmp / "some" / files[rank()]["file"]), "pt") as f:
        header = json.loads(f.metadata()["neuraldb"])
        assert header["format_version"] == (2 if rank() == 0 else 1) and ("thresholds" in set(f.keys())) == (
            rank() == 0
        )
    again = neuraldb.ShardedNeuralKVDatabase.load(tmp / "some")
    assert torch.equal(again.shard.thresholds, some.shard.thresholds)
    if rank():
        assert again.shard.state().thresholds is None
    gathered = again.gather()
    assert gathered.ids() == list(range(7))
    assert torch.equal(gathered.thresholds, torch.tensor([0.5, -1.0, -1.0, 0.6, -1.0, -1.0, 0.7]))
    # gather of a database without thresholds holds none (its file would stay format_version 1).
    plain = neuraldb.ShardedNeuralKVDatabase(D1, D2)
    plain.add(k[:4], v[:4])
    assert plain.gather().state().thresholds is None


def check_bad_thresholds_change_nothing_on_any_rank(tmp: Path) -> None:
    import neuraldb
    import pytest
    from neuraldb.sharded import ShardedCallError

    db = neuraldb.ShardedNeuralKVDatabase(D1, D2, dtype=torch.float32)
    k, v = _data(9, seed=110)
    db.add(k, v, thresholds=[0.5] * 9)
    db.set_thresholds([4], -1.0)

    def snapshot() -> tuple:
        s = db.shard
        return db.ids(), db.next_id, db.local_ids(), s.thresholds, s.keys.clone(), s.values.clone()

    before = snapshot()
    expected = {i: (-1.0 if i == 4 else 0.5) for i in range(9)}
    q = _queries(db.gather().keys.float(), seed=111, t=8)
    reference = db.retrieve(q, 0.3)

    def unchanged() -> None:
        now = snapshot()
        assert now[:3] == before[:3]
        assert all(torch.equal(a, b) for a, b in zip(now[3:], before[3:]))
        assert _by_id(db.gather()) == expected
        assert all(torch.equal(a, b) for a, b in zip(db.retrieve(q, 0.3), reference))

    # Bad on every rank: each raises its own error, naming the argument.
    everywhere = [
        (lambda: db.add(k[:2], v[:2], thresholds=[2.0, 0.0]), ValueError, r"thresholds must be finite .*\[-1, 1\]"),
        (lambda: db.add(k[:2], v[:2], thresholds=[0.5]), ValueError, "thresholds must hold one threshold per row"),
        (lambda: db.add(k[:2], v[:2], thresholds="0.5"), TypeError, "thresholds must be"),
        (lambda: db.add(k[:2], v[:2], thresholds=True), TypeError, "thresholds must be"),
        (
            lambda: db.update([1, 2], residuals=v[:2], thresholds=[0.1]),
            ValueError,
            "thresholds must hold .* expected 2",
        ),
        (lambda: db.update([1, 2], keys=k[:2], thresholds=[0.1, float("nan")]), ValueError, r"thresholds .*\[-1, 1\]"),
        (lambda: db.update([1, 99], thresholds=0.1), KeyError, "99"),
        (lambda: db.set_thresholds([1, 2], [0.5, 1.5]), ValueError, r"thresholds must be finite .*\[-1, 1\]"),
        (lambda: db.set_thresholds([1, 2], torch.zeros(2, dtype=torch.bool)), TypeError, "thresholds must hold"),
        (lambda: db.set_thresholds([1, 2], torch.zeros(2, 2)), ValueError, "thresholds must hold one threshold"),
        (lambda: db.set_thresholds([1, 2], None), TypeError, "thresholds must be"),
        (lambda: db.set_thresholds([1, 100], 0.5), KeyError, "100"),
        (lambda: db.set_thresholds([1, 1], 0.5), ValueError, "repeat"),
    ]
    for call, error, match in everywhere:
        with pytest.raises(error, match=match):
            call()
        unchanged()

    # Bad on one rank only (every rank validates every row, also those it does not own): every rank raises.
    t = [0.5, float("nan")] if rank() == 1 else [0.5, 0.6]
    with pytest.raises(
        ShardedCallError, match=r"set_thresholds: thresholds differs.*failed on rank 1: ValueError"
    ) as e:
        db.set_thresholds([1, 2], t)
    assert e.value.fields == ["thresholds"] and e.value.ranks == [1], (e.value.fields, e.value.ranks)
    t = [1.5, 0.0, 0.0] if rank() == 2 else [0.5, 0.0, 0.0]  # row 0 of the add is id 9, owned by rank 0
    with pytest.raises(ShardedCallError, match=r"add: thresholds differs.*it failed on rank 2: ValueError"):
        db.add(k[:3], v[:3], thresholds=t)
    unchanged()
    # Valid but different on the ranks.
    with pytest.raises(ShardedCallError, match=r"add: thresholds differs") as e:
        db.add(k[:3], v[:3], thresholds=0.1 * rank())
    assert e.value.fields == ["thresholds"] and e.value.ranks == [1, 2]
    with pytest.raises(ShardedCallError, match=r"update: thresholds differs"):
        db.update([3, 5], thresholds=[0.2, 0.3 + rank() / 10])
    with pytest.raises(ShardedCallError, match=r"set_thresholds: ids differs"):
        db.set_thresholds([rank()], 0.7)
    unchanged()

    # The same thresholds in other forms agree: one number, a list, a tensor.
    form = (0.75, [0.75, 0.75], torch.tensor([0.75, 0.75], dtype=torch.float64))[rank()]
    db.set_thresholds([1, 2], form)
    assert {i: t for i, t in _by_id(db.gather()).items() if i in (1, 2)} == {1: 0.75, 2: 0.75}


THRESHOLD_CHECKS = [
    check_retrieval_with_thresholds_equals_single,
    check_a_winner_that_fails_its_threshold_gives_zeros,
    check_writes_keep_thresholds_with_their_rows,
    check_thresholds_survive_conversions_and_files,
    check_bad_thresholds_change_nothing_on_any_rank,
]


def threshold_worker(
    local_rank: int, world_size: int, init_file: str, tmp: str, names: list[str], results: str
) -> None:
    """Entry point of each spawned rank: run the named checks collectively, each writing
    ``<check>.rank<r>.txt`` ('ok' or the traceback). A check that fails on one rank may leave the others waiting
    in a collective: the group's timeout ends that, and the later checks are skipped."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=local_rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for name in names:
            where = Path(tmp) / name
            where.mkdir(exist_ok=True)
            report = Path(results) / f"{name}.rank{local_rank}.txt"
            try:
                globals()[name](where)
                report.write_text("ok")
            except BaseException:
                report.write_text(f"check {name} failed on rank {local_rank}:\n{traceback.format_exc()}")
                raise
            dist.barrier()
    finally:
        dist.destroy_process_group()
