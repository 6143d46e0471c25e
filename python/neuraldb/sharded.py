"""``ShardedNeuralKVDatabase``: one logical database whose rows are split across the ranks of a process group.

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
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.database import NeuralKVDatabase, check_gamma
from neuraldb.database_inputs import (
    FactLike,
    _check_facts,
    _check_ids,
    _rows,
    as_id,
    cast_residuals,
    fact_to_json,
    normalize_keys,
)
from neuraldb.facts import Fact
from neuraldb_kernels import build_signs, build_sketch, gated_retrieval

_LOW32 = (1 << 32) - 1
# Ids are packed into the low 32 bits of the retrieval key (as id + 1, so -1 fits).
MAX_IDS = _LOW32 - 1
_METADATA = ("layer", "gamma", "template", "model_id", "module_path", "config")
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


# -- the local shard --------------------------------------------------------------------------------------------------


class _Shard(NeuralKVDatabase):
    """A ``NeuralKVDatabase`` holding global ids with its rows kept in id order (so the kernel's lowest tied row is
    the lowest tied id). Its files are ordinary ``NeuralKVDatabase`` files."""

    def _prepare_append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple:
        """Everything of appending these validated rows (on this device) that allocates -- room for them, their
        sketch rows -- without changing the rows held, so that a failure leaves the shard as it was."""
        with self._lock:
            self._reserve(self._n + len(keys))
            if self._sketch is None:
                return keys, values, None, None
            return keys, values, build_sketch(keys), build_signs(keys)

    def _append(self, ids: list[int], rows: tuple, facts: list[FactLike]) -> None:
        """Append rows made by :meth:`_prepare_append`, with given, increasing ids above every id held."""
        keys, values, sketch, signs = rows
        m = len(ids)
        with self._lock:
            self._reserve(self._n + m)
            n = self._n
            self._keys[n : n + m].copy_(keys)
            self._values[n : n + m].copy_(values)
            if self._sketch is not None:
                self._sketch[n : n + m].copy_(build_sketch(keys) if sketch is None else sketch)
                self._signs[n : n + m].copy_(build_signs(keys) if signs is None else signs)
            for offset, (i, f) in enumerate(zip(ids, facts)):
                self._rows[i] = n + offset
                self._facts[i] = f
            self._row_ids.extend(ids)
            self._n = n + m

    def _plan_delete(self, ids: list[int]) -> tuple | None:
        """The rows that move up when known ``ids`` leave, gathered now (the allocation that can fail), so that
        :meth:`_apply_delete` only copies them into place; the other rows keep their order."""
        if not ids:
            return None
        with self._lock:
            gone = set(ids)
            first = min(self._rows[i] for i in ids)
            tail = [i for i in self._row_ids[first:] if i not in gone]
            moved = []
            if tail:
                src = torch.tensor([self._rows[i] for i in tail], dtype=torch.long, device=self.device)
                for name in ("_keys", "_values", "_sketch", "_signs"):
                    buf = getattr(self, name)
                    if buf is not None:
                        moved.append((name, buf.index_select(0, src)))
            return ids, first, tail, moved

    def _apply_delete(self, plan: tuple | None) -> None:
        if plan is None:
            return
        ids, first, tail, moved = plan
        with self._lock:
            for name, rows in moved:
                getattr(self, name)[first : first + len(tail)].copy_(rows)
            for i in ids:
                del self._rows[i]
                del self._facts[i]
            del self._row_ids[first:]
            self._row_ids.extend(tail)
            for r, i in enumerate(tail, first):
                self._rows[i] = r
            self._n = len(self._row_ids)


# -- agreement: every collective call starts by checking that all ranks made the same call ------------------------


class ShardedCallError(RuntimeError):
    """Raised on every rank when the ranks' calls of a collective method disagree (another method, other
    arguments, another database state) or the call failed on another rank. No rank's database changed.

    Attributes: ``method`` (the method this rank called), ``fields`` (the names of the fields that differ, e.g.
    ``["keys"]``, or ``["method"]``), ``ranks`` (the ranks that differ from rank 0's call or failed).
    """

    def __init__(self, message: str, *, method: str, fields: Sequence[str] = (), ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.method = method
        self.fields = list(fields)
        self.ranks = list(ranks)


_CHUNK = 1 << 20  # elements hashed at a time: bounds the int64 temporaries of a content digest to ~8 MB each
# splitmix64's constants as signed int64 (torch has no uint64 arithmetic); products wrap modulo 2^64.
_GOLDEN, _MIX1, _MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return int.from_bytes(h.digest(), "little")


# Method tags: stable across processes (str hashes are salted per process, so hash() would not do).
_TAGS: dict[str, int] = {}
_DTYPE_CODES: dict[torch.dtype, int] = {}


def _tag(method: str) -> int:
    tag = _TAGS.get(method)
    if tag is None:
        tag = _TAGS[method] = _digest(method.encode())
    return tag


def _dtype_code(dtype: Any) -> int:
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        code = _digest(str(dtype).encode())
        if isinstance(dtype, torch.dtype):
            _DTYPE_CODES[dtype] = code
    return code


def _number(x: object) -> int:
    """A field value for a number: equal numbers give equal values on every rank (hash() of a float or an int
    is not salted), anything else its type."""
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return _digest(type(x).__name__.encode())
    return 0 if math.isnan(f) else hash(f)  # NaN's hash is per object


def _content(t: torch.Tensor) -> int:
    """A position-dependent hash of a tensor's bits, computed where it lives (no copy to the host): splitmix64 of
    each element's bits plus its index, summed modulo 2^64 -- the sum's order does not matter, so every rank and
    device gets the same value for the same contents."""
    flat = t.detach().contiguous().reshape(-1)
    size = flat.element_size()
    bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(size, torch.int64))
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        x = bits[start : start + _CHUNK].to(torch.int64)
        z = x + torch.arange(start, start + x.numel(), dtype=torch.int64, device=x.device) * _GOLDEN
        z = (z ^ (z >> 30)) * _MIX1
        z = (z ^ (z >> 27)) * _MIX2
        total += (z ^ (z >> 31)).sum()
    return int(total)


def _tensor_field(name: str, t: object) -> tuple[str, int, str]:
    """``(name, digest, description)`` of a tensor argument: its shape, dtype and contents."""
    if not isinstance(t, torch.Tensor):
        return name, _digest(type(t).__name__.encode()), type(t).__name__
    head = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    if t.device.type == "meta":
        return name, _digest(head.encode()), head + " on meta"
    value = _digest(head.encode(), _content(t).to_bytes(8, "little", signed=True))
    return name, value, f"{head}, contents #{value:016x}"


def _json_field(name: str, obj: object) -> tuple[str, int, str]:
    """``(name, digest, description)`` of an argument that is JSON, like facts or ids."""
    try:
        text = json.dumps(obj, sort_keys=True, default=_fact_json)
    except (TypeError, ValueError):
        text = f"<{type(obj).__name__}>"
    value = _digest(text.encode())
    return name, value, f"#{value:016x} ({text[:60]}{'...' if len(text) > 60 else ''})"


def _fact_json(obj: object) -> Any:
    if isinstance(obj, Fact):
        return fact_to_json(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def _header_device(group: Any, device: torch.device) -> torch.device:
    """Where the agreement header is exchanged: on the host when the group has a CPU backend (gloo, or
    ``"cpu:gloo,cuda:nccl"``), so checking it costs no device synchronisation; else on this rank's device."""
    try:
        config = dist.get_backend_config(group)
    except (RuntimeError, ValueError, AttributeError):
        config = ""
    return torch.device("cpu") if "cpu:" in config or device.type == "cpu" else device


def _as_timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        seconds = None if timeout is None else timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(
            f"timeout must be seconds (a float), a datetime.timedelta or None, got {type(timeout).__name__}"
        )
    if seconds is not None and not seconds > 0:
        raise ValueError(f"timeout must be positive, got {seconds} s")
    return None if seconds is None else datetime.timedelta(seconds=seconds)


def _agree_call(
    group: Any,
    device: torch.device,
    method: str,
    fields: Sequence[tuple[str, int, object]],
    error: BaseException | None,
    timeout: datetime.timedelta | None = None,
) -> None:
    """Collective: check that every rank called ``method`` with the same ``fields`` and that none failed
    (``error``); raise on every rank otherwise.

    ``fields``: ``(name, value, description)``; the values are compared, the descriptions only shown. Each rank
    sends one int64, ``h``, a 64-bit hash of the method, its fields and whether it failed, in an
    ``all_reduce(SUM)``: every rank then checks ``sum == world_size * h`` (modulo 2^64), which holds on every rank
    when all sent the same ``h`` and, when they did not, on none of them but with probability ~2^-63. One element
    because a gloo all_reduce costs in proportion to its ring steps, and one int64 takes the fewest (two local
    ranks on a 2-core VM: 0.16 ms for one int64, 0.5-0.8 ms for 3 to 44). Every method sends the same header, so
    ranks that call different methods meet in the same collective and see it. ``timeout``: how long to wait for
    the others (None: the process group's own timeout).
    """
    world = dist.get_world_size(group)
    if world == 1:
        if error is not None:
            raise error
        return
    # hash() of a tuple of ints is not salted per process (str hashes are): every rank computes the same h.
    h = hash((_tag(method), error is not None, *(f[1] for f in fields)))
    header = torch.tensor([h], dtype=torch.int64, device=device)
    work = dist.all_reduce(header, op=dist.ReduceOp.SUM, group=group, async_op=True)
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except Exception as exc:  # gloo: RuntimeError('Operation timed out!') or a closed connection; NCCL: DistError
        waited = "the process group's timeout" if timeout is None else f"{timeout.total_seconds():g} s"
        kind = TimeoutError if "timed out" in str(exc).lower() else ShardedCallError
        message = (
            f"ShardedNeuralKVDatabase.{method}: rank {dist.get_rank(group)} waited {waited} for the other ranks "
            f"to call {method}{' (a patched forward calls it)' if method == 'retrieve' else ''} and they did not "
            f"come: a rank probably did not call it (every rank must call the collective methods in the same "
            f"order), or is still busy, or has exited. The process group is now out of step; destroy it and "
            f"restart the ranks. ({type(exc).__name__}: {exc})"
        )
        if kind is TimeoutError:
            raise TimeoutError(message) from exc
        raise ShardedCallError(message, method=method) from exc
    if int(header) == _wrap(world * h):
        if error is not None:
            raise error  # every rank failed alike (the flag is in h): each raises its own error
        return
    _raise_disagreement(group, method, fields, error)


def _wrap(x: int) -> int:
    """``x`` as an int64 sum wraps it."""
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def _raise_disagreement(
    group: Any, method: str, fields: Sequence[tuple[str, int, object]], error: BaseException | None
) -> None:
    """Collective, on the slow path only (every rank knows a call disagreed or failed): gather every rank's call
    and error, and raise on every rank a message naming the method, the fields and the ranks."""
    mine = (method, [(n, v, str(d)[:200]) for n, v, d in fields], None if error is None else _describe(error))
    calls: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(calls, mine, group=group)
    parts, names, ranks = [], [], set()
    if len({c[0] for c in calls}) > 1:
        names.append("method")
        parts.append("the ranks called different methods: " + _groups([(r, c[0], c[0]) for r, c in enumerate(calls)]))
        ranks.update(r for r, c in enumerate(calls) if c[0] != calls[0][0])
    else:
        for j, (name, _, _) in enumerate(calls[0][1]):
            # The same method sends the same fields; the fallback only keeps a malformed call from hiding the rest.
            got = [(r, *(c[1][j][1:] if j < len(c[1]) else (None, "missing"))) for r, c in enumerate(calls)]
            if len({value for _, value, _ in got}) > 1:
                names.append(name)
                parts.append(f"{name} differs: " + _groups(got))
                ranks.update(r for r, value, _ in got if value != got[0][1])
    failed = [(r, c[2]) for r, c in enumerate(calls) if c[2] is not None]
    if failed:
        parts.append("; ".join(f"it failed on rank {r}: {e}" for r, e in failed))
        ranks.update(r for r, _ in failed)
    message = f"ShardedNeuralKVDatabase.{method}: " + "; ".join(parts) + ". Nothing changed on any rank."
    if names:
        message += " Every rank must call the collective methods in the same order with the same arguments."
    elif error is not None:
        raise error  # this rank's own failure, as it would have raised without the others
    raise ShardedCallError(message, method=method, fields=names, ranks=sorted(ranks)) from error


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _groups(items: list[tuple[int, int, str]]) -> str:
    """``rank 0: a; ranks 1, 2: b`` -- ranks grouped by value."""
    by_value: dict[int, tuple[str, list[int]]] = {}
    for r, value, shown in items:
        by_value.setdefault(value, (shown, []))[1].append(r)
    return "; ".join(
        f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {shown}" for shown, rs in by_value.values()
    )


def _agree(error: BaseException | None, group: Any, method: str, device: torch.device) -> None:
    """Collective: raise on every rank when any rank failed (so no rank is left waiting in a later collective).
    For the steps inside a call whose arguments were already agreed (waits up to the process group's timeout:
    the ranks are in step, and a step may be slow file I/O)."""
    _agree_call(group, device, method, (), error)


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
        self._shard = _Shard(key_dim, value_dim, dtype=dtype, device=device)
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
            first, m, error = self.next_id, 0, None
            try:
                k = _rows("keys", keys, self.key_dim, "key_dim")
                v = _rows("residuals", residuals, self.value_dim, "value_dim")
                if k.shape[0] != v.shape[0]:
                    raise ValueError(
                        f"keys and residuals must have the same number of rows, got {k.shape[0]} and {v.shape[0]}"
                    )
                m = k.shape[0]
                fs = _check_facts(facts, m)
                k = normalize_keys(k, self.dtype)
                v = cast_residuals(v, self.dtype)
                if first + m > MAX_IDS:
                    raise ValueError(f"a sharded database holds at most {MAX_IDS} ids over its lifetime")
                mine = list(range((self.rank - first) % self.world_size, m, self.world_size))
                rows = None
                if mine:
                    sel = torch.tensor(mine, dtype=torch.long)
                    rows = self._shard._prepare_append(
                        k.index_select(0, sel.to(k.device)).to(self.device),
                        v.index_select(0, sel.to(v.device)).to(self.device),
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
            if rows is not None:
                self._shard._append([new_ids[j] for j in mine], rows, [fs[j] for j in mine])
            self._live[self._count : self._count + m] = new_live
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
        """Collective: replace keys, residuals and/or facts of existing ``ids``; each owner updates its rows.
        Nothing changes on any rank unless the call is valid on every rank."""
        with self.lock:
            error, id_list, mine, k, v = None, None, [], None, None
            try:
                id_list = _check_ids(ids)
                m = len(id_list)
                if keys is not None:
                    k = _rows("keys", keys, self.key_dim, "key_dim")
                    normalize_keys(k, self.dtype)  # raises here, on this rank, rather than in the shard's update
                    if k.shape[0] != m:
                        raise ValueError(f"keys must have one row per id: expected {m}, got {k.shape[0]}")
                if residuals is not None:
                    v = _rows("residuals", residuals, self.value_dim, "value_dim")
                    cast_residuals(v, self.dtype)
                    if v.shape[0] != m:
                        raise ValueError(f"residuals must have one row per id: expected {m}, got {v.shape[0]}")
                fs = _check_facts(facts, m) if facts is not None else None
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
                id_list = _check_ids(ids)
                self._check_live(id_list)
                plan = self._shard._plan_delete([i for i in id_list if self.owner(i) == self.rank])
                live = self._live[: self._count]
                kept = live[~torch.isin(live, torch.tensor(id_list, dtype=torch.int64))]
            except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
                error = exc
            self._check_call("delete", [_json_field("ids", ids if id_list is None else id_list)], error)
            if not id_list:
                return
            self._shard._apply_delete(plan)
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
        from neuraldb.sharded_io import load_sharded

        return load_sharded(path, process_group=process_group, device=device, cls=cls, timeout=timeout, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ShardedNeuralKVDatabase(n={len(self)}, local={len(self._shard)}, rank={self.rank}/{self.world_size}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"device={self.device}, layer={self.layer}, gamma={self.gamma})"
        )


__all__ = ["ShardedNeuralKVDatabase", "pack_score_id", "unpack_score_id"]
