"""The write planning of :class:`~neuraldb.database.NeuralKVDatabase`: :class:`PendingChange`, the two-phase write,
and the plans behind ``stage_add`` and ``stage_delete`` (:func:`plan_add`, :func:`plan_swap_delete`,
:func:`plan_ordered_delete`). Each plan validates and allocates or gathers up front, under the database's lock, and
returns the ``apply`` closure that a :class:`PendingChange` runs on commit.

The functions take the database itself (``db``: its lock, storage, row bookkeeping and ids); :class:`DatabaseWrites`
holds the public write methods, which the database inherits. This module imports nothing of
:mod:`neuraldb.database`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from neuraldb.database_inputs import (
    FactLike,
    as_id,
    check_ids,
    check_new_rows,
    check_relation_keys,
    check_replacement,
    check_row_thresholds,
)
from neuraldb.database_state import MAX_ID


class PendingChange:
    """A write that :meth:`NeuralKVDatabase.stage_add` or :meth:`~NeuralKVDatabase.stage_delete` validated and
    allocated for; :meth:`commit` applies it, copying only into memory that exists. Two-phase writes let a caller
    (the sharded database) learn that a change will succeed everywhere before anything changes anywhere."""

    def __init__(self, db: Any, apply: Callable[[], Any], *, strict: bool = True) -> None:
        # strict=False: the change still applies after other writes (an append of the next ids does).
        self._db, self._apply, self._version, self._strict = db, apply, db._version, strict

    def commit(self) -> Any:
        """Apply the change (RuntimeError if the database changed since it was staged, or it was committed)."""
        with self._db._lock:
            if self._version != self._db._version and (self._strict or self._version < 0):
                raise RuntimeError("the database changed since this change was staged; stage it again")
            self._db._version += 1
            self._version = -1
            return self._apply()


def plan_add(
    db: Any,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    facts: Sequence[FactLike] | None,
    ids: Sequence[int] | None,
    next_id: int | None,
    thresholds: object = None,
    relation_keys: object = None,
) -> PendingChange:
    """``db.stage_add(...)``: the rows checked, the ids checked and the storage reserved; see its docstring."""
    k, v, fs = check_new_rows(keys, residuals, facts, key_dim=db.key_dim, value_dim=db.value_dim, dtype=db.dtype)
    m = k.shape[0]
    t = None if thresholds is None else check_row_thresholds(thresholds, m)
    rk = None if relation_keys is None else check_relation_keys(relation_keys, m, db.key_dim, db.dtype)
    given = None if ids is None else [as_id(i, "ids") for i in ids]
    if given is not None and (len(given) != m or any(b <= a for a, b in itertools.pairwise(given))):
        raise ValueError(f"ids must be {m} increasing ids, got {given[:5]}")
    with db._lock:
        start = db._next_id if given is None else given[0] if given else db._next_id
        end = start + m if given is None else given[-1] + 1 if given else db._next_id
        last = end if next_id is None else next_id
        if m and (start < db._next_id or end > last):
            raise ValueError(f"ids must lie in [next_id={db._next_id}, {last}), got [{start}, {end})")
        if end - 1 > MAX_ID or last > MAX_ID + 1:
            raise ValueError(
                f"cannot add {m} facts: their ids would pass 2**63 - 1 (ids are int64; next_id is {db._next_id})"
            )
        k, v = k.to(db.device), v.to(db.device)
        t = None if t is None else t.to(db.device)
        rk = None if rk is None else rk.to(db.device)
        db._storage.reserve(len(db) + m)
        if rk is not None:
            db._storage.enable_relations()
        sketch = db._storage.sketch_rows(k)

    def apply() -> list[int]:
        new = list(range(db._next_id, db._next_id + m)) if given is None else given
        n = len(db)
        if m:
            db._storage.reserve(n + m)  # a no-op unless another add came between staging and commit
            fresh = db._storage.sketch_buf is not None and sketch is not None and k.device == db.device
            db._storage.write(n, k.to(db.device), v.to(db.device), sketch if fresh else None, t, rk)
        for offset, (i, f) in enumerate(zip(new, fs)):
            db._rows[i] = n + offset
            db._facts[i] = f
        db._row_ids.extend(new)
        db._next_id = max(db._next_id, new[-1] + 1 if new else 0, 0 if next_id is None else next_id)
        db._storage.set_count(n + m)
        return list(new)

    return PendingChange(db, apply, strict=given is not None)


def plan_swap_delete(db: Any, id_list: list[int]) -> Callable[[], None]:
    """Deleting known ``id_list`` by swap-removes (call with the lock held): the moving rows gathered now."""
    # The swap-removes simulated on overlays of the bookkeeping (a delete of a few ids costs no copy of it).
    # A survivor moves only when it is the last row, so its original row lies in the removed tail.
    rows: dict[int, int | None] = {}
    at: dict[int, int] = {}
    n = len(db)
    src: dict[int, int] = {}
    for i in id_list:
        r = rows.get(i, db._rows[i])
        rows[i] = None
        src.pop(i, None)
        n -= 1
        last = at.get(n, db._row_ids[n])
        if last != i:
            src.setdefault(last, rows.get(last, db._rows[last]))
            at[r] = last
            rows[last] = r
    dst = [rows[i] for i in src]
    moved = db._storage.gather(list(src.values())) if src else []

    def apply() -> None:
        if src:
            db._storage.move(dst, moved)
        for i, r in rows.items():
            if r is None:
                del db._rows[i]
                del db._facts[i]
            else:
                db._rows[i] = r
        del db._row_ids[n:]
        for r, i in at.items():
            if r < n:
                db._row_ids[r] = i
        db._storage.set_count(n)

    return apply


def plan_ordered_delete(db: Any, id_list: list[int]) -> Callable[[], None]:
    """Deleting known ``id_list`` keeping id order (call with the lock held): the rows after the first hole move up."""
    if not id_list:
        return lambda: None
    gone = set(id_list)
    first = min(db._rows[i] for i in id_list)
    tail = [i for i in db._row_ids[first:] if i not in gone]
    moved = db._storage.gather([db._rows[i] for i in tail]) if tail else []

    def apply() -> None:
        if tail:
            db._storage.move(first, moved)
        for i in id_list:
            del db._rows[i]
            del db._facts[i]
        del db._row_ids[first:]
        db._row_ids.extend(tail)
        for r, i in enumerate(tail, first):
            db._rows[i] = r
        db._storage.set_count(len(db._row_ids))

    return apply


class DatabaseWrites:
    """The write methods of :class:`~neuraldb.NeuralKVDatabase` (see there): they validate, then run a plan above."""

    def add(
        self,
        keys: torch.Tensor,
        residuals: torch.Tensor,
        facts: Sequence[FactLike] | None = None,
        *,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
        relation_keys: torch.Tensor | None = None,
    ) -> list[int]:
        """Append facts; returns their new ids (increasing, never reused).

        Args:
            keys: ``(m, key_dim)`` or ``(key_dim,)``, any floating dtype, on any (non-meta) device; each row is
                normalised to unit length in fp32 before it is stored.
            residuals: ``(m, value_dim)`` or ``(value_dim,)``, finite and representable in the storage dtype.
            facts: None or one ``Fact``/``dict``/``None`` per row; dicts hold only what a save and load give back
                unchanged (str keys; str, int, float, bool, None, lists and dicts of them; no NaN), see
                :func:`neuraldb.database_inputs.fact_to_json`.
            thresholds: None (no row threshold) or the rows' gate thresholds, as for :meth:`set_thresholds`.
            relation_keys: None or ``(m, key_dim)``: each row's relation key (normalised; a zero row: none), see
                :mod:`neuraldb.relation_gate`.

        Nothing changes when any argument is invalid.
        """
        return self.stage_add(keys, residuals, facts, thresholds=thresholds, relation_keys=relation_keys).commit()

    def stage_add(
        self,
        keys: torch.Tensor,
        residuals: torch.Tensor,
        facts: Sequence[FactLike] | None = None,
        *,
        ids: Sequence[int] | None = None,
        next_id: int | None = None,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
        relation_keys: torch.Tensor | None = None,
    ) -> PendingChange:
        """:meth:`add`, validated and allocated for; ``.commit()`` appends the rows and returns their ids.

        ``ids``: the ids to give the rows (increasing, from :attr:`next_id` up) instead of the next ones, and
        ``next_id`` what :attr:`next_id` becomes (default: one past the last id) -- a shard of a sharded database
        holds some of the ids that every rank allocates.

        Example::

            >>> db = NeuralKVDatabase(4, 2)
            >>> change = db.stage_add(torch.ones(4), torch.ones(2), ids=[3], next_id=6)
            >>> change.commit(), db.next_id
            ([3], 6)
        """
        return plan_add(self, keys, residuals, facts, ids, next_id, thresholds, relation_keys)

    def update(
        self,
        ids: int | Iterable[int],
        keys: torch.Tensor | None = None,
        residuals: torch.Tensor | None = None,
        *,
        facts: Sequence[FactLike] | None = None,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
        relation_keys: torch.Tensor | None = None,
    ) -> None:
        """Replace the keys, residuals, facts, gate thresholds and/or relation keys of existing ``ids`` (rows in the
        order of ``ids``). A new key without a new threshold drops the row's threshold, which was fitted to the old
        key.

        Raises KeyError for unknown ids, ValueError for duplicates or bad rows; nothing changes on error.
        """
        id_list, k, v, fs = check_replacement(
            ids, keys, residuals, facts, key_dim=self.key_dim, value_dim=self.value_dim, dtype=self.dtype
        )
        t = None if thresholds is None else check_row_thresholds(thresholds, len(id_list))
        rk = None
        if relation_keys is not None:
            rk = check_relation_keys(relation_keys, len(id_list), self.key_dim, self.dtype)
        with self._lock:
            self._check_known(id_list)
            if not id_list:
                return
            self._storage.write_at([self._rows[i] for i in id_list], k, v, t, rk)
            if fs is not None:
                self._facts.update(zip(id_list, fs))
            self._version += 1

    def delete(self, ids: int | Iterable[int]) -> None:
        """Remove ``ids``: each hole is filled by the last row (O(1) per fact; ``ordered``: the rows after the first
        hole move up); other ids keep their facts.

        Raises KeyError for unknown ids and ValueError for duplicates; nothing changes on error.
        """
        with self._lock:
            self.stage_delete(ids).commit()

    def stage_delete(self, ids: int | Iterable[int]) -> PendingChange:
        """:meth:`delete`, validated, with the rows that move gathered already; ``.commit()`` applies it."""
        id_list = check_ids(ids)
        with self._lock:
            self._check_known(id_list)
            apply = (plan_ordered_delete if self.ordered else plan_swap_delete)(self, id_list)
        return PendingChange(self, apply)


__all__ = ["DatabaseWrites", "PendingChange", "plan_add", "plan_ordered_delete", "plan_swap_delete"]
