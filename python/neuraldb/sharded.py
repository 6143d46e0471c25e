"""``ShardedNeuralKVDatabase``: one logical database whose rows are split across the ranks of a process group.

Why: at Llama-3-8B width a fact costs ~37 KB (fp16 key of 14336 + residual of 4096), so 10M facts (~370 GB) do
not fit one GPU. The rows are spread over the ranks the model is already served on, and retrieval runs on every
rank's shard in parallel, using torch.distributed (NCCL on GPUs, gloo on CPUs); see ``docs/sharding.md``.

Calling convention: **every method that changes or reads the whole database is collective** -- all ranks of the
group call it, in the same order, with the same arguments (the same ``keys``/``residuals``/``facts``/``ids`` on
every rank, as with model weights). That makes id assignment deterministic without any communication:

- ids are global, increasing and never reused; every rank allocates the same ids for the same ``add``;
- the row of id ``i`` lives on rank ``i % world_size`` (round-robin), so batches spread evenly;
- every rank keeps a bitmap of live ids (one byte per id ever allocated), so unknown ids raise the same
  ``KeyError`` on every rank and ``len(db)``, ``ids()`` and ``in`` need no communication.

The equivalent single database is **all live facts in id order**: a ``NeuralKVDatabase`` holding the same facts
with rows sorted by id (``db.gather()`` builds it; it is what a single database that was only ever appended to
holds). Retrieval returns exactly its result, including the tie-break (lowest id on equal scores), for any
number of ranks: every shard keeps its rows in id order (``delete`` compacts the shard's tail instead of
swapping the last row in), so a shard's lowest tied row is its lowest tied id.

Retrieval (:meth:`ShardedNeuralKVDatabase.retrieve`), per call of T query rows:

1. each rank runs ``gated_retrieval`` on its shard (no communication) -> local best (score, id) and its
   gated residual;
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

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.database import NeuralKVDatabase, check_gamma
from neuraldb.database_inputs import FactLike, _check_facts, _check_ids, _rows, cast_residuals, normalize_keys
from neuraldb_kernels import build_signs, build_sketch, gated_retrieval

_LOW32 = (1 << 32) - 1
# Ids are packed into the low 32 bits of the retrieval key (as id + 1, so -1 fits).
MAX_IDS = _LOW32 - 1
_METADATA = ("layer", "gamma", "template", "model_id", "module_path", "config")
_MIN_LIVE = 64  # initial length of the live-id bitmap (it doubles as ids are allocated)


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


# -- the local shard --------------------------------------------------------------------------------------------------


class _Shard(NeuralKVDatabase):
    """A ``NeuralKVDatabase`` holding global ids with its rows kept in id order (so the kernel's lowest tied row is
    the lowest tied id). Its files are ordinary ``NeuralKVDatabase`` files."""

    def _append(self, ids: list[int], keys: torch.Tensor, values: torch.Tensor, facts: list[FactLike]) -> None:
        """Append already validated rows with given, increasing ids above every id held."""
        m = len(ids)
        with self._lock:
            self._reserve(self._n + m)
            n = self._n
            self._keys[n : n + m].copy_(keys)
            self._values[n : n + m].copy_(values)
            if self._sketch is not None:
                self._sketch[n : n + m].copy_(build_sketch(self._keys[n : n + m]))
                self._signs[n : n + m].copy_(build_signs(self._keys[n : n + m]))
            for offset, (i, f) in enumerate(zip(ids, facts)):
                self._rows[i] = n + offset
                self._facts[i] = f
            self._row_ids.extend(ids)
            self._n = n + m

    def _delete_ordered(self, ids: list[int]) -> None:
        """Remove known ``ids`` keeping the other rows in order: the tail after the first hole moves up."""
        if not ids:
            return
        with self._lock:
            gone = set(ids)
            first = min(self._rows[i] for i in ids)
            tail = [i for i in self._row_ids[first:] if i not in gone]
            if tail:
                src = torch.tensor([self._rows[i] for i in tail], dtype=torch.long, device=self.device)
                self._keys[first : first + len(tail)] = self._keys.index_select(0, src)
                self._values[first : first + len(tail)] = self._values.index_select(0, src)
                if self._sketch is not None:
                    self._sketch[first : first + len(tail)] = self._sketch.index_select(0, src)
                    self._signs[first : first + len(tail)] = self._signs.index_select(0, src)
            for i in ids:
                del self._rows[i]
                del self._facts[i]
            del self._row_ids[first:]
            self._row_ids.extend(tail)
            for r, i in enumerate(tail, first):
                self._rows[i] = r
            self._n = len(self._row_ids)


# -- helpers for collectives ------------------------------------------------------------------------------------------


def _agree(error: BaseException | None, group: Any) -> None:
    """Collective: raise on every rank when any rank failed (so no rank is left waiting in a later collective)."""
    errors: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        r, e = bad[0]
        raise RuntimeError(f"rank {r} of the process group failed: {e}")


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
        self._shard = _Shard(key_dim, value_dim, dtype=dtype, device=device)
        self.query_parallel = bool(query_parallel)
        if self.query_parallel and key_dim % self.world_size:
            raise ValueError(f"query_parallel needs key_dim ({key_dim}) divisible by world_size ({self.world_size})")
        self.compact = bool(compact)
        self._live = torch.zeros(_MIN_LIVE, dtype=torch.bool)
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
        if isinstance(id, bool) or not hasattr(id, "__index__"):
            return False
        i = int(id)  # type: ignore[call-overload]
        return 0 <= i < self.next_id and bool(self._live[i])

    def __iter__(self):
        return iter(self.ids())

    def ids(self) -> list[int]:
        """All live ids, increasing: the row order of the equivalent single database."""
        return self._live[: self.next_id].nonzero().flatten().tolist()

    def owner(self, id: int) -> int:
        """The rank (in the process group) that holds id ``id``."""
        return int(id) % self.world_size

    def local_ids(self) -> list[int]:
        """The ids this rank holds, increasing."""
        return self._shard.ids()

    def index_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` in the equivalent single database (-1 stays -1), e.g. to compare with ``gated_retrieval``."""
        rank_of = torch.cumsum(self._live[: self.next_id].to(torch.int64), 0) - 1
        flat = ids.reshape(-1).cpu()
        out = torch.where(flat >= 0, rank_of[flat.clamp_min(0)] if len(rank_of) else flat, flat)
        return out.reshape(ids.shape).to(ids.device)

    def _check_live(self, id_list: list[int]) -> None:
        missing = [i for i in id_list if i not in self]
        if missing:
            raise KeyError(f"ids not in the database: {missing[:5]}")

    def get(self, id: int) -> tuple[torch.Tensor, torch.Tensor, FactLike]:
        """Collective: ``(key, residual, fact)`` of ``id`` on every rank (sent by its owner; tensors on CPU)."""
        if isinstance(id, bool) or not hasattr(id, "__index__"):
            raise TypeError(f"id must be an int, got {type(id).__name__}")
        i = int(id)  # type: ignore[call-overload]
        if i not in self:
            raise KeyError(f"id {i} is not in the database")
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
        the rows it owns. Nothing changes on any rank when an argument is invalid (every rank validates all rows)."""
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
        with self.lock:
            first = self.next_id
            if first + m > MAX_IDS:
                raise ValueError(f"a sharded database holds at most {MAX_IDS} ids over its lifetime")
            new_ids = list(range(first, first + m))
            mine = list(range((self.rank - first) % self.world_size, m, self.world_size))
            if mine:
                sel = torch.tensor(mine, dtype=torch.long)
                self._shard._append(
                    [new_ids[j] for j in mine],
                    k.index_select(0, sel.to(k.device)).to(self.device),
                    v.index_select(0, sel.to(v.device)).to(self.device),
                    [fs[j] for j in mine],
                )
            self._grow_live(first + m)
            self._live[first : first + m] = True
            self._shard._next_id = first + m
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
        """Collective: replace keys, residuals and/or facts of existing ``ids``; each owner updates its rows."""
        id_list = _check_ids(ids)
        m = len(id_list)
        if keys is not None:
            keys = normalize_keys(_rows("keys", keys, self.key_dim, "key_dim"), self.dtype)
            if keys.shape[0] != m:
                raise ValueError(f"keys must have one row per id: expected {m}, got {keys.shape[0]}")
        if residuals is not None:
            residuals = cast_residuals(_rows("residuals", residuals, self.value_dim, "value_dim"), self.dtype)
            if residuals.shape[0] != m:
                raise ValueError(f"residuals must have one row per id: expected {m}, got {residuals.shape[0]}")
        fs = _check_facts(facts, m) if facts is not None else None
        with self.lock:
            self._check_live(id_list)
            mine = [j for j, i in enumerate(id_list) if self.owner(i) == self.rank]
            if not mine:
                return
            sel = torch.tensor(mine, dtype=torch.long)
            self._shard.update(
                [id_list[j] for j in mine],
                None if keys is None else keys.index_select(0, sel.to(keys.device)),
                None if residuals is None else residuals.index_select(0, sel.to(residuals.device)),
                facts=None if fs is None else [fs[j] for j in mine],
            )

    def delete(self, ids: int | Iterable[int]) -> None:
        """Collective: remove ``ids`` (KeyError on every rank for unknown ids; nothing changes on error). The owner
        keeps its rows in id order, moving the shard's rows after the first hole (batch deletes)."""
        id_list = _check_ids(ids)
        with self.lock:
            self._check_live(id_list)
            if not id_list:
                return
            self._shard._delete_ordered([i for i in id_list if self.owner(i) == self.rank])
            self._live[torch.tensor(id_list, dtype=torch.long)] = False
            self._count -= len(id_list)
            self._version += 1

    def to(self, device: torch.device | str) -> ShardedNeuralKVDatabase:
        """Move this rank's shard to ``device`` in place (local, not collective)."""
        self._shard.to(device)
        return self

    def _grow_live(self, n: int) -> None:
        if n > len(self._live):
            grown = torch.zeros(max(n, 2 * len(self._live)), dtype=torch.bool)
            grown[: len(self._live)] = self._live
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
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - old torch
            DTensor = ()  # type: ignore[assignment]
        if isinstance(queries, DTensor):
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
        g = check_gamma(gamma)
        with self.lock:
            q = self._full_queries(queries)
            lead = q.shape[:-1]
            q2 = q.reshape(-1, q.shape[-1])
            out, idx, score = gated_retrieval(q2, self._shard.keys, self._shard.values, g, backend=backend)
            local_ids = self._local_id_tensor()
            gid = local_ids[idx.clamp_min(0)] if len(local_ids) else idx
            gid = torch.where(idx >= 0, gid, -1)
            if self.world_size == 1:  # nothing to exchange
                return out.reshape(*lead, self.value_dim), gid.reshape(lead), score.reshape(lead)
            key = pack_score_id(score, gid)
            dist.all_reduce(key, op=dist.ReduceOp.MAX, group=self._group)
            best_score, best_id = unpack_score_id(key)
            mine = (best_id >= 0) & (best_id % self.world_size == self.rank)
            if self.compact:
                rows = (best_score > g).nonzero().flatten()
                result = torch.zeros_like(out)
                if rows.numel():
                    part = torch.where(mine[rows, None], out[rows], 0).contiguous()
                    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=self._group)
                    result[rows] = part
            else:
                result = torch.where(mine[:, None], out, 0).contiguous()
                dist.all_reduce(result, op=dist.ReduceOp.SUM, group=self._group)
        return result.reshape(*lead, self.value_dim), best_id.reshape(lead), best_score.reshape(lead)

    # -- conversions -----------------------------------------------------------------------------------------------

    @classmethod
    def from_database(
        cls, db: NeuralKVDatabase, *, process_group: Any = None, device: torch.device | str | None = None, **kwargs: Any
    ) -> ShardedNeuralKVDatabase:
        """Collective: shard ``db`` (the same database on every rank, e.g. each loaded from one file), keeping its
        ids and metadata. ``kwargs``: ``query_parallel``/``compact``."""
        if not isinstance(db, NeuralKVDatabase):
            raise TypeError(f"db must be a neuraldb.NeuralKVDatabase, got {type(db).__name__}")
        with db.lock:
            out = cls(
                db.key_dim, db.value_dim, process_group=process_group, dtype=db.dtype,
                device=db.device if device is None else device, **kwargs,
            )
            ids = db.ids()
            rows = [db.row(i) for i in ids]
            out._fill(ids, db.keys, db.values, [db.fact(i) for i in ids], rows, db.next_id)
            for name in _METADATA:
                setattr(out, name, getattr(db, name))
        return out

    def _fill(
        self, ids: list[int], keys: torch.Tensor, values: torch.Tensor, facts: list[FactLike], rows: list[int],
        next_id: int, *, live: list[int] | None = None,
    ) -> None:
        """Restore from all live rows (any order; ``rows[j]`` is the row of ``ids[j]`` in ``keys``/``values``).
        ``live``: every live id when ``ids`` holds only some of them (a load that read only this rank's shard)."""
        mine = sorted((i, r, f) for i, r, f in zip(ids, rows, facts) if self.owner(i) == self.rank)
        sel = torch.tensor([r for _, r, _ in mine], dtype=torch.long, device=keys.device)
        self._shard._restore(
            keys.index_select(0, sel).to(self.device), values.index_select(0, sel).to(self.device),
            [i for i, _, _ in mine], [f for _, _, f in mine], next_id,
        )
        self._grow_live(max(next_id, 1))
        self._live.zero_()
        live = ids if live is None else live
        if live:
            self._live[torch.tensor(live, dtype=torch.long)] = True
        self._count = len(live)
        self._version += 1

    def gather(self) -> NeuralKVDatabase:
        """Collective: the equivalent single database (all live facts, rows in id order, same metadata) on every
        rank, on CPU. For tests and small databases: it moves every row to every rank."""
        with self.lock:
            s = self._shard
            mine = (s.ids(), s.keys.cpu(), s.values.cpu(), [s.fact(i) for i in s.ids()])
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine, group=self._group)
        order = sorted((i, p, r) for p, part in enumerate(parts) for r, i in enumerate(part[0]))
        db = NeuralKVDatabase(self.key_dim, self.value_dim, dtype=self.dtype)
        for name in _METADATA:
            setattr(db, name, getattr(self, name))
        if order:
            keys = torch.stack([parts[p][1][r] for _, p, r in order])
            values = torch.stack([parts[p][2][r] for _, p, r in order])
        else:
            keys = torch.empty(0, self.key_dim, dtype=self.dtype)
            values = torch.empty(0, self.value_dim, dtype=self.dtype)
        db._restore(keys, values, [i for i, _, _ in order], [parts[p][3][r] for _, p, r in order], self.next_id)
        return db

    # -- files -----------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Collective: write a directory holding one ``NeuralKVDatabase`` file per rank and ``manifest.json``
        (see :mod:`neuraldb.sharded_io`).

        Each rank writes its own shard (a new file name per save); rank 0 then writes the manifest atomically
        (temporary file, fsync, rename), which is the commit point: a save interrupted earlier leaves the previous
        manifest and its shard files intact. Shard files of the previous save are removed after the commit. The
        directory must be visible to every rank (a shared or node-local file system for single-node groups).
        """
        from neuraldb.sharded_io import save_sharded

        save_sharded(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, process_group: Any = None, device: torch.device | str = "cpu", **kwargs: Any
    ) -> ShardedNeuralKVDatabase:
        """Collective: read a directory written by :meth:`save`. With the same world size each rank reads its own
        shard (and only the ids of the others); with another world size every rank reads every shard and keeps
        the rows it owns (resharding). Every file is validated as by ``NeuralKVDatabase.load``; an error on any
        rank raises on all of them. ``kwargs``: ``query_parallel``/``compact``."""
        from neuraldb.sharded_io import load_sharded

        return load_sharded(path, process_group=process_group, device=device, cls=cls, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ShardedNeuralKVDatabase(n={len(self)}, local={len(self._shard)}, rank={self.rank}/{self.world_size}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"device={self.device}, layer={self.layer}, gamma={self.gamma})"
        )


__all__ = ["ShardedNeuralKVDatabase", "pack_score_id", "unpack_score_id"]
