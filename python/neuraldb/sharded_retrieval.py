"""Reading across the shards of a :class:`~neuraldb.sharded.ShardedNeuralKVDatabase`: the collective
``get``, ``retrieve`` (with the (score, id) packing its ``all_reduce`` uses and the tensor-parallel query gather) and
``gather``, as functions its methods call.

Retrieval (:meth:`ShardedNeuralKVDatabase.retrieve`), per call of T query rows:

1. each rank runs ``gated_retrieval`` on its shard with the shard's per-row gate thresholds (no communication)
   -> local best (score, id) and its gated residual, zeroed where the local best fails its own threshold; then
   the agreement's one-int64 ``all_reduce`` (after the scan, so a scan that failed on one rank fails the call on
   all);
2. ``all_reduce(MAX)`` of one int64 per row that packs (score, -id), so the maximum is the best score with the
   lowest id on ties -- every rank learns the global winner and its exact fp32 score;
3. only rows whose global score passes the gate (``score > gamma``) are exchanged: ``all_reduce(SUM)`` of those
   rows' residuals, zeros except on the winning rank (skipped entirely when no row passes; ``compact=False``
   reduces all T rows instead, which avoids a device->host sync on GPUs).

Per-row thresholds need nothing more: the packed keys hold the scan's scores, which thresholds never change, so
the global winner is the single database's argmax row, and its owner's local best is that same row (the owner's
best cannot beat the global best). The owner's gated residual has therefore passed or failed exactly the winner's
own threshold, and the other ranks send zeros: a winner that fails its threshold yields zeros, never the residual
of a lower-scoring row on another shard -- the single database's rule (the gate of row ``j`` opens where
``score > max(gamma, t_j)``, tested on the argmax row only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.database import NeuralKVDatabase
from neuraldb.database_state import METADATA as _METADATA
from neuraldb.database_state import DatabaseState
from neuraldb.database_storage import NO_THRESHOLD
from neuraldb.sharded_agreement import _LOW32, _dtype_code, _number
from neuraldb_kernels import check_gamma, gated_retrieval

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


def full_queries(db: Any, queries: torch.Tensor) -> torch.Tensor:
    """The whole queries: a DTensor's ``full_tensor()``, or with ``query_parallel`` the ranks' key-dimension slices
    all-gathered."""
    if _is_dtensor(queries):
        return queries.full_tensor()
    if not db.query_parallel:
        return queries
    part = queries.shape[-1]
    if part * db.world_size != db.key_dim:
        raise ValueError(
            f"queries: with query_parallel each rank passes key_dim / world_size = "
            f"{db.key_dim // db.world_size} features, got {part}"
        )
    q = queries.reshape(-1, part).contiguous()
    gathered = q.new_empty((db.world_size * q.shape[0], part))
    _all_gather_single(gathered, q, group=db._group)
    return gathered.reshape(db.world_size, -1, part).permute(1, 0, 2).reshape(*queries.shape[:-1], db.key_dim)


def _scan(
    shard: NeuralKVDatabase, queries: torch.Tensor, gamma: float, backend: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gated_retrieval`` on this rank's shard (its lock held by the caller), with the shard's per-row gate
    thresholds: what ``shard.retrieve`` computes, but through this module's ``gated_retrieval`` (which a test
    replaces to simulate a failing scan). The storage's views hold the live rows and the thresholds, None while no
    row has one of its own (so the plain op runs)."""
    views = shard._storage.views()
    return gated_retrieval(queries, views.keys, views.values, gamma, backend=backend, thresholds=views.thresholds)


def retrieve(
    db: Any, queries: torch.Tensor, gamma: float, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of :meth:`ShardedNeuralKVDatabase.retrieve`."""
    with db.lock:
        if db.world_size == 1:  # nothing to exchange, nobody to agree with
            g = check_gamma(gamma)
            q = full_queries(db, queries)
            lead = q.shape[:-1]
            q2 = q.reshape(-1, q.shape[-1])
            out, idx, score = _scan(db._shard, q2, g, backend)
            return out.reshape(*lead, db.value_dim), db._global_ids(idx).reshape(lead), score.reshape(lead)
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
            ("compact", int(db.compact), db.compact),
            ("query_parallel", int(db.query_parallel), db.query_parallel),
        )
        if db.query_parallel or _is_dtensor(queries):  # the gather's sizes are these fields: agree first
            db._check_call("retrieve", fields, error)
        failure, key = error, None
        if failure is None:
            try:
                q = full_queries(db, queries)
                lead = q.shape[:-1]
                q2 = q.reshape(-1, q.shape[-1])
                out, idx, score = _scan(db._shard, q2, g, backend)
                key = pack_score_id(score, db._global_ids(idx))
            except Exception as exc:  # noqa: BLE001 -- the others wait in the agreement below: fail it there
                failure = exc
        # After the local scan, so that a rank whose scan failed tells the others here.
        db._check_call("retrieve", fields, failure)
        dist.all_reduce(key, op=dist.ReduceOp.MAX, group=db._group)
        best_score, best_id = unpack_score_id(key)
        mine = (best_id >= 0) & (best_id % db.world_size == db.rank)
        if db.compact:
            open_rows = (best_score > g).nonzero().flatten()
            result = torch.zeros_like(out)
            if open_rows.numel():
                part = torch.where(mine[open_rows, None], out[open_rows], 0).contiguous()
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=db._group)
                result[open_rows] = part
        else:
            result = torch.where(mine[:, None], out, 0).contiguous()
            dist.all_reduce(result, op=dist.ReduceOp.SUM, group=db._group)
    return result.reshape(*lead, db.value_dim), best_id.reshape(lead), best_score.reshape(lead)


def gather(db: Any) -> NeuralKVDatabase:
    """The body of :meth:`ShardedNeuralKVDatabase.gather` (rows, facts and per-row gate thresholds in id order)."""
    with db.lock:
        db._check_call("gather", (), None)
        s = db._shard
        mine = (s.ids(), s.keys.cpu(), s.values.cpu(), [s.fact(i) for i in s.ids()], s.thresholds.cpu())
    parts: list[Any] = [None] * db.world_size
    dist.all_gather_object(parts, mine, group=db._group)
    order = sorted((i, p, r) for p, part in enumerate(parts) for r, i in enumerate(part[0]))
    thresholds = None
    if order:
        keys = torch.stack([parts[p][1][r] for _, p, r in order])
        values = torch.stack([parts[p][2][r] for _, p, r in order])
        t = torch.stack([parts[p][4][r] for _, p, r in order])
        thresholds = t if bool((t > NO_THRESHOLD).any()) else None  # None: no row has one, as the state says
    else:
        keys = torch.empty(0, db.key_dim, dtype=db.dtype)
        values = torch.empty(0, db.value_dim, dtype=db.dtype)
    ids, facts = [i for i, _, _ in order], [parts[p][3][r] for _, p, r in order]
    return NeuralKVDatabase.from_state(
        DatabaseState(
            db.key_dim,
            db.value_dim,
            db.dtype,
            keys,
            values,
            ids,
            facts,
            db.next_id,
            **{name: getattr(db, name) for name in _METADATA},
            thresholds=thresholds,
        )
    )


def get(db: Any, id: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The body of :meth:`ShardedNeuralKVDatabase.get`."""
    error: BaseException | None = None
    i = -1
    try:
        if isinstance(id, bool) or not hasattr(id, "__index__"):
            raise TypeError(f"id must be an int, got {type(id).__name__}")
        i = int(id)  # type: ignore[call-overload]
        if i not in db:
            raise KeyError(f"id {i} is not in the database")
    except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
        error = exc
    db._check_call("get", [("id", _number(i), i)], error)
    owner = db.owner(i)
    box: list[Any] = [None]
    if db.rank == owner:
        key, residual, fact = db._shard.get(i)
        box[0] = (key.cpu(), residual.cpu(), fact)
    src = dist.get_global_rank(db._group, owner) if db._group is not None else owner
    dist.broadcast_object_list(box, src=src, group=db._group)
    return box[0]
