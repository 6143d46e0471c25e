"""ShardedNeuralKVDatabase on CPU with gloo: the checks in _sharded_checks.py run in one spawned 3-rank group
(starting processes dominates the cost), plus single-process tests of the (score, id) packing and the errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _sharded_agreement_checks as agreement_checks
import _sharded_checks as checks
import pytest
import torch
from neuraldb.sharded import pack_score_id, unpack_score_id

WORLD = 3


def _spawn(tmp_path: Path, names: list[str], world: int = WORLD, worker=checks.worker, deadline: float = 900) -> Path:
    """Run ``worker`` on ``world`` spawned gloo ranks; returns the folder of their reports. Fails the test if a rank
    fails, or when ``deadline`` seconds pass (then the ranks are terminated)."""
    import time

    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    # Children inherit sys.path via spawn's preparation data; make sure tests/ (for the checks module) is on it.
    here = str(Path(__file__).parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(
            worker,
            args=(world, str(tmp_path / "store"), str(data), names, str(results)),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        end = time.monotonic() + deadline
        while not ctx.join(timeout=5):
            if time.monotonic() > end:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail(f"the ranks did not finish within {deadline} s", pytrace=False)
    except Exception:
        reports = "\n".join(p.read_text() for p in sorted(results.glob("*.txt")) if p.read_text() != "ok")
        pytest.fail(f"a rank failed:\n{reports}", pytrace=False)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return results


def test_sharded_database_in_a_three_rank_gloo_group(tmp_path):
    """Random keys == the single database; ties across and within ranks; empty shards; add/update/delete routed to
    the owner; save/load and resharding 3 -> 2 ranks; query-parallel gathering; a patched model's logits."""
    results = _spawn(tmp_path, [c.__name__ for c in checks.CHECKS])
    assert sorted(p.name for p in results.iterdir()) == [f"rank{r}.txt" for r in range(WORLD)]
    assert all(p.read_text() == "ok" for p in results.iterdir())


@pytest.fixture(scope="module")
def agreement_reports(tmp_path_factory) -> Path:
    """Every check of AGREEMENT_CHECKS, run once in one spawned two-rank gloo group (starting it is the slow part)."""
    names = [c.__name__ for c in agreement_checks.AGREEMENT_CHECKS]
    return _spawn(tmp_path_factory.mktemp("agreement"), names, world=2, worker=agreement_checks.agreement_worker)


@pytest.mark.parametrize("name", [c.__name__ for c in agreement_checks.AGREEMENT_CHECKS])
def test_ranks_that_disagree_fail_together(agreement_reports, name):
    """Ranks that call a collective method with other arguments, or where it fails on one rank, or that leave a
    rank waiting: every rank raises (within db.timeout), naming the method, the field and the ranks, and no rank's
    database changes. The cases are in _sharded_agreement_checks.py."""
    reports = [agreement_reports / f"{name}.rank{r}.txt" for r in range(2)]
    failed = [p.read_text() if p.exists() else f"{p.name}: no report" for p in reports]
    failed = [text for text in failed if text != "ok"]
    assert not failed, "\n".join(failed)


def test_pack_orders_by_score_then_lowest_id():
    scores = torch.tensor(
        [float("-inf"), -1.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.999, 1.0, 1.0, 1.0, float("-inf")]
    )
    ids = torch.tensor([-1, 7, 3, 2, 9, 4, 5, 6, 8, 2**32 - 2, 11, 0, 5])
    key = pack_score_id(scores, ids)
    back_score, back_id = unpack_score_id(key)
    assert torch.equal(back_id, ids)
    assert torch.equal(back_score, scores + 0.0)  # -0.0 comes back as +0.0, which compares equal
    order = sorted(range(len(ids)), key=lambda i: (float(scores[i]), -int(ids[i])))
    assert torch.argsort(key).tolist() == order
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1000, generator=g).clamp(-1, 1)
    s[::7] = s[1::7]  # plenty of equal scores
    i = torch.randint(0, 2**31, (1000,), generator=g)
    k = pack_score_id(s, i)
    for a, b in torch.randint(0, 1000, (2000, 2), generator=g).tolist():
        want = (float(s[a]), -int(i[a])) > (float(s[b]), -int(i[b]))
        assert bool(k[a] > k[b]) == want


def test_needs_an_initialised_process_group():
    import neuraldb

    with pytest.raises(RuntimeError, match="init_process_group"):
        neuraldb.ShardedNeuralKVDatabase(8, 4)


def test_one_rank_group_in_process(tmp_path):
    """world_size 1 (no collectives in retrieve): the same answers as the single database, in this process."""
    import neuraldb
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        single = neuraldb.NeuralKVDatabase(checks.D1, checks.D2)
        k, v = checks._data(25, seed=9)
        single.add(k, v)
        single.delete([3])  # a swap-remove: rows leave id order ...
        db = neuraldb.ShardedNeuralKVDatabase.from_database(single)
        in_order = db.gather()  # ... the equivalent database puts them back
        assert db.ids() == in_order.ids() == sorted(single.ids()) and len(db) == 24
        checks.assert_matches_single(db, in_order, checks._queries(k, seed=3), 0.3)
        db.save(tmp_path / "one")
        # a save killed after writing its shard but before its manifest leaves a file no manifest names; the next
        # save removes it (and the previous save's shard), and leaves files that are not shards alone
        orphan = tmp_path / "one" / "shard-00000-of-00001-0123456789ab.safetensors"
        orphan.write_bytes(b"half")
        (tmp_path / "one" / "notes.txt").write_text("mine")
        db.save(tmp_path / "one")
        assert len(list((tmp_path / "one").glob("shard-*"))) == 1 and not orphan.exists()
        assert (tmp_path / "one" / "notes.txt").exists()
        back = neuraldb.ShardedNeuralKVDatabase.load(tmp_path / "one")
        checks.assert_matches_single(back, in_order, checks._queries(k, seed=4), 0.3)
    finally:
        dist.destroy_process_group()
