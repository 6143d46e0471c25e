"""The agreement every collective call of :class:`~neuraldb.ShardedNeuralKVDatabase` starts with: one
``all_reduce(SUM)`` of a 64-bit hash of the method, the state and the arguments on every rank, and on the slow path
the message naming what differs (:func:`_agree_call`; ``docs/sharding.md`` has the protocol and its cost).

Example (on every rank)::

    >>> _agree_call(None, torch.device("cpu"), "save", [_json_field("path", "edits.sharded")], None)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.database_inputs import fact_to_json
from neuraldb.facts import Fact

_LOW32 = (1 << 32) - 1
# Ids are packed into the low 32 bits of the retrieval key (as id + 1, so -1 fits).
MAX_IDS = _LOW32 - 1


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
