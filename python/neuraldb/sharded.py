"""``ShardedNeuralKVDatabase``: one logical database whose rows are split across the ranks of a process group.

Over 400 lines because it is one object whose every collective method follows the same validate, agree, apply
protocol; the agreement itself is :mod:`neuraldb.sharded_agreement`, the files :mod:`neuraldb.sharded_io`, the rows
of each rank an ordinary ordered :class:`~neuraldb.NeuralKVDatabase`.

Why: at Llama-3-8B width a fact costs ~37 KB (fp16 key of 14336 + residual of 4096), so 10M facts (~370 GB) do
not fit one GPU. The rows are spread over the ranks the model is already served on, and retrieval runs on every
rank's shard in parallel, using torch.distributed (NCCL on GPUs, gloo on CPUs); see ``docs/sharding.md``.

Calling convention: **every method that changes or reads the whole database is collective** -- all ranks of the
group call it, in the same order, with the same arguments (the same ``keys``/``residuals``/``facts``/``ids`` on
every rank, as with model weights). That makes id assignment deterministic without any communication:

- ids are global, increasing and never reused; every rank allocates the same ids for the same ``add``;
- the row of id ``i`` lives on rank ``i % world_size`` (round-robin), so batches spread evenly;
- every rank keeps the sorted live ids (8 bytes per live fact), so unknown ids raise the same ``KeyError`` on
  every rank and ``len(db)``, ``ids()`` and ``in`` need no communication;
- every collective call starts by checking the convention: one ``all_reduce(SUM)`` of a 64-bit hash of the method,
  the database's state, the arguments (for ``add``/``update``/``delete`` their contents; for retrieval a few
  scalars) and whether the call failed on this rank (:func:`_agree_call`). Ranks that disagree, or a call that
  failed on some rank, raise :class:`ShardedCallError` (or their own error) on every rank before anything changes;
  a rank that never makes the call leaves the others waiting ``timeout`` seconds, then ``TimeoutError``.

The equivalent single database is **all live facts in id order**: a ``NeuralKVDatabase`` holding the same facts
with rows sorted by id (``db.gather()`` builds it; it is what a single database that was only ever appended to
holds). Retrieval returns exactly its result, including the tie-break (lowest id on equal scores), for any
number of ranks: every shard keeps its rows in id order (``delete`` compacts the shard's tail instead of
swapping the last row in), so a shard's lowest tied row is its lowest tied id.

Retrieval (:meth:`ShardedNeuralKVDatabase.retrieve`), per call of T query rows:

1. each rank runs ``gated_retrieval`` on its shard (no communication) -> local best (score, id) and its
   gated residual; then the agreement's one-int64 ``all_reduce`` (after the scan, so a scan that failed on one
   rank fails the call on all);
2. ``all_reduce(MAX)`` of one int64 per row that packs (score, -id), so the maximum is the best score with the
   lowest id on ties -- every rank learns the global winner and its exact fp32 score;
3. only rows whose global score passes the gate (``score > gamma``) are exchanged: ``all_reduce(SUM)`` of those
   rows' residuals, zeros except on the winning rank (skipped entirely when no row passes; ``compact=False``
   reduces all T rows instead, which avoids a device->host sync on GPUs).

Files (``save``/``load``, a directory with one ``NeuralKVDatabase`` file per rank): :mod:`neuraldb.sharded_io`.

Example (run on every rank, after ``torch.distributed.init_process_group``)::

    >>> db = neuraldb.ShardedNeuralKVDatabase(1536, 576)          # doctest: +SKIP
    >>> ids = db.add(keys, residuals, facts=facts)                 # doctest: +SKIP
    >>> neuraldb.patch_model(model, db, layer=8)                   # doctest: +SKIP
    >>> db.save("edits.sharded")                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.database import NeuralKVDatabase
from neuraldb.database_inputs import (
    FactLike,
    as_id,
    as_rows,
    check_ids,
    check_new_rows,
    check_replacement,
)
from neuraldb.database_state import METADATA as _METADATA
from neuraldb.database_state import DatabaseState
from neuraldb.sharded_agreement import (
    _LOW32,
    MAX_IDS,
    ShardedCallError,
    _agree_call,
    _as_timeout,
    _dtype_code,
    _header_device,
    _json_field,
    _number,
    _tensor_field,
)
from neuraldb.sharded_io import load_sharded, save_sharded
from neuraldb_kernels import check_gamma, gated_retrieval

# Initial capacity of the sorted live ids (it doubles as facts are added). Sorted ids rather than a bitmap over
# [0, next_id): their size is what the shards hold, where a bitmap's is whatever next_id a manifest claims.
_MIN_LIVE = 64


# torch >= 2.14 renames all_gather_into_tensor (same semantics: rank outputs concatenated along dim 0).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -- (score, id) packing: one int64 whose maximum is the best score, then the lowest id ----------------------------


def pack_score_id(score: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like ``(score, -id)``: fp32 ``score`` in the high 32 bits (bit pattern made monotone),
    ``2^32 - 2 - id`` in the low 32 bits (``id`` in [-1, 2^32 - 2])."""
    bits = (score.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (bits << 32) | (_LOW32 - (ids.to(torch.int64) + 1))


def unpack_score_id(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_score_id`: ``(score float32, id int64)``."""
    bits = key >> 32
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32), _LOW32 - (key & _LOW32) - 1


_dtensor: tuple[type, ...] | None = None


def _is_dtensor(t: object) -> bool:
    # Imported once: an import statement costs ~12 us per call, which a decode step would pay twice.
    global _dtensor
    if _dtensor is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - old torch
            _dtensor = ()
        else:
            _dtensor = (DTensor,)
    return isinstance(t, _dtensor)


def _forward(name: str) -> property:
    """A metadata attribute kept on the local shard (so every shard file carries it)."""

    def fget(self: ShardedNeuralKVDatabase) -> Any:
        return getattr(self._shard, name)

    def fset(self: ShardedNeuralKVDatabase, value: Any) -> None:
        setattr(self._shard, name, value)

    return property(fget, fset, doc=f"``{name}``, as on NeuralKVDatabase (set it to the same value on every rank).")


class ShardedNeuralKVDatabase:
    """A :class:`~neuraldb.NeuralKVDatabase` split across the ranks of a ``torch.distributed`` process group.

    Same API as the single database (``add``/``update``/``delete``/``get``/``save``/``load``, stable ids), plus
    :meth:`retrieve`, which returns exactly what ``gated_retrieval`` returns on the equivalent single database
    (all live facts in id order), with fact ids in place of row indices. All whole-database methods are
    collective; see the module docstring for the calling convention and the communication per token.

    Every collective method first checks, in one small ``all_reduce`` on every rank, that all ranks made the same
    call (method, argument shapes and dtypes, for ``add``/``update``/``delete`` their contents, for retrieval the
    query row count, width, dtype and gamma, and the database's ``next_id`` and length) and that none failed; if
    not, it raises :class:`ShardedCallError` (or a rank's own error) on every rank and no rank changes anything.

    Args:
        key_dim, value_dim, dtype, device: as for ``NeuralKVDatabase`` (``device`` is this rank's, e.g.
            ``f"cuda:{local_rank}"``).
        process_group: the group whose ranks hold the shards (None: the default group). Requires
            ``torch.distributed`` to be initialised.
        query_parallel: the queries each rank passes to :meth:`retrieve` are its slice of the key dimension (a
            tensor-parallel down-projection's input, rank order, ``key_dim / world_size`` features each): they are
            all-gathered along the last dimension before the lookup. Queries that are ``DTensor`` are gathered with
            ``full_tensor()`` whatever this flag says.
        compact: exchange only the rows whose gate opens (default). ``False`` reduces every row's residual, which
            costs more bytes but no device->host synchronisation (better for CUDA graphs / NCCL pipelines).
        timeout: seconds (or a ``timedelta``) a collective method waits for the other ranks to make the same call
            before raising ``TimeoutError`` naming the method (None: the process group's timeout, 30 minutes by
            default). It bounds the wait at the start of each call, where a rank that did not make the call is
            noticed; set it above the largest lag between ranks reaching the same call. After a timeout the
            process group is out of step: destroy it and restart the ranks.
    """

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        *,
        process_group: Any = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        query_parallel: bool = False,
        compact: bool = True,
        timeout: float | datetime.timedelta | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ShardedNeuralKVDatabase needs torch.distributed initialised (torch.distributed.init_process_group) "
                "on every rank; use NeuralKVDatabase for one process"
            )
        self._group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if self.rank < 0:
            raise ValueError("process_group: this process is not a member of it")
        # Rows in id order, so the kernel's lowest tied row is the lowest tied id; its files are ordinary ones.
        self._shard = NeuralKVDatabase(key_dim, value_dim, dtype=dtype, device=device, ordered=True)
        self.query_parallel = bool(query_parallel)
        if self.query_parallel and key_dim % self.world_size:
            raise ValueError(f"query_parallel needs key_dim ({key_dim}) divisible by world_size ({self.world_size})")
        self.compact = bool(compact)
        self.timeout = timeout
        self._live = torch.empty(_MIN_LIVE, dtype=torch.int64)  # the live ids, increasing, in [: self._count]
        self._header_cache: tuple[torch.device, torch.device] | None = None
        self._count = 0
        self._version = 0
        self._id_cache: tuple[int, torch.device, torch.Tensor] | None = None

    # -- metadata: kept on the shard so every shard file carries it -----------------------------------------------

    key_dim = property(lambda self: self._shard.key_dim)
    value_dim = property(lambda self: self._shard.value_dim)
    dtype = property(lambda self: self._shard.dtype)
    device = property(lambda self: self._shard.device, doc="This rank's device.")
    lock = property(lambda self: self._shard.lock, doc="This rank's lock (held by mutations and retrievals).")
    next_id = property(lambda self: self._shard.next_id, doc="The id the next added fact gets (the same on all ranks).")
    process_group = property(lambda self: self._group)

    @property
    def timeout(self) -> datetime.timedelta | None:
        """How long a collective method waits for the other ranks to make the same call (None: the process
        group's timeout); set it in seconds or as a ``timedelta``."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | datetime.timedelta | None) -> None:
        self._timeout = _as_timeout(value)

    shard = property(lambda self: self._shard, doc="This rank's rows: a NeuralKVDatabase in id order (read only).")

    layer = _forward("layer")
    gamma = _forward("gamma")
    template = _forward("template")
    model_id = _forward("model_id")
    module_path = _forward("module_path")
    config = _forward("config")

    @property
    def query_dim(self) -> int:
        """Features of the queries each rank passes to :meth:`retrieve` (``key_dim / world_size`` when
        ``query_parallel``); ``patch_model`` checks the patched module against it."""
        return self.key_dim // self.world_size if self.query_parallel else self.key_dim

    # -- read (local, no communication) ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __contains__(self, id: object) -> bool:
        """Whether ``id`` (an int or a 0-d integer tensor; TypeError for anything else, as the single database) is
        live."""
        i = as_id(id)
        return 0 <= i < self.next_id and not self._missing([i])

    def __iter__(self):
        return iter(self.ids())

    def ids(self) -> list[int]:
        """All live ids, increasing: the row order of the equivalent single database."""
        return self._live[: self._count].tolist()

    def owner(self, id: int) -> int:
        """The rank (in the process group) that holds id ``id``."""
        return int(id) % self.world_size

    def local_ids(self) -> list[int]:
        """The ids this rank holds, increasing."""
        return self._shard.ids()

    def index_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` in the equivalent single database (-1 stays -1), e.g. to compare with ``gated_retrieval``."""
        flat = ids.reshape(-1).cpu().to(torch.int64)
        out = torch.where(flat >= 0, torch.searchsorted(self._live[: self._count], flat), flat)
        return out.reshape(ids.shape).to(ids.device)

    def _check_call(self, method: str, fields: Sequence[tuple[str, int, object]], error: BaseException | None) -> None:
        """Collective: every rank called ``method`` with the same ``fields`` on the same database state, and none
        failed (:func:`_agree_call`); raises on every rank otherwise."""
        state = (("next_id", self.next_id, self.next_id), ("len", self._count, self._count))
        _agree_call(self._group, self._header_device(), method, (*state, *fields), error, self._timeout)

    def _header_device(self) -> torch.device:
        cache = getattr(self, "_header_cache", None)
        if cache is None or cache[0] != self.device:
            self._header_cache = cache = (self.device, _header_device(self._group, self.device))
        return cache[1]

    def _missing(self, id_list: list[int]) -> list[int]:
        """The ids of ``id_list`` that are not live (one search for all of them)."""
        candidates = [i for i in id_list if 0 <= i < self.next_id]
        missing = [i for i in id_list if not 0 <= i < self.next_id]
        if candidates:
            live = self._live[: self._count]
            t = torch.tensor(candidates, dtype=torch.int64)
            pos = torch.searchsorted(live, t).clamp_max(max(len(live) - 1, 0))
            found = live[pos] == t if len(live) else torch.zeros(len(t), dtype=torch.bool)
            missing += t[~found].tolist()
        return missing

    def _check_live(self, id_list: list[int]) -> None:
        missing = self._missing(id_list)
        if missing:
            raise KeyError(f"ids not in the database: {missing[:5]}")

    def get(self, id: int) -> tuple[torch.Tensor, torch.Tensor, FactLike]:
        """Collective: ``(key, residual, fact)`` of ``id`` on every rank (sent by its owner; tensors on CPU)."""
        error: BaseException | None = None
        i = -1
        try:
            if isinstance(id, bool) or not hasattr(id, "__index__"):
                raise TypeError(f"id must be an int, got {type(id).__name__}")
            i = int(id)  # type: ignore[call-overload]
            if i not in self:
                raise KeyError(f"id {i} is not in the database")
        except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
            error = exc
        self._check_call("get", [("id", _number(i), i)], error)
        owner = self.owner(i)
        box: list[Any] = [None]
        if self.rank == owner:
            key, residual, fact = self._shard.get(i)
            box[0] = (key.cpu(), residual.cpu(), fact)
        src = dist.get_global_rank(self._group, owner) if self._group is not None else owner
        dist.broadcast_object_list(box, src=src, group=self._group)
        return box[0]

    def fact(self, id: int) -> FactLike:
        """Collective: the fact metadata of ``id``."""
        return self.get(id)[2]

    # -- write (collective by convention; no communication) --------------------------------------------------------

    def add(self, keys: torch.Tensor, residuals: torch.Tensor, facts: Sequence[FactLike] | None = None) -> list[int]:
        """Collective: append facts (the same arguments on every rank); returns their global ids. Each rank keeps
        the rows it owns. Nothing changes on any rank unless the call succeeds on every rank: each validates all
        rows and prepares its part, the ranks agree, and only then does each keep its rows."""
        with self.lock:
            first, m, error, change = self.next_id, 0, None, None
            try:
                # Validated whole on every rank; the shard normalises its own raw rows, once, as the single database.
                _, _, fs = check_new_rows(
                    keys, residuals, facts, key_dim=self.key_dim, value_dim=self.value_dim, dtype=self.dtype
                )
                k = as_rows("keys", keys, self.key_dim, "key_dim")
                v = as_rows("residuals", residuals, self.value_dim, "value_dim")
                m = k.shape[0]
                if first + m > MAX_IDS:
                    raise ValueError(f"a sharded database holds at most {MAX_IDS} ids over its lifetime")
                mine = list(range((self.rank - first) % self.world_size, m, self.world_size))
                sel = torch.tensor(mine, dtype=torch.long)
                change = self._shard.stage_add(
                    k.index_select(0, sel.to(k.device)),
                    v.index_select(0, sel.to(v.device)),
                    [fs[j] for j in mine],
                    ids=[first + j for j in mine],
                    next_id=first + m,
                )
                self._grow_live(self._count + m)
                new_live = torch.arange(first, first + m)
            except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
                error = exc
            fields = [_tensor_field("keys", keys), _tensor_field("residuals", residuals), _json_field("facts", facts)]
            self._check_call("add", fields, error)
            new_ids = list(range(first, first + m))
            if m == 0:
                return new_ids
            change.commit()
            self._live[self._count : self._count + m] = new_live
            self._count += m
            self._version += 1
        return new_ids

    def update(
        self,
        ids: int | Iterable[int],
        keys: torch.Tensor | None = None,
        residuals: torch.Tensor | None = None,
        *,
        facts: Sequence[FactLike] | None = None,
    ) -> None:
        """Collective: replace keys, residuals and/or facts of existing ``ids``; each owner updates its rows.
        Nothing changes on any rank unless the call is valid on every rank."""
        with self.lock:
            error, id_list, mine, k, v = None, None, [], None, None
            try:
                # Validated here, on this rank, rather than in the shard's update; the shard normalises the raw rows
                # itself, once, as the single database does.
                id_list, _, _, fs = check_replacement(
                    ids, keys, residuals, facts, key_dim=self.key_dim, value_dim=self.value_dim, dtype=self.dtype
                )
                k = None if keys is None else as_rows("keys", keys, self.key_dim, "key_dim")
                v = None if residuals is None else as_rows("residuals", residuals, self.value_dim, "value_dim")
                self._check_live(id_list)
                mine = [j for j, i in enumerate(id_list) if self.owner(i) == self.rank]
            except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
                error = exc
            fields = [
                _json_field("ids", ids if id_list is None else id_list),
                _tensor_field("keys", keys),
                _tensor_field("residuals", residuals),
                _json_field("facts", facts),
            ]
            self._check_call("update", fields, error)
            if not mine:
                return
            # The raw rows: the shard normalises them once, as the single database does.
            sel = torch.tensor(mine, dtype=torch.long)
            self._shard.update(
                [id_list[j] for j in mine],
                None if k is None else k.index_select(0, sel.to(k.device)),
                None if v is None else v.index_select(0, sel.to(v.device)),
                facts=None if fs is None else [fs[j] for j in mine],
            )

    def delete(self, ids: int | Iterable[int]) -> None:
        """Collective: remove ``ids`` (KeyError on every rank for unknown ids; nothing changes on any rank unless
        the call is valid on every rank). The owner keeps its rows in id order, moving the shard's rows after the
        first hole (batch deletes)."""
        with self.lock:
            error, id_list, plan, kept = None, None, None, None
            try:
                id_list = check_ids(ids)
                self._check_live(id_list)
                plan = self._shard.stage_delete([i for i in id_list if self.owner(i) == self.rank])
                live = self._live[: self._count]
                kept = live[~torch.isin(live, torch.tensor(id_list, dtype=torch.int64))]
            except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
                error = exc
            self._check_call("delete", [_json_field("ids", ids if id_list is None else id_list)], error)
            if not id_list:
                return
            plan.commit()
            self._live[: len(kept)] = kept
            self._count = len(kept)
            self._version += 1

    def to(self, device: torch.device | str) -> ShardedNeuralKVDatabase:
        """Move this rank's shard to ``device`` in place (local, not collective)."""
        self._shard.to(device)
        return self

    def _grow_live(self, n: int) -> None:
        """Room for ``n`` live ids (the capacity doubles)."""
        if n > len(self._live):
            grown = torch.empty(max(n, 2 * len(self._live)), dtype=torch.int64)
            grown[: self._count] = self._live[: self._count]
            self._live = grown

    def _local_id_tensor(self) -> torch.Tensor:
        """This shard's row ids as an int64 tensor on its device (cached until the next add/delete)."""
        cache = self._id_cache
        if cache is None or cache[0] != self._version or cache[1] != self.device:
            t = torch.tensor(self._shard.ids(), dtype=torch.int64, device=self.device)
            self._id_cache = cache = (self._version, self.device, t)
        return cache[2]

    # -- retrieval (collective) ------------------------------------------------------------------------------------

    def _full_queries(self, queries: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(queries):
            return queries.full_tensor()
        if not self.query_parallel:
            return queries
        part = queries.shape[-1]
        if part * self.world_size != self.key_dim:
            raise ValueError(
                f"queries: with query_parallel each rank passes key_dim / world_size = "
                f"{self.key_dim // self.world_size} features, got {part}"
            )
        q = queries.reshape(-1, part).contiguous()
        gathered = q.new_empty((self.world_size * q.shape[0], part))
        _all_gather_single(gathered, q, group=self._group)
        return gathered.reshape(self.world_size, -1, part).permute(1, 0, 2).reshape(*queries.shape[:-1], self.key_dim)

    def retrieve(
        self, queries: torch.Tensor, gamma: float, *, backend: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective: ``gated_retrieval`` over the whole database.

        Returns ``out (..., value_dim)`` in the queries' dtype (the same on every rank), ``ids (...)`` int64 (the
        winning fact ids, -1 when the database is empty) and ``score (...)`` float32: exactly ``gated_retrieval``
        on the equivalent single database (:meth:`gather`), whose ``idx`` is :meth:`index_of` of these ids.
        """
        with self.lock:
            if self.world_size == 1:  # nothing to exchange, nobody to agree with
                g = check_gamma(gamma)
                q = self._full_queries(queries)
                lead = q.shape[:-1]
                q2 = q.reshape(-1, q.shape[-1])
                out, idx, score = gated_retrieval(q2, self._shard.keys, self._shard.values, g, backend=backend)
                return out.reshape(*lead, self.value_dim), self._global_ids(idx).reshape(lead), score.reshape(lead)
            # A few scalars, never the queries' contents: this runs on every patched forward.
            error = None
            try:
                g = check_gamma(gamma)
            except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
                error = exc
            shape = getattr(queries, "shape", ())
            rows = math.prod(shape[:-1]) if len(shape) else -1
            width = shape[-1] if len(shape) else -1
            dtype = getattr(queries, "dtype", None)
            fields = (
                ("query rows", rows, rows),
                ("query width", width, width),
                ("query dtype", _dtype_code(dtype), dtype),
                ("gamma", _number(gamma), gamma),
                ("compact", int(self.compact), self.compact),
                ("query_parallel", int(self.query_parallel), self.query_parallel),
            )
            if self.query_parallel or _is_dtensor(queries):  # the gather's sizes are these fields: agree first
                self._check_call("retrieve", fields, error)
            failure, key = error, None
            if failure is None:
                try:
                    q = self._full_queries(queries)
                    lead = q.shape[:-1]
                    q2 = q.reshape(-1, q.shape[-1])
                    out, idx, score = gated_retrieval(q2, self._shard.keys, self._shard.values, g, backend=backend)
                    key = pack_score_id(score, self._global_ids(idx))
                except Exception as exc:  # noqa: BLE001 -- the others wait in the agreement below: fail it there
                    failure = exc
            # After the local scan, so that a rank whose scan failed tells the others here.
            self._check_call("retrieve", fields, failure)
            dist.all_reduce(key, op=dist.ReduceOp.MAX, group=self._group)
            best_score, best_id = unpack_score_id(key)
            mine = (best_id >= 0) & (best_id % self.world_size == self.rank)
            if self.compact:
                open_rows = (best_score > g).nonzero().flatten()
                result = torch.zeros_like(out)
                if open_rows.numel():
                    part = torch.where(mine[open_rows, None], out[open_rows], 0).contiguous()
                    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=self._group)
                    result[open_rows] = part
            else:
                result = torch.where(mine[:, None], out, 0).contiguous()
                dist.all_reduce(result, op=dist.ReduceOp.SUM, group=self._group)
        return result.reshape(*lead, self.value_dim), best_id.reshape(lead), best_score.reshape(lead)

    def _global_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """The fact ids of the shard's rows ``idx`` (-1 stays -1)."""
        local_ids = self._local_id_tensor()
        gid = local_ids[idx.clamp_min(0)] if len(local_ids) else idx
        return torch.where(idx >= 0, gid, -1)

    # -- conversions -----------------------------------------------------------------------------------------------

    @classmethod
    def from_database(
        cls, db: NeuralKVDatabase, *, process_group: Any = None, device: torch.device | str | None = None, **kwargs: Any
    ) -> ShardedNeuralKVDatabase:
        """Collective: shard ``db`` (the same database on every rank, e.g. each loaded from one file), keeping its
        ids and metadata; every rank checks that the others passed the same database (ids, rows, facts, metadata),
        which reads it once. ``kwargs``: ``query_parallel``/``compact``/``timeout``."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedNeuralKVDatabase.from_database needs torch.distributed initialised")
        is_db = isinstance(db, NeuralKVDatabase)
        with db.lock if is_db else contextlib.nullcontext():
            error, out = None, None
            try:
                if not is_db:
                    raise TypeError(f"db must be a neuraldb.NeuralKVDatabase, got {type(db).__name__}")
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
                out._fill(ids, db.keys, db.values, [db.fact(i) for i in ids], rows, db.next_id)
                for name in _METADATA:
                    setattr(out, name, getattr(db, name))
            except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
                error = exc
            fields = [
                _json_field("ids", db.ids() if is_db else None),
                ("next_id", db.next_id if is_db else -1, db.next_id if is_db else None),
                _tensor_field("keys", db.keys if is_db else None),
                _tensor_field("values", db.values if is_db else None),
                _json_field("facts", [db.fact(i) for i in db.ids()] if is_db else None),
                _json_field("metadata", {name: getattr(db, name) for name in _METADATA} if is_db else None),
                _json_field("kwargs", {k: str(v) for k, v in kwargs.items() if k != "timeout"}),
            ]
            where = torch.device(device if device is not None else db.device if is_db else "cpu")
            timeout = _as_timeout(kwargs.get("timeout"))
            _agree_call(process_group, _header_device(process_group, where), "from_database", fields, error, timeout)
        assert out is not None
        return out

    def _fill(
        self,
        ids: list[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        facts: list[FactLike],
        rows: list[int],
        next_id: int,
        *,
        live: list[int] | None = None,
    ) -> None:
        """Restore from all live rows (any order; ``rows[j]`` is the row of ``ids[j]`` in ``keys``/``values``).
        ``live``: every live id when ``ids`` holds only some of them (a load that read only this rank's shard)."""
        mine = sorted((i, r, f) for i, r, f in zip(ids, rows, facts) if self.owner(i) == self.rank)
        sel = torch.tensor([r for _, r, _ in mine], dtype=torch.long, device=keys.device)
        state = self._shard.state().replace(
            keys=keys.index_select(0, sel).to(self.device),
            values=values.index_select(0, sel).to(self.device),
            ids=[i for i, _, _ in mine],
            facts=[f for _, _, f in mine],
            next_id=next_id,
        )
        self._shard = NeuralKVDatabase.from_state(state, ordered=True)
        live = sorted(ids if live is None else live)
        self._live = torch.tensor(live, dtype=torch.int64) if live else torch.empty(_MIN_LIVE, dtype=torch.int64)
        self._count = len(live)
        self._version += 1

    def gather(self) -> NeuralKVDatabase:
        """Collective: the equivalent single database (all live facts, rows in id order, same metadata) on every
        rank, on CPU. For tests and small databases: it moves every row to every rank."""
        with self.lock:
            self._check_call("gather", (), None)
            s = self._shard
            mine = (s.ids(), s.keys.cpu(), s.values.cpu(), [s.fact(i) for i in s.ids()])
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine, group=self._group)
        order = sorted((i, p, r) for p, part in enumerate(parts) for r, i in enumerate(part[0]))
        if order:
            keys = torch.stack([parts[p][1][r] for _, p, r in order])
            values = torch.stack([parts[p][2][r] for _, p, r in order])
        else:
            keys = torch.empty(0, self.key_dim, dtype=self.dtype)
            values = torch.empty(0, self.value_dim, dtype=self.dtype)
        ids, facts = [i for i, _, _ in order], [parts[p][3][r] for _, p, r in order]
        return NeuralKVDatabase.from_state(
            DatabaseState(
                self.key_dim,
                self.value_dim,
                self.dtype,
                keys,
                values,
                ids,
                facts,
                self.next_id,
                **{name: getattr(self, name) for name in _METADATA},
            )
        )

    # -- files -----------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Collective: write a directory holding one ``NeuralKVDatabase`` file per rank and ``manifest.json``
        (see :mod:`neuraldb.sharded_io`).

        Each rank writes its own shard (a new file name per save); rank 0 then writes the manifest atomically
        (temporary file, fsync, rename), which is the commit point: a save interrupted earlier leaves the previous
        manifest and its shard files intact. Shard files of the previous save are removed after the commit. The
        directory must be visible to every rank (a shared or node-local file system for single-node groups).
        """
        with self.lock:
            save_sharded(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        process_group: Any = None,
        device: torch.device | str = "cpu",
        timeout: float | datetime.timedelta | None = None,
        **kwargs: Any,
    ) -> ShardedNeuralKVDatabase:
        """Collective: read a directory written by :meth:`save`. With the same world size each rank reads its own
        shard (and only the ids and header of the others); with another world size every rank reads every shard
        and keeps the rows it owns (resharding). Every file is validated as by ``NeuralKVDatabase.load``, and the
        manifest against the shards (nothing is allocated from a count or next_id the shard files do not bear
        out); an error on any rank raises on all of them, as does a rank that read another manifest. ``timeout``:
        as for the constructor, also bounding the wait for the others here. ``kwargs``: ``query_parallel``/
        ``compact``."""
        return load_sharded(path, process_group=process_group, device=device, cls=cls, timeout=timeout, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ShardedNeuralKVDatabase(n={len(self)}, local={len(self._shard)}, rank={self.rank}/{self.world_size}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"device={self.device}, layer={self.layer}, gamma={self.gamma})"
        )


__all__ = ["ShardedCallError", "ShardedNeuralKVDatabase", "pack_score_id", "unpack_score_id"]
