"""``RowStorage``: the tensors of a :class:`~neuraldb.NeuralKVDatabase` -- keys, residuals, per-row gate thresholds
and the keys' two sketches.

Preallocated buffers that double when full, so appending 100k facts in batches is amortised O(1) per fact;
``keys``/``values`` are views of their first ``n`` rows, which the op reads without a copy. On the CPU they live in
2 MB pages (:mod:`neuraldb.host_memory`). The int4 and 1-bit sketches (:func:`neuraldb_kernels.build_sketch`,
:func:`~neuraldb_kernels.build_signs`) exist only after :meth:`RowStorage.ensure_sketch`; from then on every write
keeps them in step with the keys.

It knows rows, not ids or facts: the database owns the row <-> id bookkeeping and the lock (call every method with
it held). Writes are split so that a caller can allocate first and write after: :meth:`reserve` and
:meth:`sketch_rows` allocate, :meth:`write`, :meth:`write_at`, :meth:`move` and :meth:`set_count` only copy into
memory that exists.

Example::

    >>> import torch
    >>> s = RowStorage(4, 2, torch.float32, "cpu", capacity=1)
    >>> s.reserve(3); s.write(0, torch.eye(4)[:3], torch.ones(3, 2)); s.set_count(3)
    >>> s.capacity, s.keys.shape, s.sketch
    (16, torch.Size([3, 4]), None)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from neuraldb import host_memory
from neuraldb_kernels import build_signs, build_sketch, sign_row_bytes, sketch_row_bytes

MIN_CAPACITY = 16
# A row's threshold when it has none of its own: never above gamma, so gamma alone decides.
NO_THRESHOLD = -1.0
# Rows per build_sketch call when the sketch is first built: it is written into its buffer chunk by chunk instead of
# existing twice.
_SKETCH_BUILD_ROWS = 4096


class RowViews(NamedTuple):
    """The storage's live rows, as retrieval reads them. ``state`` identifies the buffers and row count they were
    made from; ``thresholds`` is None while no row has one of its own (so that retrieval skips the test) and
    ``relation_keys`` None while no row has one."""

    state: tuple
    keys: torch.Tensor
    values: torch.Tensor
    sketch: torch.Tensor | None
    signs: torch.Tensor | None
    thresholds: torch.Tensor | None
    relation_keys: torch.Tensor | None


def moved(buf: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``buf.to(device)``, into :func:`neuraldb.host_memory.empty` storage when ``device`` is the CPU."""
    if device.type != "cpu":
        return buf.to(device)
    return host_memory.empty(tuple(buf.shape), buf.dtype, device).copy_(buf)


class RowStorage:
    """Rows ``[0, n)`` of ``(capacity, key_dim)`` keys and ``(capacity, value_dim)`` values in ``dtype`` on
    ``device``, ``(capacity,)`` float32 gate thresholds (:data:`NO_THRESHOLD` for a row without one), and the keys'
    sketches once built."""

    def __init__(
        self, key_dim: int, value_dim: int, dtype: torch.dtype, device: torch.device | str, capacity: int
    ) -> None:
        self.key_dim, self.value_dim, self.dtype = key_dim, value_dim, dtype
        self.keys_buf = host_memory.empty((capacity, key_dim), dtype, device)
        self.values_buf = host_memory.empty((capacity, value_dim), dtype, device)
        self.thresholds_buf = torch.empty((capacity,), dtype=torch.float32, device=device)
        # Relation keys (capacity, key_dim), like the keys; None until a row gets one (zeros: a row without one).
        self.relation_buf: torch.Tensor | None = None
        self.sketch_buf: torch.Tensor | None = None
        self.signs_buf: torch.Tensor | None = None  # built and dropped with sketch_buf
        self.n = 0
        self.cached_views: tuple = ()

    @classmethod
    def adopt(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        thresholds: torch.Tensor | None = None,
        relation_keys: torch.Tensor | None = None,
    ) -> RowStorage:
        """Storage whose buffers are ``keys``/``values`` (and ``thresholds``, ``relation_keys`` when given; contiguous,
        full), without a copy."""
        out = cls.__new__(cls)
        out.key_dim, out.value_dim, out.dtype = keys.shape[1], values.shape[1], keys.dtype
        out.keys_buf, out.values_buf = keys, values
        if thresholds is None:
            thresholds = torch.full((keys.shape[0],), NO_THRESHOLD, device=keys.device)
        out.thresholds_buf = thresholds
        out.relation_buf = relation_keys
        out.sketch_buf = out.signs_buf = None
        out.n = keys.shape[0]
        out.cached_views = ()
        return out

    @property
    def device(self) -> torch.device:
        return self.keys_buf.device

    @property
    def capacity(self) -> int:
        return self.keys_buf.shape[0]

    @property
    def keys(self) -> torch.Tensor:
        return self.keys_buf[: self.n]

    @property
    def values(self) -> torch.Tensor:
        return self.values_buf[: self.n]

    @property
    def thresholds(self) -> torch.Tensor:
        return self.thresholds_buf[: self.n]

    @property
    def relation_keys(self) -> torch.Tensor | None:
        return None if self.relation_buf is None else self.relation_buf[: self.n]

    @property
    def sketch(self) -> torch.Tensor | None:
        return None if self.sketch_buf is None else self.sketch_buf[: self.n]

    @property
    def signs(self) -> torch.Tensor | None:
        return None if self.signs_buf is None else self.signs_buf[: self.n]

    def views(self) -> RowViews:
        """The live rows as :class:`RowViews`, made once per state of the storage and kept as
        :attr:`cached_views`: a plan bound to these tensors stays valid while ``cached_views`` is the same object.
        Keyed on the buffers' identities and the row count, so a writer that forgets :meth:`changed` costs memory,
        never correctness (the cached views keep their buffers alive, so an identity cannot be reused while it is
        cached); the writers that replace a buffer call it, so that it does not keep the old one alive."""
        key = (self.n, id(self.keys_buf), id(self.values_buf), id(self.sketch_buf), id(self.signs_buf))
        views = self.cached_views
        if not views or views.state != key:
            thresholds = self.thresholds
            active = thresholds if bool((thresholds > NO_THRESHOLD).any()) else None
            self.cached_views = views = RowViews(
                key, self.keys, self.values, self.sketch, self.signs, active, self.relation_keys
            )  # fmt: skip
        return views

    def changed(self) -> None:
        """Drop the cached views: every plan bound to them is stale."""
        self.cached_views = ()

    # -- allocation (may fail; changes no row) ------------------------------------------------------------------

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows (the capacity doubles, from :data:`MIN_CAPACITY`); the live rows are kept."""
        cap = self.capacity
        if rows <= cap:
            return
        cap = max(cap, MIN_CAPACITY)
        while cap < rows:
            cap *= 2
        self.keys_buf = self._grown(self.keys_buf, cap)
        self.values_buf = self._grown(self.values_buf, cap)
        self.thresholds_buf = self._grown(self.thresholds_buf, cap)
        if self.relation_buf is not None:
            self.relation_buf = self._grown(self.relation_buf, cap)
        if self.sketch_buf is not None:
            self.sketch_buf = self._grown(self.sketch_buf, cap)
            self.signs_buf = self._grown(self.signs_buf, cap)
        self.changed()

    def _grown(self, buf: torch.Tensor, cap: int) -> torch.Tensor:
        out = host_memory.empty((cap, *buf.shape[1:]), buf.dtype, self.device)
        out[: self.n].copy_(buf[: self.n])
        return out

    def sketch_rows(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sketch rows of ``keys`` on this device while the sketches exist, else None."""
        if self.sketch_buf is None:
            return None
        return build_sketch(keys).to(self.device), build_signs(keys).to(self.device)

    def ensure_sketch(self) -> None:
        """Build both sketches of every live row if they do not exist yet."""
        if self.sketch_buf is not None:
            return
        sketch = host_memory.empty((self.capacity, sketch_row_bytes(self.key_dim)), torch.uint8, self.device)
        signs = host_memory.empty((self.capacity, sign_row_bytes(self.key_dim)), torch.uint8, self.device)
        for start in range(0, self.n, _SKETCH_BUILD_ROWS):
            stop = min(self.n, start + _SKETCH_BUILD_ROWS)
            sketch[start:stop] = build_sketch(self.keys_buf[start:stop])
            signs[start:stop] = build_signs(self.keys_buf[start:stop])
        self.sketch_buf, self.signs_buf = sketch, signs
        self.changed()

    def drop_sketch(self) -> None:
        self.sketch_buf = self.signs_buf = None
        self.changed()

    def to(self, device: torch.device) -> None:
        """Move every buffer to ``device``; the sketches are dropped off the CPU (rebuilt there on the first call
        that reads them)."""
        if device == self.device:
            return
        self.keys_buf = moved(self.keys_buf, device)
        self.values_buf = moved(self.values_buf, device)
        self.thresholds_buf = moved(self.thresholds_buf, device)
        if self.relation_buf is not None:
            self.relation_buf = moved(self.relation_buf, device)
        if device.type != "cpu":
            self.sketch_buf = self.signs_buf = None
        else:
            for name in ("sketch_buf", "signs_buf"):
                if getattr(self, name) is not None:
                    setattr(self, name, moved(getattr(self, name), device))
        self.changed()

    # -- writes into reserved rows (no allocation beyond index tensors) -----------------------------------------

    def write(
        self,
        start: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        sketch: tuple[torch.Tensor, torch.Tensor] | None,
        thresholds: torch.Tensor | None = None,
        relation_keys: torch.Tensor | None = None,
    ) -> None:
        """Copy rows into ``[start, start + len(keys))`` of the reserved buffers; ``sketch`` is their
        :meth:`sketch_rows` (built here if the sketches exist and it is None), ``thresholds`` and ``relation_keys``
        theirs (None: none)."""
        stop = start + keys.shape[0]
        if relation_keys is not None:
            self.enable_relations()
        if self.relation_buf is not None:
            if relation_keys is None:
                self.relation_buf[start:stop].zero_()
            else:
                self.relation_buf[start:stop].copy_(relation_keys)
        self.keys_buf[start:stop].copy_(keys)
        self.values_buf[start:stop].copy_(values)
        if thresholds is None:
            self.thresholds_buf[start:stop].fill_(NO_THRESHOLD)
        else:
            self.thresholds_buf[start:stop].copy_(thresholds)
        self.changed()
        if self.sketch_buf is not None:
            sk, sg = self.sketch_rows(keys) if sketch is None else sketch
            self.sketch_buf[start:stop].copy_(sk)
            self.signs_buf[start:stop].copy_(sg)

    def write_at(
        self,
        rows: list[int],
        keys: torch.Tensor | None,
        values: torch.Tensor | None,
        thresholds: torch.Tensor | None = None,
        relation_keys: torch.Tensor | None = None,
    ) -> None:
        """Replace the keys, values, thresholds and/or relation keys of live ``rows`` (the sketches follow the keys).
        A new key without a new threshold drops the row's threshold: it was fitted to the old key."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        if relation_keys is not None:
            self.enable_relations()
            self.relation_buf.index_copy_(0, index, relation_keys.to(self.device))
            self.changed()
        if thresholds is not None:
            self.thresholds_buf.index_copy_(0, index, thresholds.to(self.device))
        elif keys is not None:
            self.thresholds_buf.index_fill_(0, index, NO_THRESHOLD)
        if thresholds is not None or keys is not None:
            self.changed()
        if keys is not None:
            self.keys_buf.index_copy_(0, index, keys.to(self.device))
            if self.sketch_buf is not None:
                sk, sg = self.sketch_rows(keys)
                self.sketch_buf.index_copy_(0, index, sk)
                self.signs_buf.index_copy_(0, index, sg)
        if values is not None:
            self.values_buf.index_copy_(0, index, values.to(self.device))

    def gather(self, rows: list[int]) -> list[torch.Tensor | None]:
        """Copies of ``rows`` of every buffer (keys, values, sketch, signs, thresholds; None for a missing sketch): what
        :meth:`move` writes back elsewhere."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return [None if b is None else b.index_select(0, index) for b in self._buffers()]

    def move(self, dst: list[int] | int, rows: list[torch.Tensor | None]) -> None:
        """Write rows made by :meth:`gather` to the rows ``dst`` (a list, or the first of consecutive rows)."""
        for buf, part in zip(self._buffers(), rows):
            if buf is None or part is None:
                continue
            if isinstance(dst, int):
                buf[dst : dst + part.shape[0]].copy_(part)
            else:
                buf.index_copy_(0, torch.tensor(dst, dtype=torch.long, device=self.device), part)

    def set_count(self, n: int) -> None:
        self.n = n
        self.changed()

    def _buffers(self) -> tuple[torch.Tensor | None, ...]:
        return self.keys_buf, self.values_buf, self.sketch_buf, self.signs_buf, self.thresholds_buf, self.relation_buf

    def enable_relations(self) -> None:
        """Allocate the relation keys (zeros: no row has one) if they do not exist yet."""
        if self.relation_buf is None:
            self.relation_buf = torch.zeros((self.capacity, self.key_dim), dtype=self.dtype, device=self.device)
            self.changed()

    # -- reads ----------------------------------------------------------------------------------------------------

    def overflowing_rows(self, dtype: torch.dtype, chunk: int = 4096) -> tuple[list[int], float]:
        """The first live rows whose residuals are not finite in ``dtype`` and the largest magnitude among them."""
        rows: list[int] = []
        top = 0.0
        for start in range(0, self.n, chunk):
            v = self.values_buf[start : min(self.n, start + chunk)]
            over = ~torch.isfinite(v.to(dtype)).all(dim=1)
            if over.any():
                rows += (over.nonzero().flatten()[:5] + start).tolist()
                top = max(top, float(v.abs().amax()))
        return rows, top


__all__ = ["MIN_CAPACITY", "NO_THRESHOLD", "RowStorage", "RowViews", "moved"]
