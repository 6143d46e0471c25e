"""Per-row gate thresholds in ShardedNeuralKVDatabase: the checks in _sharded_threshold_checks.py run in one spawned
three-rank gloo group (some on a two-rank subgroup of it), plus a one-rank group in this process."""

from __future__ import annotations

from pathlib import Path

import _sharded_checks as checks
import _sharded_threshold_checks as threshold_checks
import pytest
import torch
from test_sharded import _spawn

WORLD = 3


@pytest.fixture(scope="module")
def threshold_reports(tmp_path_factory) -> Path:
    """Every check of THRESHOLD_CHECKS, run once in one spawned three-rank gloo group (starting it is the slow part).
    A rank that fails fails the spawn; the reports say which check."""
    names = [c.__name__ for c in threshold_checks.THRESHOLD_CHECKS]
    where = tmp_path_factory.mktemp("thresholds")
    try:
        _spawn(where, names, world=WORLD, worker=threshold_checks.threshold_worker)
    except pytest.fail.Exception:
        pass  # the per-check tests below report what failed
    return where / "results"


@pytest.mark.parametrize("name", [c.__name__ for c in threshold_checks.THRESHOLD_CHECKS])
def test_sharded_thresholds(threshold_reports, name):
    """Retrieval with thresholds equals the single database's (3 and 2 ranks, compact or not, every dtype and
    backend); a winner failing its own threshold gives zeros, never another shard's row; add/update/set_thresholds/
    delete keep them with their rows; from_database, gather, save/load and resharding keep them; bad thresholds raise
    on every rank, naming the argument, and change nothing."""
    reports = [threshold_reports / f"{name}.rank{r}.txt" for r in range(WORLD)]
    failed = [p.read_text() if p.exists() else f"{p.name}: no report (an earlier check failed)" for p in reports]
    failed = [text for text in failed if text != "ok"]
    assert not failed, "\n".join(failed)


def test_one_rank_group_keeps_and_enforces_thresholds(tmp_path):
    """world_size 1 (retrieve takes its own path, without collectives): the single database's answers."""
    import neuraldb
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        single = neuraldb.NeuralKVDatabase(checks.D1, checks.D2)
        k, v = checks._data(25, seed=9)
        single.add(k, v)
        single.delete([3])  # a swap-remove: rows leave id order
        q = checks._queries(single.keys.float(), seed=3)
        t = threshold_checks._split_thresholds(single, q, 0.3, seed=1)
        single.set_thresholds(single.ids(), t)
        db = neuraldb.ShardedNeuralKVDatabase.from_database(single)
        in_order = db.gather()
        assert threshold_checks._by_id(in_order) == threshold_checks._by_id(single)
        threshold_checks._assert_thresholds_matter(db, in_order, q, 0.3)
        checks.assert_matches_single(db, in_order, q, 0.3)
        db.save(tmp_path / "one")
        back = neuraldb.ShardedNeuralKVDatabase.load(tmp_path / "one")
        assert torch.equal(back.shard.thresholds, in_order.thresholds)
        checks.assert_matches_single(back, in_order, q, 0.3)
        back.set_thresholds(back.ids()[:5], 1.0)
        in_order.set_thresholds(in_order.ids()[:5], 1.0)
        back.add(k[:2], v[:2], thresholds=[0.5, -1.0])
        in_order.add(k[:2], v[:2], thresholds=[0.5, -1.0])
        back.update(back.ids()[5:7], keys=k[5:7])
        in_order.update(in_order.ids()[5:7], keys=k[5:7])
        checks.assert_matches_single(back, in_order, q, 0.3)
        with pytest.raises(ValueError, match="thresholds must be finite"):
            back.set_thresholds(back.ids()[:1], 2.0)
        assert torch.equal(back.gather().thresholds, in_order.thresholds)
    finally:
        dist.destroy_process_group()
