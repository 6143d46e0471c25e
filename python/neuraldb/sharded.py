"""``ShardedNeuralKVDatabase``: one logical database whose rows are split across the ranks of a process group.

The class: its state (the local shard, the sorted live ids), local reads and the calling convention; every
collective method follows the same validate, agree, apply protocol. The agreement itself is
:mod:`neuraldb.sharded_agreement`, reads across shards (``get``/``retrieve``/``gather``)
:mod:`neuraldb.sharded_retrieval`, the writes :mod:`neuraldb.sharded_writes`, the files :mod:`neuraldb.sharded_io`,
the rows of each rank an ordinary ordered :class:`~neuraldb.NeuralKVDatabase`.

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
and per-row gate thresholds with rows sorted by id (``db.gather()`` builds it; what a single database only ever
appended to holds). Retrieval returns exactly its result, including the tie-break (lowest id on equal scores) and
the winner's own gate threshold, for any number of ranks: every shard keeps its rows in id order (``delete``
compacts the shard's tail instead of swapping the last row in), so a shard's lowest tied row is its lowest tied id.

Retrieval across the shards (one ``all_reduce`` of packed (score, id) per row, then the winning residuals):
:mod:`neuraldb.sharded_retrieval`; the collective writes (``add``/``update``/``delete``/``set_thresholds``,
``from_database``): :mod:`neuraldb.sharded_writes`.

Files (``save``/``load``, a directory with one ``NeuralKVDatabase`` file per rank): :mod:`neuraldb.sharded_io`.

Example (run on every rank, after ``torch.distributed.init_process_group``)::

    >>> db = neuraldb.ShardedNeuralKVDatabase(1536, 576)          # doctest: +SKIP
    >>> ids = db.add(keys, residuals, facts=facts)                 # doctest: +SKIP
    >>> neuraldb.patch_model(model, db, layer=8)                   # doctest: +SKIP
    >>> db.save("edits.sharded")                                   # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuraldb import sharded_retrieval as _retrieval
from neuraldb import sharded_writes as _writes
from neuraldb.database import NeuralKVDatabase
from neuraldb.database_inputs import (
    FactLike,
    as_id,
)
from neuraldb.sharded_agreement import (
    ShardedCallError,
    _agree_call,
    _as_timeout,
    _header_device,
)
from neuraldb.sharded_io import load_sharded, save_sharded
from neuraldb.sharded_retrieval import pack_score_id, unpack_score_id
from neuraldb.sharded_writes import _MIN_LIVE


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
    :meth:`retrieve`, which returns exactly what ``retrieve`` returns on the equivalent single database (all live
    facts in id order, with their gate thresholds), with fact ids in place of row indices. All whole-database
    methods are collective; see the module docstring for the calling convention and the communication per token.

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
    model_identity = _forward("model_identity")

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
        return _retrieval.get(self, id)

    def fact(self, id: int) -> FactLike:
        """Collective: the fact metadata of ``id``."""
        return self.get(id)[2]

    # -- write (collective by convention; no communication) --------------------------------------------------------

    def add(
        self,
        keys: torch.Tensor,
        residuals: torch.Tensor,
        facts: Sequence[FactLike] | None = None,
        *,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
    ) -> list[int]:
        """Collective: append facts (the same arguments on every rank); returns their global ids. Each rank keeps
        the rows it owns. ``thresholds``: None or the rows' own gate thresholds, as for :meth:`set_thresholds`.
        Nothing changes on any rank unless the call succeeds on every rank: each validates all rows and prepares
        its part, the ranks agree, and only then does each keep its rows."""
        return _writes.add(self, keys, residuals, facts, thresholds=thresholds)

    def update(
        self,
        ids: int | Iterable[int],
        keys: torch.Tensor | None = None,
        residuals: torch.Tensor | None = None,
        *,
        facts: Sequence[FactLike] | None = None,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Collective: replace keys, residuals, facts and/or gate thresholds of existing ``ids``; each owner updates
        its rows. A new key without a new threshold drops the row's threshold, as in ``NeuralKVDatabase.update``.
        Nothing changes on any rank unless the call is valid on every rank."""
        _writes.update(self, ids, keys, residuals, facts=facts, thresholds=thresholds)

    def set_thresholds(self, ids: int | Iterable[int], thresholds: float | Sequence[float] | torch.Tensor) -> None:
        """Collective: give rows ``ids`` their own gate thresholds (one number for all, or one per id; each in
        [-1, 1], -1 to remove a row's threshold), as ``NeuralKVDatabase.set_thresholds``; each owner keeps its
        rows'. KeyError for unknown ids, TypeError/ValueError naming ``thresholds`` for bad ones, on every rank;
        nothing changes on any rank unless the call is valid on every rank. Read them back with
        ``db.shard.thresholds`` (this rank's rows, in :meth:`local_ids` order) or ``db.gather().thresholds``."""
        _writes.set_thresholds(self, ids, thresholds)

    def delete(self, ids: int | Iterable[int]) -> None:
        """Collective: remove ``ids`` (KeyError on every rank for unknown ids; nothing changes on any rank unless
        the call is valid on every rank). The owner keeps its rows in id order, moving the shard's rows after the
        first hole (batch deletes)."""
        _writes.delete(self, ids)

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

    def retrieve(
        self, queries: torch.Tensor, gamma: float, *, backend: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective: ``gated_retrieval`` over the whole database, with its rows' gate thresholds.

        Returns ``out (..., value_dim)`` in the queries' dtype (the same on every rank), ``ids (...)`` int64 (the
        winning fact ids, -1 when the database is empty) and ``score (...)`` float32: exactly ``retrieve`` on the
        equivalent single database (:meth:`gather`), whose ``idx`` is :meth:`index_of` of these ids. A row whose
        score passes gamma but not the winner's own threshold gets zeros (never another row's residual).
        """
        return _retrieval.retrieve(self, queries, gamma, backend=backend)

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
        return _writes.from_database(cls, db, process_group=process_group, device=device, **kwargs)

    def gather(self) -> NeuralKVDatabase:
        """Collective: the equivalent single database (all live facts, rows in id order, their gate thresholds, same
        metadata) on every rank, on CPU. For tests and small databases: it moves every row to every rank."""
        return _retrieval.gather(self)

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
