"""``NeuralKVDatabase``: the edit memory, unit-norm keys and residual values with stable ids and fact metadata.

The object and its public surface: ids, facts and metadata here; the tensors in a :class:`~neuraldb.database_storage.
RowStorage`; everything it holds as one :class:`~neuraldb.database_state.DatabaseState` (``db.state()`` and
``NeuralKVDatabase.from_state``), through which the file format (:mod:`neuraldb.database_io`) and the sharded database
work. Deleting swaps the last row into the hole (O(1) per fact; ``ordered=True`` shifts the rows after it instead,
keeping rows in id order); ids never change and are never reused.

Over 400 lines because the database is one object with a documented public surface: its writes and its read path
share the lock, the row bookkeeping and the storage. The write planning (:class:`PendingChange`, the add and delete
plans) lives in :mod:`neuraldb.database_writes`; the methods here validate and call it.

Thread safety: one re-entrant lock (``db.lock``). Every mutation holds it, and the patched forward holds it
around its retrieval (see :mod:`neuraldb.patching`), so a forward sees the database before or after a
change, never a mix. A swap-remove rewrites a live row, which is why readers lock rather than rely on
snapshots. Code that reads ``keys``/``values`` directly from another thread should hold ``db.lock`` too.

Example::

    >>> import torch
    >>> from neuraldb import NeuralKVDatabase
    >>> from neuraldb.facts import Fact
    >>> db = NeuralKVDatabase(1536, 576)
    >>> ids = db.add(torch.randn(2, 1536), torch.randn(2, 576),
    ...              facts=[Fact("Paris", "{} is the capital of", "Italy"), None])
    >>> db.delete([ids[0]])
    >>> len(db), db.ids()
    (1, [1])
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from neuraldb import database_io
from neuraldb.database_inputs import (
    STORAGE_DTYPES,
    FactLike,
    as_id,
    check_device,
    check_dim,
    check_ids,
    check_relation_keys,
    check_replacement,
    check_row_thresholds,
    dtype_name,
)
from neuraldb.database_state import METADATA, DatabaseState, check_state
from neuraldb.database_storage import MIN_CAPACITY, RowStorage
from neuraldb.database_writes import PendingChange, plan_add, plan_ordered_delete, plan_swap_delete
from neuraldb.relation_gate import check_relation_gate, confirm
from neuraldb_kernels import (
    DEFAULT_POLICY,
    PrefilterPolicy,
    RetrievalPlan,
    check_gamma,
    check_queries,
    gated_retrieval,
    plan_retrieval,
    resolve,
    retrieve_residuals,
)


class _PolicyField:
    """``db.PREFILTER_MIN_KEYS`` and friends, the former per-database settings, as views of ``db.prefilter_policy``
    (reading one on the class gives the default)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, db: NeuralKVDatabase | None, owner: type) -> Any:
        return getattr(DEFAULT_POLICY if db is None else db.prefilter_policy, self.name)

    def __set__(self, db: NeuralKVDatabase, value: Any) -> None:
        db.prefilter_policy = dataclasses.replace(db.prefilter_policy, **{self.name: value})


class NeuralKVDatabase:
    """Unit-norm keys ``(n, key_dim)`` and residuals ``(n, value_dim)`` with stable ids and fact metadata.

    Args:
        key_dim: input features of the patched down-projection (the key length).
        value_dim: its output features (the residual length).
        dtype: storage dtype of keys and values (float16, bfloat16 or float32).
        device: where the tensors live (not "meta", which holds no rows); :func:`neuraldb.patch_model` moves the
            database to the model's device.
        capacity: rows to allocate up front (default 16); the storage doubles whenever it is full.
        ordered: keep rows in id order: ``delete`` shifts the rows after the first hole up (O(n)) instead of moving
            the last row into it, so the op's lowest tied row is the lowest tied id (a shard of
            :class:`neuraldb.ShardedNeuralKVDatabase` is one).

    Decode steps on CPU can scan a 1-bit sketch of the keys, then an int4 sketch of the keys it cannot rule out,
    instead of the keys (:meth:`retrieve_residuals`, same result, ~10% of the bytes read at d1 = 1536). The two
    sketches cost +36.6% of the fp16 key bytes (26.8% int4, 9.8% signs), so they are built only when first
    needed: the first :meth:`retrieve_residuals` call that ``prefilter_policy``
    (:class:`neuraldb_kernels.PrefilterPolicy`) sends to them builds them for all rows, and from then on every change
    keeps them in step. A database on a GPU, or never used for CPU decoding, holds none. They are never saved (nor
    built by :meth:`load`), are dropped by :meth:`to` a non-CPU device, and ``db.prefilter = False`` frees them and
    keeps them off.

    Each row may have a gate threshold of its own (:attr:`thresholds`, :meth:`set_thresholds`; ``neuraldb
    calibrate`` fits them): its residual is retrieved only where the best key's cosine exceeds both gamma and the
    row's threshold. Rows without one have threshold -1, so gamma alone decides for them. Rows may also hold a
    relation key, checked when :attr:`relation_gate` is set (:mod:`neuraldb.relation_gate`).

    Metadata the editing code sets and :meth:`save` keeps: ``layer``, ``gamma`` (used by ``patch_model``
    when it is not given), ``template`` (the text template keys were built with), ``model_id``,
    ``module_path`` and ``config`` (free-form, JSON-serialisable editing hyperparameters).

    Example::

        >>> db = NeuralKVDatabase(8, 4, dtype=torch.float32)
        >>> [i] = db.add(torch.ones(8), torch.arange(4.0), facts=[{"note": "demo"}])
        >>> key, residual, fact = db.get(i)
        >>> round(float(key.norm()), 4), residual.tolist(), fact
        (1.0, [0.0, 1.0, 2.0, 3.0], {'note': 'demo'})
    """

    PREFILTER_MIN_KEYS = _PolicyField("min_keys")
    PREFILTER_MAX_ROWS = _PolicyField("max_rows")
    PREFILTER_SIGNS = _PolicyField("signs")
    PREFILTER_SIGNS_MIN_GAMMA = _PolicyField("signs_min_gamma")
    PREFILTER_SIGNS_MAX_ROWS = _PolicyField("signs_max_rows")

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        capacity: int = MIN_CAPACITY,
        ordered: bool = False,
    ) -> None:
        self.key_dim = check_dim("key_dim", key_dim)
        self.value_dim = check_dim("value_dim", value_dim)
        if dtype not in STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of {'/'.join(map(dtype_name, STORAGE_DTYPES))}, got {dtype!r}")
        device = check_device(device)
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be a non-negative int, got {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity}")
        self.dtype = dtype
        self.ordered = bool(ordered)
        self._lock = threading.RLock()
        self._storage = RowStorage(key_dim, value_dim, dtype, device, capacity)
        self._row_ids: list[int] = []
        self._rows: dict[int, int] = {}
        self._facts: dict[int, FactLike] = {}
        self._next_id = 0
        self._version = 0  # bumped by every write: what a PendingChange checks
        self._layer: int | None = None
        self._gamma: float | None = None
        self.template: str | None = None
        self.model_id: str | None = None
        self.module_path: str | None = None
        self.config: dict[str, Any] = {}
        self._prefilter = True
        self._policy = DEFAULT_POLICY

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, layer: int | None = None, *, dtype: torch.dtype = torch.float16
    ) -> NeuralKVDatabase:
        """An empty database sized for ``layer``'s down-projection of ``model`` (default: the architecture's
        layer), on that module's device, with ``layer``, ``module_path`` and ``model_id`` filled in.

        Example::

            >>> db = NeuralKVDatabase.for_model(model, 8)   # doctest: +SKIP
            >>> db.key_dim, db.value_dim, db.module_path    # doctest: +SKIP
            (1536, 576, 'model.layers.8.mlp.down_proj')
        """
        from neuraldb import architectures as arch

        layer = arch.default_layer(model) if layer is None else arch.check_layer(model, layer)
        path, module = arch.down_proj_module(model, layer)
        key_dim, value_dim = arch.down_proj_dims(module)
        param = next(module.parameters(), None)
        db = cls(key_dim, value_dim, dtype=dtype, device=param.device if param is not None else "cpu")
        db.layer, db.module_path = layer, path
        config = getattr(model, "config", None)
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        db.model_id = str(name) if name else None
        return db

    # -- the state as one record -----------------------------------------------------------------------------

    def state(self) -> DatabaseState:
        """Everything this database holds, as a :class:`~neuraldb.database_state.DatabaseState`. Its ``keys`` and
        ``values`` are views of the live rows (no copy): hold :attr:`lock` while using them, or clone them.

        Example::

            >>> db = NeuralKVDatabase(4, 2)
            >>> _ = db.add(torch.ones(4), torch.ones(2))
            >>> s = db.state(); (s.ids, s.next_id, tuple(s.keys.shape))
            ([0], 1, (1, 4))
        """
        with self._lock:
            return DatabaseState(
                self.key_dim,
                self.value_dim,
                self.dtype,
                self.keys,
                self.values,
                list(self._row_ids),
                [self._facts[i] for i in self._row_ids],
                self._next_id,
                **{name: getattr(self, name) for name in METADATA},
                thresholds=self._storage.views()[5],
                relation_keys=self._storage.relation_keys,
            )

    @classmethod
    def from_state(cls, state: DatabaseState, *, adopt: bool = False, ordered: bool = False) -> NeuralKVDatabase:
        """A database holding ``state`` (validated by :func:`~neuraldb.database_state.check_state`; TypeError or
        ValueError otherwise), on the device of its tensors, rows copied into storage of exactly ``state.count``
        rows. ``adopt=True`` takes ``state.keys``/``state.values`` as the storage itself, without a copy, and its rows
        and facts as already checked: for a loader that allocated them and checked them while reading
        (:mod:`neuraldb.database_io`); they must be contiguous.

        Example::

            >>> db = NeuralKVDatabase(4, 2); _ = db.add(torch.ones(4), torch.ones(2))
            >>> NeuralKVDatabase.from_state(db.state()).ids()
            [0]
        """
        check_state(state, rows=not adopt)
        db = cls(
            state.key_dim, state.value_dim, dtype=state.dtype, device=state.keys.device, capacity=0, ordered=ordered
        )
        if adopt:
            db._storage = RowStorage.adopt(state.keys, state.values, state.thresholds, state.relation_keys)
        else:
            db._storage.reserve(state.count)
            db._storage.write(0, state.keys, state.values, None, state.thresholds, state.relation_keys)
            db._storage.set_count(state.count)
        db._row_ids = list(state.ids)
        db._rows = {i: r for r, i in enumerate(state.ids)}
        db._facts = dict(zip(state.ids, state.facts))
        db._next_id = state.next_id
        for name in METADATA:
            setattr(db, name, getattr(state, name))
        return db

    # -- metadata ---------------------------------------------------------------------------------------------

    @property
    def layer(self) -> int | None:
        """The layer whose down-projection the keys belong to (None: unknown)."""
        return self._layer

    @layer.setter
    def layer(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise TypeError(f"layer must be a non-negative int or None, got {value!r}")
        self._layer = value

    @property
    def gamma(self) -> float | None:
        """The gate threshold the facts were edited for (None: the architecture's default)."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float | None) -> None:
        self._gamma = None if value is None else check_gamma(value)

    @property
    def prefilter(self) -> bool:
        """Whether decode steps on CPU may use the key sketches (default True); setting False frees them."""
        return self._prefilter

    @prefilter.setter
    def prefilter(self, value: bool) -> None:
        with self._lock:
            self._prefilter = bool(value)
            if not self._prefilter:
                self._storage.drop_sketch()
            self._storage.changed()  # either way: a patch's eager plan holds the old choice

    @property
    def prefilter_policy(self) -> PrefilterPolicy:
        """Which CPU calls read the key sketches (:data:`neuraldb_kernels.DEFAULT_POLICY`; same output either way).
        A patched model sees a new policy at its next forward."""
        return self._policy

    @prefilter_policy.setter
    def prefilter_policy(self, policy: PrefilterPolicy) -> None:
        if not isinstance(policy, PrefilterPolicy):
            raise TypeError(f"prefilter_policy must be a neuraldb_kernels.PrefilterPolicy, got {type(policy).__name__}")
        with self._lock:
            self._policy = policy
            self._storage.changed()

    @property
    def lock(self) -> threading.RLock:
        """Held by every mutation and by the patched forward's retrieval; hold it to read keys/values
        consistently from another thread."""
        return self._lock

    @property
    def device(self) -> torch.device:
        """Where the keys and values live (change it with :meth:`to`)."""
        return self._storage.device

    @property
    def capacity(self) -> int:
        """Rows allocated; grows by doubling."""
        return self._storage.capacity

    @property
    def next_id(self) -> int:
        """The id the next added fact gets (ids are never reused, even after delete)."""
        return self._next_id

    # -- read -------------------------------------------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor:
        """Live ``(n, key_dim)`` view of the unit-norm keys; row ``i`` belongs to ``ids()[i]``."""
        return self._storage.keys

    @property
    def values(self) -> torch.Tensor:
        """Live ``(n, value_dim)`` view of the residuals; row ``i`` belongs to ``ids()[i]``."""
        return self._storage.values

    @property
    def sketch(self) -> torch.Tensor | None:
        """Live ``(n, sketch_row_bytes(key_dim))`` uint8 view of the keys' int4 sketch
        (:func:`neuraldb_kernels.build_sketch`), kept in step with ``keys`` by every change; None until a CPU decode
        step has built it (reading it does not build it, so inspecting a database never allocates the sketch)."""
        return self._storage.sketch

    @property
    def signs(self) -> torch.Tensor | None:
        """Live ``(n, sign_row_bytes(key_dim))`` uint8 view of the keys' 1-bit sketch
        (:func:`neuraldb_kernels.build_signs`); exists exactly when :attr:`sketch` does."""
        return self._storage.signs

    @property
    def thresholds(self) -> torch.Tensor:
        """A copy of the rows' gate thresholds, float32 ``(n,)`` in row order (-1: the row has none of its own)."""
        with self._lock:
            return self._storage.thresholds.clone()

    @property
    def relation_keys(self) -> torch.Tensor | None:
        """A copy of the rows' relation keys ``(n, key_dim)`` in row order (zero rows: none), or None when no row has
        one."""
        with self._lock:
            r = self._storage.relation_keys
            return None if r is None else r.clone()

    @property
    def relation_gate(self) -> dict | None:
        """``{"rho": float, "window": int}`` when retrieval checks the rows' relation keys (see
        :mod:`neuraldb.relation_gate`), else None. Kept in :attr:`config`, so files and copies keep it."""
        return self.config.get("relation_gate")

    @relation_gate.setter
    def relation_gate(self, value: dict | None) -> None:
        checked = check_relation_gate(value)
        with self._lock:
            self.config = {k: v for k, v in self.config.items() if k != "relation_gate"}
            if checked is not None:
                self.config["relation_gate"] = checked
            self._storage.changed()

    def set_thresholds(self, ids: int | Iterable[int], thresholds: float | Sequence[float] | torch.Tensor) -> None:
        """Give rows ``ids`` their own gate thresholds (one number for all, or one per id; each in [-1, 1], -1 to
        remove a row's threshold). A row's residual is then retrieved only where the best key's cosine exceeds both
        gamma and its threshold. KeyError for unknown ids, TypeError/ValueError for bad thresholds; nothing changes
        on error.

        Example::

            >>> db = NeuralKVDatabase(4, 2); ids = db.add(torch.eye(4)[:2], torch.ones(2, 2))
            >>> db.set_thresholds(ids[1], 0.9); db.thresholds.tolist()
            [-1.0, 0.8999999761581543]
        """
        id_list = check_ids(ids)
        t = check_row_thresholds(thresholds, len(id_list))
        with self._lock:
            self._check_known(id_list)
            if id_list:
                self._storage.write_at([self._rows[i] for i in id_list], None, None, t)
                self._version += 1

    def __len__(self) -> int:
        return self._storage.n

    def __contains__(self, id: object) -> bool:
        """Whether ``id`` (an int or a 0-d integer tensor; TypeError for anything else, floats included) is live."""
        return as_id(id) in self._rows

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids())

    def ids(self) -> list[int]:
        """Ids in row order: the op's ``idx`` maps to the fact id ``ids()[idx]``."""
        with self._lock:
            return list(self._row_ids)

    def row(self, id: int) -> int:
        """The current row of ``id`` (rows move on delete; ids do not)."""
        return self._rows[self._known(id)]

    def get(self, id: int) -> tuple[torch.Tensor, torch.Tensor, FactLike]:
        """``(key, residual, fact)`` of ``id``: copies of its stored rows and its fact metadata.

        Ids here and in :meth:`row`, :meth:`fact` and ``in`` are ints or 0-d integer tensors; anything else (a float,
        a bool) is a TypeError, an unknown id a KeyError."""
        with self._lock:
            i = self._known(id)
            r = self._rows[i]
            return self.keys[r].clone(), self.values[r].clone(), self._facts[i]

    def fact(self, id: int) -> FactLike:
        """The fact metadata stored with ``id`` (a Fact, a dict or None)."""
        with self._lock:
            return self._facts[self._known(id)]

    def _known(self, id: object) -> int:
        i = as_id(id)
        if i not in self._rows:
            raise KeyError(f"id {i} is not in the database")
        return i

    def _check_known(self, ids: list[int]) -> None:
        missing = [i for i in ids if i not in self._rows]
        if missing:
            raise KeyError(f"ids not in the database: {missing[:5]}")

    # -- write ------------------------------------------------------------------------------------------------

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

    def to(self, device: torch.device | str) -> NeuralKVDatabase:
        """Move the storage to ``device`` in place (like ``nn.Module.to``) and return ``self``; the key sketch, which
        only the CPU kernel reads, is dropped when ``device`` is not the CPU. ValueError for "meta", where the rows
        would be lost."""
        device = check_device(device)
        with self._lock:
            if device != self.device:
                self._storage.to(device)
                self._version += 1
        return self

    def check_values_fit(self, dtype: torch.dtype) -> None:
        """ValueError unless every residual is finite in ``dtype`` (a patched model's dtype): a residual beyond its
        range would turn the patched layer's output, then the logits, into inf. Free when the storage dtype's range
        fits in ``dtype``'s (fp16 storage, or any storage into a bf16/fp32 model); otherwise one scan of the values."""
        if not dtype.is_floating_point or torch.finfo(self.dtype).max <= torch.finfo(dtype).max:
            return
        with self._lock:
            rows, top = self._storage.overflowing_rows(dtype)
            if rows:
                ids = [self._row_ids[r] for r in rows[:5]]
                raise ValueError(
                    f"db holds residuals up to {top:g} in magnitude (ids {ids}), beyond {dtype_name(dtype)}'s "
                    f"largest value {torch.finfo(dtype).max:g}: the patched {dtype_name(dtype)} model would compute "
                    "inf. Scale those residuals down, or run the model in bfloat16 or float32"
                )

    # -- retrieval --------------------------------------------------------------------------------------------

    def retrieve(
        self, queries: torch.Tensor, gamma: float, *, backend: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``gated_retrieval(queries, keys, values, gamma)`` on this database, under its lock: ``(out, idx, score)``.

        This is the one method :func:`neuraldb.patch_model` needs of a database; any object with the same method
        and attributes (e.g. :class:`neuraldb.ShardedNeuralKVDatabase`) can be patched in.
        """
        with self._lock:
            views = self._storage.views()
            out, idx, score = gated_retrieval(
                queries, self.keys, self.values, gamma, backend=backend, thresholds=views[5]
            )
            return self._relation_checked(queries, out, idx, views[6]), idx, score

    def _relation_checked(
        self, queries: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, relation_keys: torch.Tensor | None
    ) -> torch.Tensor:
        gate = self.relation_gate
        if gate is None or relation_keys is None:
            return out
        return confirm(queries, out, idx, relation_keys, rho=gate["rho"], window=gate["window"])

    def retrieve_residuals(self, queries: torch.Tensor, gamma: float, *, backend: str | None = None) -> torch.Tensor:
        """``retrieve(queries, gamma)[0]``, the gated residuals alone: what a patched forward adds.

        Where ``prefilter_policy`` sends the call to the key sketches (the C++ CPU kernel, enough keys, few query
        rows: decode), it scans them and rescores only the keys that can pass the gate
        (:func:`neuraldb_kernels.gated_retrieval_prefiltered`): the result is bitwise the same. The first such call
        builds both sketches (one pass over the keys, under the lock). ``db.prefilter = False`` turns that off.
        """
        check_queries(queries, self.key_dim, self.device)
        rows = queries.numel() // self.key_dim if self.key_dim else 0
        return self.gated_residuals(queries, check_gamma(gamma), resolve(backend, queries.device, rows))

    def gated_residuals(self, queries: torch.Tensor, gamma: float, backend: str) -> torch.Tensor:
        """:meth:`retrieve_residuals` on checked arguments: queries ``(..., key_dim)`` of a query dtype on this
        database's device, a float gamma and a backend resolved by :func:`neuraldb_kernels.resolve`. The patch calls
        it on every forward that has no eager plan (:meth:`eager_plan`): on a decode step the checks' host time
        (caches cold from the model's weights) would be much of what the patch adds."""
        q2 = queries if queries.dim() == 2 else queries.reshape(-1, self.key_dim)
        storage, policy = self._storage, self._policy
        with self._lock:
            if self._prefilter and policy.wants_sketch(backend, storage.n, q2.shape[0], gamma):
                storage.ensure_sketch()
            _, keys, values, sketch, signs, thresholds, relations = storage.views()
            if relations is not None and self.relation_gate is not None:
                # The check needs each opened position's row: the plain op, then the check on the sequences.
                out, idx, _ = gated_retrieval(q2, keys, values, gamma, backend=backend, thresholds=thresholds)
                shaped = out.view(*queries.shape[:-1], self.value_dim)
                return self._relation_checked(queries, shaped, idx.view(queries.shape[:-1]), relations)
            if not self._prefilter:
                sketch = None
            out = retrieve_residuals(
                q2, keys, values, gamma, backend, sketch=sketch, signs=signs, policy=policy, thresholds=thresholds
            )
        return out if queries.dim() == 2 else out.view(*queries.shape[:-1], self.value_dim)

    def eager_plan(self, gamma: float, rows: int) -> tuple[object, RetrievalPlan] | None:
        """``(token, plan)``: the :class:`neuraldb_kernels.RetrievalPlan` of this state for a patched eager forward on
        the C++ CPU kernel (call with the lock held). ``plan.residuals(queries)`` is :meth:`gated_residuals` with
        this state's tensors and sketch choice bound, returning None where no gate opens; it stays valid while
        ``self.state_token() is token`` (every write that changes the rows, the buffers or the policy replaces it).
        None while the policy wants a sketch that is not built and a call of ``rows`` rows would not build it."""
        storage, policy = self._storage, self._policy
        if storage.relation_buf is not None and self.relation_gate is not None:
            return None  # the relation check runs on the retrieval's rows and positions: gated_residuals does it
        use = self._prefilter and storage.n >= policy.min_keys
        if use and storage.sketch_buf is None:
            if rows > policy.max_rows_at(gamma):
                return None
            storage.ensure_sketch()
        views = storage.views()
        _, keys, values, sketch, signs, thresholds, _ = views
        if not use:
            sketch = signs = None
        return views, plan_retrieval(
            keys, values, gamma, sketch=sketch, signs=signs, policy=policy, thresholds=thresholds
        )

    def state_token(self) -> object:
        """An object that stays the same (``is``) while the rows, buffers and policy do: what :meth:`eager_plan`'s
        token is compared with (call with the lock held)."""
        return self._storage.cached_views

    # -- files ------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the database to one ``.safetensors`` file, atomically (see :mod:`neuraldb.database_io`)."""
        # The state's tensors alias the live rows; the lock, held while writing, keeps them still.
        with self._lock:
            database_io.write_state(self.state(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> NeuralKVDatabase:
        """Read a database written by :meth:`save`, validating everything (see :mod:`neuraldb.database_io`)."""
        device = check_device(device)
        return cls.from_state(database_io.read_state(path), adopt=True).to(device)

    def save_pretrained(self, directory: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
        """Write the database and a ``neuraldb_config.json`` (base model id, architecture and, given ``model``, the
        fingerprint of its weights) into ``directory``: :func:`neuraldb.save_pretrained`."""
        from neuraldb import pretrained_io

        pretrained_io.save(self, directory, model)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> NeuralKVDatabase:
        """Read a directory written by :meth:`save_pretrained` (checks nothing about a model: that is
        :func:`neuraldb.from_pretrained`)."""
        from neuraldb import pretrained_io

        return pretrained_io.load_database(cls, directory, device=check_device(device))

    # Pickling and deep copies get a fresh lock (locks cannot be copied).
    def __getstate__(self) -> dict:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"NeuralKVDatabase(n={len(self)}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"dtype={dtype_name(self.dtype)}, device={self.device}, layer={self._layer}, gamma={self._gamma})"
        )


__all__ = ["NeuralKVDatabase", "PendingChange"]
