"""``NeuralKVDatabase``: the edit memory, unit-norm keys and residual values with stable ids and fact metadata.

The object and its public surface: ids, facts and metadata here; the tensors in a :class:`~neuraldb.database_storage.
RowStorage`; everything it holds as one :class:`~neuraldb.database_state.DatabaseState` (``db.state()`` and
``NeuralKVDatabase.from_state``), through which the file format (:mod:`neuraldb.database_io`) and the sharded database
work. Deleting swaps the last row into the hole (O(1) per fact; ``ordered=True`` shifts the rows after it instead,
keeping rows in id order); ids never change and are never reused.

Here: construction, metadata, row access, moves and files. The write methods and their planning live in
:mod:`neuraldb.database_writes` (:class:`~neuraldb.database_writes.DatabaseWrites`), the gate settings and the read
path in :mod:`neuraldb.database_retrieval`; the database inherits both, so its surface stays one object. (A little
over 400 lines: the class docstring and the metadata properties document that surface.)

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
from collections.abc import Iterator
from typing import Any

import torch

from neuraldb import database_io
from neuraldb.database_inputs import (
    STORAGE_DTYPES,
    FactLike,
    as_id,
    check_device,
    check_dim,
    dtype_name,
)
from neuraldb.database_retrieval import DatabaseRetrieval
from neuraldb.database_state import METADATA, DatabaseState, check_state
from neuraldb.database_storage import MIN_CAPACITY, RowStorage
from neuraldb.database_writes import DatabaseWrites, PendingChange
from neuraldb_kernels import DEFAULT_POLICY, PrefilterPolicy, check_gamma


class _PolicyField:
    """``db.PREFILTER_MIN_KEYS`` and friends, the former per-database settings, as views of ``db.prefilter_policy``
    (reading one on the class gives the default)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, db: NeuralKVDatabase | None, owner: type) -> Any:
        return getattr(DEFAULT_POLICY if db is None else db.prefilter_policy, self.name)

    def __set__(self, db: NeuralKVDatabase, value: Any) -> None:
        db.prefilter_policy = dataclasses.replace(db.prefilter_policy, **{self.name: value})


class NeuralKVDatabase(DatabaseWrites, DatabaseRetrieval):
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
    keeps them in step. A database on a GPU holds none unless its policy's ``gpu`` sends CUDA decode steps to the
    Triton cascade (off by default until measured; then they are built on the GPU at the first such call). They are
    never saved (nor built by :meth:`load`), are dropped by :meth:`to` another device, and ``db.prefilter = False``
    frees them and keeps them off.

    Each row may have a gate threshold of its own (:attr:`thresholds`, :meth:`set_thresholds`; ``neuraldb
    calibrate`` fits them): its residual is retrieved only where the best key's cosine exceeds both gamma and the
    row's threshold. Rows without one have threshold -1, so gamma alone decides for them. Rows may also hold a
    relation key, checked when :attr:`relation_gate` is set (:mod:`neuraldb.relation_gate`).

    Metadata the editing code sets and :meth:`save` keeps: ``layer``, ``gamma`` (used by ``patch_model``
    when it is not given), ``template`` (the text template keys were built with), ``model_id`` (a name, for
    people), ``module_path``, ``config`` (free-form, JSON-serialisable editing hyperparameters) and
    ``model_identity`` (the architecture and weights fingerprint of the model the rows were computed on, which
    ``patch_model`` and ``edit`` check: :func:`neuraldb.pretrained.model_identity`; None in older files).

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
        self.model_identity: dict[str, Any] | None = None
        self._prefilter = True
        self._policy = DEFAULT_POLICY

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, layer: int | None = None, *, dtype: torch.dtype = torch.float16
    ) -> NeuralKVDatabase:
        """An empty database sized for ``layer``'s down-projection of ``model`` (default: the architecture's
        layer), on that module's device, with ``layer``, ``module_path``, ``model_id`` and ``model_identity`` filled
        in.

        Example::

            >>> db = NeuralKVDatabase.for_model(model, 8)   # doctest: +SKIP
            >>> db.key_dim, db.value_dim, db.module_path    # doctest: +SKIP
            (1536, 576, 'model.layers.8.mlp.down_proj')
        """
        from neuraldb import architectures as arch
        from neuraldb.pretrained_io import model_identity

        layer = arch.default_layer(model) if layer is None else arch.check_layer(model, layer)
        path, module = arch.down_proj_module(model, layer)
        key_dim, value_dim = arch.down_proj_dims(module)
        param = next(module.parameters(), None)
        db = cls(key_dim, value_dim, dtype=dtype, device=param.device if param is not None else "cpu")
        db.layer, db.module_path = layer, path
        config = getattr(model, "config", None)
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        db.model_id = str(name) if name else None
        db.model_identity = model_identity(model)
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
                thresholds=self._storage.views().thresholds,
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
        """Which calls read the key sketches (:data:`neuraldb_kernels.DEFAULT_POLICY`: CPU decode steps; CUDA ones
        too with ``gpu=True``; same output either way). A patched model sees a new policy at its next forward."""
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
