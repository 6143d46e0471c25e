"""The collective writes of a :class:`~neuraldb.sharded.ShardedNeuralKVDatabase` (``add``/``update``/``delete``/
``set_thresholds``: validate and stage on every rank, agree, then commit) and its construction from rows
(``from_database``, ``fill``), as functions its methods call.

Per-row gate thresholds are validated whole on every rank (:func:`~neuraldb.database_inputs.check_row_thresholds`,
so an error names ``thresholds``), agreed on as a float32 tensor (one number and the same number repeated agree)
and kept by the owner of each row, in its shard's storage, where the shard's own writes keep them with their rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.database import NeuralKVDatabase
from neuraldb.database_inputs import (
    FactLike,
    as_rows,
    check_ids,
    check_new_rows,
    check_replacement,
    check_row_thresholds,
)
from neuraldb.database_state import METADATA as _METADATA
from neuraldb.database_storage import NO_THRESHOLD
from neuraldb.sharded_agreement import MAX_IDS, _agree_call, _as_timeout, _header_device, _json_field, _tensor_field

# Initial capacity of the sorted live ids (it doubles as facts are added). Sorted ids rather than a bitmap over
# [0, next_id): their size is what the shards hold, where a bitmap's is whatever next_id a manifest claims.
_MIN_LIVE = 64


def _thresholds_field(thresholds: object, checked: torch.Tensor | None) -> tuple[str, int, str]:
    """The agreement field of a ``thresholds`` argument: the checked float32 tensor where it was valid (so ``0.5``
    and ``[0.5, 0.5]`` agree, as they mean the same), else the argument as given."""
    if checked is not None:
        return _tensor_field("thresholds", checked)
    return _json_field("thresholds", thresholds)


def _picked(t: torch.Tensor | None, sel: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.index_select(0, sel.to(t.device))


def add(
    db: Any,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    facts: Sequence[FactLike] | None = None,
    *,
    thresholds: object = None,
) -> list[int]:
    """The body of :meth:`ShardedNeuralKVDatabase.add`."""
    with db.lock:
        first, m, error, change, t = db.next_id, 0, None, None, None
        try:
            # Validated whole on every rank; the shard normalises its own raw rows, once, as the single database.
            _, _, fs = check_new_rows(
                keys, residuals, facts, key_dim=db.key_dim, value_dim=db.value_dim, dtype=db.dtype
            )
            k = as_rows("keys", keys, db.key_dim, "key_dim")
            v = as_rows("residuals", residuals, db.value_dim, "value_dim")
            m = k.shape[0]
            t = None if thresholds is None else check_row_thresholds(thresholds, m)
            if first + m > MAX_IDS:
                raise ValueError(f"a sharded database holds at most {MAX_IDS} ids over its lifetime")
            mine = list(range((db.rank - first) % db.world_size, m, db.world_size))
            sel = torch.tensor(mine, dtype=torch.long)
            change = db._shard.stage_add(
                k.index_select(0, sel.to(k.device)),
                v.index_select(0, sel.to(v.device)),
                [fs[j] for j in mine],
                ids=[first + j for j in mine],
                next_id=first + m,
                thresholds=_picked(t, sel),
            )
            db._grow_live(db._count + m)
            new_live = torch.arange(first, first + m)
        except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
            error = exc
        fields = [
            _tensor_field("keys", keys),
            _tensor_field("residuals", residuals),
            _json_field("facts", facts),
            _thresholds_field(thresholds, t),
        ]
        db._check_call("add", fields, error)
        new_ids = list(range(first, first + m))
        if m == 0:
            return new_ids
        change.commit()
        db._live[db._count : db._count + m] = new_live
        db._count += m
        db._version += 1
    return new_ids


def update(
    db: Any,
    ids: int | Iterable[int],
    keys: torch.Tensor | None = None,
    residuals: torch.Tensor | None = None,
    *,
    facts: Sequence[FactLike] | None = None,
    thresholds: object = None,
) -> None:
    """The body of :meth:`ShardedNeuralKVDatabase.update`."""
    with db.lock:
        error, id_list, mine, k, v, t = None, None, [], None, None, None
        try:
            # Validated here, on this rank, rather than in the shard's update; the shard normalises the raw rows
            # itself, once, as the single database does.
            id_list, _, _, fs = check_replacement(
                ids, keys, residuals, facts, key_dim=db.key_dim, value_dim=db.value_dim, dtype=db.dtype
            )
            k = None if keys is None else as_rows("keys", keys, db.key_dim, "key_dim")
            v = None if residuals is None else as_rows("residuals", residuals, db.value_dim, "value_dim")
            t = None if thresholds is None else check_row_thresholds(thresholds, len(id_list))
            db._check_live(id_list)
            mine = [j for j, i in enumerate(id_list) if db.owner(i) == db.rank]
        except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
            error = exc
        fields = [
            _json_field("ids", ids if id_list is None else id_list),
            _tensor_field("keys", keys),
            _tensor_field("residuals", residuals),
            _json_field("facts", facts),
            _thresholds_field(thresholds, t),
        ]
        db._check_call("update", fields, error)
        if not mine:
            return
        # The raw rows: the shard normalises them once, as the single database does.
        sel = torch.tensor(mine, dtype=torch.long)
        db._shard.update(
            [id_list[j] for j in mine],
            None if k is None else k.index_select(0, sel.to(k.device)),
            None if v is None else v.index_select(0, sel.to(v.device)),
            facts=None if fs is None else [fs[j] for j in mine],
            thresholds=_picked(t, sel),
        )


def set_thresholds(db: Any, ids: int | Iterable[int], thresholds: object) -> None:
    """The body of :meth:`ShardedNeuralKVDatabase.set_thresholds`."""
    with db.lock:
        error, id_list, mine, t = None, None, [], None
        try:
            id_list = check_ids(ids)
            t = check_row_thresholds(thresholds, len(id_list))
            db._check_live(id_list)
            mine = [j for j, i in enumerate(id_list) if db.owner(i) == db.rank]
        except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
            error = exc
        fields = [_json_field("ids", ids if id_list is None else id_list), _thresholds_field(thresholds, t)]
        db._check_call("set_thresholds", fields, error)
        if not mine:
            return
        sel = torch.tensor(mine, dtype=torch.long)
        db._shard.set_thresholds([id_list[j] for j in mine], _picked(t, sel))


def delete(db: Any, ids: int | Iterable[int]) -> None:
    """The body of :meth:`ShardedNeuralKVDatabase.delete`."""
    with db.lock:
        error, id_list, plan, kept = None, None, None, None
        try:
            id_list = check_ids(ids)
            db._check_live(id_list)
            plan = db._shard.stage_delete([i for i in id_list if db.owner(i) == db.rank])
            live = db._live[: db._count]
            kept = live[~torch.isin(live, torch.tensor(id_list, dtype=torch.int64))]
        except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
            error = exc
        db._check_call("delete", [_json_field("ids", ids if id_list is None else id_list)], error)
        if not id_list:
            return
        plan.commit()
        db._live[: len(kept)] = kept
        db._count = len(kept)
        db._version += 1


def from_database(
    cls: Any,
    db: NeuralKVDatabase,
    *,
    process_group: Any = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> Any:
    """The body of :meth:`ShardedNeuralKVDatabase.from_database`."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ShardedNeuralKVDatabase.from_database needs torch.distributed initialised")
    is_db = isinstance(db, NeuralKVDatabase)
    with db.lock if is_db else contextlib.nullcontext():
        error, out = None, None
        try:
            if not is_db:
                raise TypeError(f"db must be a neuraldb.NeuralKVDatabase, got {type(db).__name__}")
            if db.relation_keys is not None and db.relation_gate is not None:
                # with the gate off the keys are inert: the shards go without them
                raise ValueError(
                    "db.relation_gate is on (its rows' relation or previous-token keys), which the sharded database "
                    "does not carry yet: set db.relation_gate = None to shard it without the gate"
                )
            out = cls(
                db.key_dim,
                db.value_dim,
                process_group=process_group,
                dtype=db.dtype,
                device=db.device if device is None else device,
                **kwargs,
            )
            ids = db.ids()
            rows = [db.row(i) for i in ids]
            fill(out, ids, db.keys, db.values, [db.fact(i) for i in ids], rows, db.next_id, thresholds=db.thresholds)
            for name in _METADATA:
                setattr(out, name, getattr(db, name))
        except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
            error = exc
        fields = [
            _json_field("ids", db.ids() if is_db else None),
            ("next_id", db.next_id if is_db else -1, db.next_id if is_db else None),
            _tensor_field("keys", db.keys if is_db else None),
            _tensor_field("values", db.values if is_db else None),
            _tensor_field("thresholds", db.thresholds if is_db else None),
            _json_field("facts", [db.fact(i) for i in db.ids()] if is_db else None),
            _json_field("metadata", {name: getattr(db, name) for name in _METADATA} if is_db else None),
            _json_field("kwargs", {k: str(v) for k, v in kwargs.items() if k != "timeout"}),
        ]
        where = torch.device(device if device is not None else db.device if is_db else "cpu")
        timeout = _as_timeout(kwargs.get("timeout"))
        _agree_call(process_group, _header_device(process_group, where), "from_database", fields, error, timeout)
    assert out is not None
    return out


def fill(
    db: Any,
    ids: list[int],
    keys: torch.Tensor,
    values: torch.Tensor,
    facts: list[FactLike],
    rows: list[int],
    next_id: int,
    *,
    live: list[int] | None = None,
    thresholds: torch.Tensor | None = None,
) -> None:
    """Restore ``db`` from all live rows (any order; ``rows[j]`` is the row of ``ids[j]`` in ``keys``, ``values``
    and ``thresholds``, the rows' float32 gate thresholds or None): ``from_database`` and ``load``. ``live``: every
    live id when ``ids`` holds only some of them (a load that read only this rank's shard)."""
    mine = sorted((i, r, f) for i, r, f in zip(ids, rows, facts) if db.owner(i) == db.rank)
    sel = torch.tensor([r for _, r, _ in mine], dtype=torch.long, device=keys.device)
    t = _picked(thresholds, sel)
    if t is not None and not bool((t > NO_THRESHOLD).any()):
        t = None  # none of this rank's rows has one: the state says so with None
    state = db._shard.state().replace(
        keys=keys.index_select(0, sel).to(db.device),
        values=values.index_select(0, sel).to(db.device),
        ids=[i for i, _, _ in mine],
        facts=[f for _, _, f in mine],
        next_id=next_id,
        thresholds=None if t is None else t.to(db.device),
    )
    db._shard = NeuralKVDatabase.from_state(state, ordered=True)
    live = sorted(ids if live is None else live)
    db._live = torch.tensor(live, dtype=torch.int64) if live else torch.empty(_MIN_LIVE, dtype=torch.int64)
    db._count = len(live)
    db._version += 1
