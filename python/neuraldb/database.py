"""``NeuralKVDatabase``: the edit memory, unit-norm keys and residual values with stable ids and fact metadata.

Storage is two preallocated buffers that double when full, so appending 100k facts in batches is amortised
O(1) per fact; ``keys``/``values`` are views of their first ``len(db)`` rows, which the op reads without a
copy. Deleting swaps the last row into the hole (O(1) per fact); ids never change and are never reused.

Thread safety: one re-entrant lock (``db.lock``). Every mutation holds it, and the patched forward holds it
around its retrieval (see :mod:`neuraldb.patching`), so a forward sees the database before or after a
change, never a mix. A swap-remove rewrites a live row, which is why readers lock rather than rely on
snapshots. Code that reads ``keys``/``values`` directly from another thread should hold ``db.lock`` too.

The file format is described in :mod:`neuraldb.database_io`.

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

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from neuraldb import host_memory
from neuraldb.database_inputs import (
    STORAGE_DTYPES,
    FactLike,
    _check_dim,
    _check_facts,
    _check_ids,
    _dtype_name,
    _rows,
    as_id,
    cast_residuals,
    check_device,
    normalize_keys,
)
from neuraldb.database_retrieval import PrefilteredRetrieval
from neuraldb_kernels.prefilter import build_signs, build_sketch, sign_row_bytes, sketch_row_bytes
from neuraldb_kernels.validation import check_gamma

_MIN_CAPACITY = 16
# Ids are stored as int64.
_MAX_ID = 2**63 - 1
# Rows per chunk of _check_values_fit's scan.
_SCAN_ROWS = 4096
# Rows per build_sketch call when the sketch is first built: it is written into its buffer chunk by chunk instead of
# existing twice.
_SKETCH_BUILD_ROWS = 4096


def _moved(buf: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``buf.to(device)``, into :func:`neuraldb.host_memory.empty` storage when ``device`` is the CPU."""
    if device.type != "cpu":
        return buf.to(device)
    return host_memory.empty(tuple(buf.shape), buf.dtype, device).copy_(buf)


class NeuralKVDatabase(PrefilteredRetrieval):
    """Unit-norm keys ``(n, key_dim)`` and residuals ``(n, value_dim)`` with stable ids and fact metadata.

    Args:
        key_dim: input features of the patched down-projection (the key length).
        value_dim: its output features (the residual length).
        dtype: storage dtype of keys and values (float16, bfloat16 or float32).
        device: where the tensors live (not "meta", which holds no rows); :func:`neuraldb.patch_model` moves the
            database to the model's device.
        capacity: rows to allocate up front (default 16); the storage doubles whenever it is full.

    Decode steps on CPU can scan a 1-bit sketch of the keys, then an int4 sketch of the keys it cannot rule out,
    instead of the keys (:meth:`retrieve_residuals`, same result, ~10% of the bytes read at d1 = 1536). The two
    sketches cost +36.6% of the fp16 key bytes (26.8% int4, 9.8% signs), so they are built only when first
    needed: the first :meth:`retrieve_residuals` call that would use it (C++ CPU kernel, at least
    ``PREFILTER_MIN_KEYS`` keys, at most ``PREFILTER_MAX_ROWS`` query rows, or ``PREFILTER_SIGNS_MAX_ROWS`` where the
    1-bit stage applies) builds it for all rows, and from then on
    every change keeps it in step. A database on a GPU, or never used for CPU decoding, holds none. It is never
    saved (nor built by :meth:`load`), is dropped by :meth:`to` a non-CPU device, and ``db.prefilter = False`` frees it
    and keeps it off.

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

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        capacity: int = _MIN_CAPACITY,
    ) -> None:
        self.key_dim = _check_dim("key_dim", key_dim)
        self.value_dim = _check_dim("value_dim", value_dim)
        if dtype not in STORAGE_DTYPES:
            allowed = "/".join(map(_dtype_name, STORAGE_DTYPES))
            raise TypeError(f"dtype must be one of {allowed}, got {dtype!r}")
        device = check_device(device)
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be a non-negative int, got {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity}")
        self.dtype = dtype
        self._lock = threading.RLock()
        self._keys = host_memory.empty((capacity, key_dim), dtype, device)
        self._values = host_memory.empty((capacity, value_dim), dtype, device)
        self._sketch: torch.Tensor | None = None
        self._signs: torch.Tensor | None = None  # built and dropped with _sketch
        self._n = 0
        self._views: tuple = ()  # see _live_views
        self._row_ids: list[int] = []
        self._rows: dict[int, int] = {}
        self._facts: dict[int, FactLike] = {}
        self._next_id = 0
        self._layer: int | None = None
        self._gamma: float | None = None
        self.template: str | None = None
        self.model_id: str | None = None
        self.module_path: str | None = None
        self.config: dict[str, Any] = {}
        self._prefilter = True

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
        """Whether decode steps on CPU may use the int4 key sketch (default True); setting False frees the sketch."""
        return self._prefilter

    @prefilter.setter
    def prefilter(self, value: bool) -> None:
        with self._lock:
            self._prefilter = bool(value)
            if not self._prefilter:
                self._sketch = self._signs = None
            self._views = ()  # either way: a patch's eager plan holds the old choice

    @property
    def lock(self) -> threading.RLock:
        """Held by every mutation and by the patched forward's retrieval; hold it to read keys/values
        consistently from another thread."""
        return self._lock

    @property
    def device(self) -> torch.device:
        """Where the keys and values live (change it with :meth:`to`)."""
        return self._keys.device

    @property
    def capacity(self) -> int:
        """Rows allocated; grows by doubling."""
        return self._keys.shape[0]

    @property
    def next_id(self) -> int:
        """The id the next added fact gets (ids are never reused, even after delete)."""
        return self._next_id

    # -- read -------------------------------------------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor:
        """Live ``(n, key_dim)`` view of the unit-norm keys; row ``i`` belongs to ``ids()[i]``."""
        return self._keys[: self._n]

    @property
    def values(self) -> torch.Tensor:
        """Live ``(n, value_dim)`` view of the residuals; row ``i`` belongs to ``ids()[i]``."""
        return self._values[: self._n]

    @property
    def sketch(self) -> torch.Tensor | None:
        """Live ``(n, sketch_row_bytes(key_dim))`` uint8 view of the keys' int4 sketch
        (:func:`neuraldb_kernels.build_sketch`), kept in step with ``keys`` by every change; None until a CPU decode
        step has built it (reading it does not build it, so inspecting a database never allocates the sketch)."""
        return None if self._sketch is None else self._sketch[: self._n]

    @property
    def signs(self) -> torch.Tensor | None:
        """Live ``(n, sign_row_bytes(key_dim))`` uint8 view of the keys' 1-bit sketch
        (:func:`neuraldb_kernels.build_signs`); exists exactly when :attr:`sketch` does."""
        return None if self._signs is None else self._signs[: self._n]

    def __len__(self) -> int:
        return self._n

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
            return self._keys[r].clone(), self._values[r].clone(), self._facts[i]

    def fact(self, id: int) -> FactLike:
        """The fact metadata stored with ``id`` (a Fact, a dict or None)."""
        with self._lock:
            return self._facts[self._known(id)]

    def _known(self, id: object) -> int:
        """``id`` as an int (:func:`~neuraldb.database_inputs.as_id`); KeyError unless it is live."""
        i = as_id(id)
        if i not in self._rows:
            raise KeyError(f"id {i} is not in the database")
        return i

    def _check_known(self, ids: list[int]) -> None:
        missing = [i for i in ids if i not in self._rows]
        if missing:
            raise KeyError(f"ids not in the database: {missing[:5]}")

    def _live_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(keys, values, sketch, signs)``, the live rows, made once per state of the storage (call with the lock
        held). Keyed on the buffers' identities and the row count, so a writer that forgets to drop it costs memory,
        never correctness (the cached views keep their buffers alive, so an identity cannot be reused while it is
        cached); the writers that replace a buffer drop it, so that it does not keep the old one alive. Writers that
        change the row count drop it too: the patch's eager plan (:meth:`_cpu_residuals_plan`) is valid only while
        the cached tuple is the same object."""
        state = (self._n, id(self._keys), id(self._values), id(self._sketch), id(self._signs))
        if not self._views or self._views[0] != state:
            self._views = (state, self.keys, self.values, self.sketch, self.signs)
        return self._views[1:]

    # -- write ------------------------------------------------------------------------------------------------

    def add(
        self, keys: torch.Tensor, residuals: torch.Tensor, facts: Sequence[FactLike] | None = None
    ) -> list[int]:
        """Append facts; returns their new ids (increasing, never reused).

        Args:
            keys: ``(m, key_dim)`` or ``(key_dim,)``, any floating dtype, on any (non-meta) device; each row is
                normalised to unit length in fp32 before it is stored.
            residuals: ``(m, value_dim)`` or ``(value_dim,)``, finite and representable in the storage dtype.
            facts: None or one ``Fact``/``dict``/``None`` per row; dicts hold only what a save and load give back
                unchanged (str keys; str, int, float, bool, None, lists and dicts of them; no NaN), see
                :func:`neuraldb.database_inputs.fact_to_json`.

        Nothing changes when any argument is invalid.
        """
        k = _rows("keys", keys, self.key_dim, "key_dim")
        v = _rows("residuals", residuals, self.value_dim, "value_dim")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"keys and residuals must have the same number of rows, got {k.shape[0]} and {v.shape[0]}")
        m = k.shape[0]
        fs = _check_facts(facts, m)
        k = normalize_keys(k, self.dtype)
        v = cast_residuals(v, self.dtype)
        if m == 0:
            return []
        if self._next_id + m - 1 > _MAX_ID:
            raise ValueError(
                f"cannot add {m} facts: their ids would pass 2**63 - 1 (ids are int64; next_id is {self._next_id})"
            )
        # Sketched outside the lock when a sketch exists; one built by a retrieval meanwhile gets its rows below.
        sk = (build_sketch(k), build_signs(k)) if self._sketch is not None else None
        with self._lock:
            self._reserve(self._n + m)
            n = self._n
            self._keys[n : n + m].copy_(k)
            self._values[n : n + m].copy_(v)
            if self._sketch is not None:
                sketch, signs = (build_sketch(k), build_signs(k)) if sk is None else sk
                self._sketch[n : n + m].copy_(sketch)
                self._signs[n : n + m].copy_(signs)
            new_ids = list(range(self._next_id, self._next_id + m))
            for offset, (i, f) in enumerate(zip(new_ids, fs)):
                self._rows[i] = n + offset
                self._facts[i] = f
            self._row_ids.extend(new_ids)
            self._next_id += m
            self._n = n + m
            self._views = ()
        return new_ids

    def update(
        self,
        ids: int | Iterable[int],
        keys: torch.Tensor | None = None,
        residuals: torch.Tensor | None = None,
        *,
        facts: Sequence[FactLike] | None = None,
    ) -> None:
        """Replace the keys, residuals and/or facts of existing ``ids`` (rows in the order of ``ids``).

        Raises KeyError for unknown ids, ValueError for duplicates or bad rows; nothing changes on error.
        """
        id_list = _check_ids(ids)
        m = len(id_list)
        k = v = None
        if keys is not None:
            k = normalize_keys(_rows("keys", keys, self.key_dim, "key_dim"), self.dtype)
            if k.shape[0] != m:
                raise ValueError(f"keys must have one row per id: expected {m}, got {k.shape[0]}")
        if residuals is not None:
            v = cast_residuals(_rows("residuals", residuals, self.value_dim, "value_dim"), self.dtype)
            if v.shape[0] != m:
                raise ValueError(f"residuals must have one row per id: expected {m}, got {v.shape[0]}")
        fs = _check_facts(facts, m) if facts is not None else None
        with self._lock:
            self._check_known(id_list)
            if m == 0:
                return
            rows = torch.tensor([self._rows[i] for i in id_list], dtype=torch.long, device=self.device)
            if k is not None:
                self._keys.index_copy_(0, rows, k.to(self.device))
                if self._sketch is not None:
                    self._sketch.index_copy_(0, rows, build_sketch(k).to(self.device))
                    self._signs.index_copy_(0, rows, build_signs(k).to(self.device))
            if v is not None:
                self._values.index_copy_(0, rows, v.to(self.device))
            if fs is not None:
                self._facts.update(zip(id_list, fs))

    def delete(self, ids: int | Iterable[int]) -> None:
        """Remove ``ids``: each hole is filled by the last row (O(1) per fact); other ids keep their facts.

        Raises KeyError for unknown ids and ValueError for duplicates; nothing changes on error.
        """
        id_list = _check_ids(ids)
        with self._lock:
            self._check_known(id_list)
            if not id_list:
                return
            rows, row_ids = self._rows, self._row_ids
            # Bookkeeping first (pure Python), then one gather for the tensors. A survivor moves only when it is
            # the last row, so its original row lies in the removed tail [len - len(ids), len) and the gather
            # never overwrites a row before reading it.
            src: dict[int, int] = {}
            for i in id_list:
                r = rows.pop(i)
                src.pop(i, None)
                last = row_ids.pop()
                if last != i:
                    src.setdefault(last, rows[last])
                    row_ids[r] = last
                    rows[last] = r
                del self._facts[i]
            if src:
                d = torch.tensor([rows[i] for i in src], dtype=torch.long, device=self.device)
                s = torch.tensor(list(src.values()), dtype=torch.long, device=self.device)
                self._keys.index_copy_(0, d, self._keys.index_select(0, s))
                self._values.index_copy_(0, d, self._values.index_select(0, s))
                if self._sketch is not None:
                    self._sketch.index_copy_(0, d, self._sketch.index_select(0, s))
                    self._signs.index_copy_(0, d, self._signs.index_select(0, s))
            self._n = len(row_ids)
            self._views = ()

    def to(self, device: torch.device | str) -> NeuralKVDatabase:
        """Move the storage to ``device`` in place (like ``nn.Module.to``) and return ``self``; the key sketch, which
        only the CPU kernel reads, is dropped when ``device`` is not the CPU. ValueError for "meta", where the rows
        would be lost."""
        device = check_device(device)
        with self._lock:
            if device != self.device:
                self._keys = _moved(self._keys, device)
                self._values = _moved(self._values, device)
                if device.type != "cpu":
                    self._sketch = self._signs = None
                self._views = ()
        return self

    def _reserve(self, rows: int) -> None:
        cap = self.capacity
        if rows <= cap:
            return
        cap = max(cap, _MIN_CAPACITY)
        while cap < rows:
            cap *= 2
        keys = host_memory.empty((cap, self.key_dim), self.dtype, self.device)
        values = host_memory.empty((cap, self.value_dim), self.dtype, self.device)
        keys[: self._n].copy_(self.keys)
        values[: self._n].copy_(self.values)
        if self._sketch is not None:
            self._sketch = self._grown(self._sketch, cap)
            self._signs = self._grown(self._signs, cap)
        self._keys, self._values = keys, values
        self._views = ()

    def _grown(self, buf: torch.Tensor, cap: int) -> torch.Tensor:
        out = host_memory.empty((cap, buf.shape[1]), buf.dtype, self.device)
        out[: self._n].copy_(buf[: self._n])
        return out

    def _check_values_fit(self, dtype: torch.dtype) -> None:
        """ValueError unless every residual is finite in ``dtype`` (a patched model's dtype): a residual beyond its
        range would turn the patched layer's output, then the logits, into inf. Free when the storage dtype's range
        fits in ``dtype``'s (fp16 storage, or any storage into a bf16/fp32 model); otherwise one scan of the values."""
        if not dtype.is_floating_point or torch.finfo(self.dtype).max <= torch.finfo(dtype).max:
            return
        with self._lock:
            rows: list[int] = []
            top = 0.0
            for start in range(0, self._n, _SCAN_ROWS):
                v = self._values[start : min(self._n, start + _SCAN_ROWS)]
                over = ~torch.isfinite(v.to(dtype)).all(dim=1)
                if over.any():
                    rows += (over.nonzero().flatten()[:5] + start).tolist()
                    top = max(top, float(v.abs().amax()))
            if rows:
                ids = [self._row_ids[r] for r in rows[:5]]
                raise ValueError(
                    f"db holds residuals up to {top:g} in magnitude (ids {ids}), beyond {_dtype_name(dtype)}'s "
                    f"largest value {torch.finfo(dtype).max:g}: the patched {_dtype_name(dtype)} model would compute "
                    "inf. Scale those residuals down, or run the model in bfloat16 or float32"
                )

    def _ensure_sketch(self) -> None:
        """Build both sketches of every live row if they do not exist yet (call with the lock held)."""
        if self._sketch is not None:
            return
        sketch = host_memory.empty((self.capacity, sketch_row_bytes(self.key_dim)), torch.uint8, self.device)
        signs = host_memory.empty((self.capacity, sign_row_bytes(self.key_dim)), torch.uint8, self.device)
        for start in range(0, self._n, _SKETCH_BUILD_ROWS):
            stop = min(self._n, start + _SKETCH_BUILD_ROWS)
            sketch[start:stop] = build_sketch(self._keys[start:stop])
            signs[start:stop] = build_signs(self._keys[start:stop])
        self._sketch, self._signs = sketch, signs
        self._views = ()

    def _restore(
        self, keys: torch.Tensor, values: torch.Tensor, ids: list[int], facts: list[FactLike], next_id: int
    ) -> None:
        """Fill an empty database with already validated rows (used by load)."""
        n = len(ids)
        self._reserve(n)
        self._keys[:n].copy_(keys)
        self._values[:n].copy_(values)
        self._row_ids = list(ids)
        self._rows = {i: r for r, i in enumerate(ids)}
        self._facts = dict(zip(ids, facts))
        self._next_id = next_id
        self._n = n
        self._views = ()

    # -- files ------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the database to one ``.safetensors`` file, atomically (see :mod:`neuraldb.database_io`)."""
        from neuraldb.database_io import save_database

        save_database(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> NeuralKVDatabase:
        """Read a database written by :meth:`save`, validating everything (see :mod:`neuraldb.database_io`)."""
        from neuraldb.database_io import load_database

        return load_database(path, device=device)

    # Pickling and deep copies get a fresh lock (locks cannot be copied).
    def __getstate__(self) -> dict:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"NeuralKVDatabase(n={self._n}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"dtype={_dtype_name(self.dtype)}, device={self.device}, layer={self._layer}, gamma={self._gamma})"
        )
