"""What callers hand to :class:`neuraldb.NeuralKVDatabase`, :class:`neuraldb.ShardedNeuralKVDatabase` and the file
formats, checked and converted before any state changes: key/residual rows (shape, dtype, finiteness), unit-normalised
keys, ids, fact metadata and its JSON. Both databases validate through :func:`check_new_rows` and
:func:`check_replacement`, so they refuse the same arguments with the same messages.

Example::

    >>> import torch
    >>> k, v, facts = check_new_rows(torch.ones(3), torch.zeros(2), None, key_dim=3, value_dim=2, dtype=torch.float16)
    >>> k.shape, v.dtype, facts
    (torch.Size([1, 3]), torch.float16, [None])
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterable, Sequence

import torch

from neuraldb.facts import Fact

FactLike = Fact | dict | None

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Widths of any real layer are far below this; above it, sizes in bytes and kernels' index arithmetic could overflow.
MAX_DIM = 2**31 - 1


def check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if not 0 < value <= MAX_DIM:
        raise ValueError(f"{name} must be a positive int of at most 2**31 - 1, got {value}")
    return value


def check_device(device: object, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; TypeError for anything that is not a device, ValueError for "meta", which
    holds no data (a database moved there would silently lose every row)."""
    try:
        out = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise TypeError(f"{name} must be a torch.device or a device string, got {device!r:.100}") from None
    if out.type == "meta":
        raise ValueError(
            f"{name} must hold data; the meta device keeps shapes only, so a database there loses its rows"
        )
    return out


def as_rows(name: str, t: object, dim: int, dim_name: str) -> torch.Tensor:
    """``t`` as a detached 2-D (m, dim) floating tensor; 1-D input is one row."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INPUT_DTYPES:
        allowed = "/".join(map(dtype_name, _INPUT_DTYPES))
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {t.dtype}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no data")
    t = t.detach()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != dim:
        raise ValueError(f"{name} must have shape (m, {dim}) ({dim_name}={dim}) or ({dim},), got {tuple(t.shape)}")
    return t


def _first_bad_rows(mask: torch.Tensor, limit: int = 5) -> list[int]:
    return mask.nonzero().flatten()[:limit].tolist()


def normalize_keys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of ``keys`` scaled to unit length (computed in fp32, float64 input first scaled in float64, then cast to
    ``dtype``); ValueError naming ``keys`` and the rows that are zero or non-finite. Only a row's direction is kept,
    so any finite row that is not zero can be stored, however large or small its entries."""
    k = keys if keys.dtype == torch.float64 else keys.float()
    bad = ~torch.isfinite(k).all(dim=1)
    if bad.any():
        raise ValueError(f"keys must be finite; rows {_first_bad_rows(bad)} contain inf or nan")
    # Dividing by the largest entry first keeps the norm from overflowing or underflowing, and brings float64 rows
    # (1e300 is finite there) into fp32's range.
    scale = k.abs().amax(dim=1, keepdim=True)
    zero = scale.squeeze(1) == 0
    if zero.any():
        raise ValueError(f"keys must have non-zero rows; rows {_first_bad_rows(zero)} are zero")
    k = (k / scale).float()
    return (k / k.norm(dim=1, keepdim=True)).to(dtype)


def cast_residuals(residuals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``residuals`` in ``dtype``; ValueError naming ``residuals`` for non-finite rows or rows that overflow."""
    bad = ~torch.isfinite(residuals).all(dim=1)
    if bad.any():
        raise ValueError(f"residuals must be finite; rows {_first_bad_rows(bad)} contain inf or nan")
    out = residuals.to(dtype)
    bad = ~torch.isfinite(out).all(dim=1)
    if bad.any():
        raise ValueError(
            f"residuals rows {_first_bad_rows(bad)} overflow {dtype_name(dtype)} "
            f"(largest magnitude {torch.finfo(dtype).max:g}); store them in a wider dtype"
        )
    return out


# Deeper nesting than this would not survive the C json module's recursion limit on load.
_MAX_JSON_DEPTH = 200


def _json_problem(value: object, where: str, tuples: bool) -> tuple[type[Exception], str] | None:
    """``(exception type, message)`` for the first part of ``value`` that JSON would not give back as it is (None if
    none), naming it by its subscript path from ``where`` (e.g. ``facts[1]["n"][2]``). ``tuples``: accept tuples,
    which come back as lists."""
    stack: list[tuple[object, str, int]] = [(value, where, 0)]
    while stack:
        v, at, depth = stack.pop()
        if v is None or isinstance(v, (str, bool, int)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                return ValueError, f"{at} is {v!r}, which JSON cannot hold"
            continue
        if depth >= _MAX_JSON_DEPTH:
            return ValueError, f"{at} is nested deeper than {_MAX_JSON_DEPTH} levels (or contains itself)"
        if isinstance(v, list) or (tuples and isinstance(v, tuple)):
            stack.extend((x, f"{at}[{i}]", depth + 1) for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, dict):
            for key, x in reversed(list(v.items())):
                if not isinstance(key, str):
                    return (
                        TypeError,
                        f"{at} has the {type(key).__name__} key {key!r:.50}, which would come back as a str",
                    )
                stack.append((x, f"{at}[{key!r:.50}]", depth + 1))
        elif isinstance(v, tuple):
            return TypeError, f"{at} is a tuple, which would come back as a list"
        else:
            return TypeError, f"{at} is a {type(v).__name__}, which JSON cannot hold"
    return None


def fact_to_json(fact: FactLike, name: str = "facts") -> dict | None:
    """The JSON form of one fact entry: null, ``{"fact": {...}}`` or ``{"dict": {...}}``.

    A dict must hold only what JSON gives back exactly: str keys and str/int/float/bool/None values, lists and
    dicts of them (no NaN or infinity, no tuples, sets or other objects); TypeError (ValueError for NaN, infinity,
    or nesting deeper than 200 levels) naming ``name`` and the offending path otherwise. A Fact's fields may hold
    the same, and its tuples come back as tuples; tuples inside its ``extras`` come back as lists (extras take no
    part in comparing facts, and the editing benchmarks' loaders put tuples there).
    """
    if fact is None:
        return None
    if isinstance(fact, Fact):
        body = {f.name: getattr(fact, f.name) for f in dataclasses.fields(fact)}
        problems = (_json_problem(v, f"{name}.{k}", tuples=True) for k, v in body.items())
        problem = next((p for p in problems if p is not None), None)
        entry = {"fact": {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}}
    elif isinstance(fact, dict):
        problem = _json_problem(fact, name, tuples=False)
        entry = {"dict": fact}
    else:
        raise TypeError(f"{name} must be a neuraldb.Fact, a dict or None, got {type(fact).__name__}")
    if problem is not None:
        exc, message = problem
        raise exc(f"{message}; facts must come back from a save and load as they went in")
    return entry


def fact_from_json(entry: object, name: str = "facts") -> FactLike:
    """Inverse of :func:`fact_to_json`; ValueError naming ``name`` for anything else."""
    if entry is None:
        return None
    if isinstance(entry, dict) and len(entry) == 1:
        if isinstance(entry.get("dict"), dict):
            return entry["dict"]
        if isinstance(entry.get("fact"), dict):
            try:
                return Fact(**entry["fact"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name} holds an invalid Fact: {exc}") from None
    raise ValueError(f'{name} must be null, {{"fact": {{...}}}} or {{"dict": {{...}}}}, got {entry!r:.200}')


def check_facts(facts: object, m: int) -> list[FactLike]:
    if facts is None:
        return [None] * m
    if isinstance(facts, (Fact, dict, str)) or not isinstance(facts, Sequence):
        raise TypeError(f"facts must be a list of {m} Fact/dict/None entries, got {type(facts).__name__}")
    if len(facts) != m:
        raise ValueError(f"facts must have one entry per key row: expected {m}, got {len(facts)}")
    for i, f in enumerate(facts):
        fact_to_json(f, name=f"facts[{i}]")
    return list(facts)


def as_id(value: object, name: str = "id") -> int:
    """``value`` as a fact id: a Python int (not a bool) or a 0-d integer tensor; TypeError naming ``name`` for
    anything else, floats included (``1.0`` is not an id, so it is neither found nor missing)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be an int or a 0-d integer tensor, got a tensor of {value.dtype} "
                f"with shape {tuple(value.shape)}"
            )
        return int(value.item())
    if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r:.50})")
    return operator.index(value)  # type: ignore[arg-type]


def check_ids(ids: object) -> list[int]:
    """``ids`` (an int or an iterable of ints) as a list; TypeError/ValueError naming ``ids``."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must hold integers, got a tensor of {ids.dtype}")
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not (isinstance(ids, Iterable) or hasattr(ids, "__index__")):
        raise TypeError(f"ids must be an int or an iterable of ints, got {type(ids).__name__}")
    items = list(ids) if isinstance(ids, Iterable) else [ids]
    out = [as_id(i, "ids") for i in items]
    seen: set[int] = set()
    dups = sorted({i for i in out if i in seen or seen.add(i)})
    if dups:
        raise ValueError(f"ids must not repeat; duplicated: {dups[:5]}")
    return out


def check_new_rows(
    keys: object, residuals: object, facts: object, *, key_dim: int, value_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, list[FactLike]]:
    """The rows an ``add`` stores: ``(unit keys, residuals, facts)`` in ``dtype``, ``m`` rows each; TypeError or
    ValueError naming the argument otherwise."""
    k = as_rows("keys", keys, key_dim, "key_dim")
    v = as_rows("residuals", residuals, value_dim, "value_dim")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"keys and residuals must have the same number of rows, got {k.shape[0]} and {v.shape[0]}")
    fs = check_facts(facts, k.shape[0])
    return normalize_keys(k, dtype), cast_residuals(v, dtype), fs


def check_replacement(
    ids: object,
    keys: object,
    residuals: object,
    facts: object,
    *,
    key_dim: int,
    value_dim: int,
    dtype: torch.dtype,
) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None, list[FactLike] | None]:
    """What an ``update`` writes: ``(ids, unit keys or None, residuals or None, facts or None)``, one row per id;
    TypeError or ValueError naming the argument otherwise (unknown ids are the database's to refuse)."""
    id_list = check_ids(ids)
    m = len(id_list)
    k = v = None
    if keys is not None:
        k = normalize_keys(as_rows("keys", keys, key_dim, "key_dim"), dtype)
        if k.shape[0] != m:
            raise ValueError(f"keys must have one row per id: expected {m}, got {k.shape[0]}")
    if residuals is not None:
        v = cast_residuals(as_rows("residuals", residuals, value_dim, "value_dim"), dtype)
        if v.shape[0] != m:
            raise ValueError(f"residuals must have one row per id: expected {m}, got {v.shape[0]}")
    fs = check_facts(facts, m) if facts is not None else None
    return id_list, k, v, fs


def check_row_thresholds(thresholds: object, m: int, name: str = "thresholds") -> torch.Tensor:
    """Per-row gate thresholds for ``m`` rows as a float32 CPU tensor ``(m,)``: a number (the same for every row),
    a sequence or a tensor of ``m`` numbers, each finite and in [-1, 1] (-1: no threshold of the row's own, gamma
    alone decides); TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(thresholds, bool):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got bool")
    if isinstance(thresholds, (int, float)):
        t = torch.full((m,), float(thresholds), dtype=torch.float32)
    else:
        if isinstance(thresholds, torch.Tensor):
            if not (thresholds.dtype.is_floating_point or thresholds.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"{name} must hold numbers, got dtype {thresholds.dtype}")
            t = thresholds.detach().to("cpu", torch.float32)
        elif isinstance(thresholds, Sequence) and not isinstance(thresholds, str):
            try:
                t = torch.tensor([float(x) for x in thresholds], dtype=torch.float32)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be a sequence of numbers") from None
        else:
            raise TypeError(
                f"{name} must be a number, a sequence of numbers or a tensor, got {type(thresholds).__name__}"
            )
        t = t.reshape(-1) if t.dim() <= 1 else t
        if tuple(t.shape) != (m,):
            raise ValueError(f"{name} must hold one threshold per row: expected {m}, got shape {tuple(t.shape)}")
    if m and not bool(((t >= -1) & (t <= 1)).all()):
        bad = (~((t >= -1) & (t <= 1))).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} must be finite numbers in [-1, 1], got {[t[i].item() for i in bad]} at rows {bad}")
    return t.contiguous()


def check_relation_keys(keys: object, m: int, key_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Relation keys for ``m`` rows as unit rows (zero rows stay zero: a row without one) in ``dtype`` on the CPU:
    a floating tensor ``(m, key_dim)`` (or ``(key_dim,)`` for one row) of finite numbers; TypeError/ValueError
    naming ``relation_keys`` otherwise."""
    t = as_rows("relation_keys", keys, key_dim, "key_dim").detach().to("cpu", torch.float32)
    if t.shape[0] != m:
        raise ValueError(f"relation_keys must have one row per fact: expected {m}, got {t.shape[0]}")
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        raise ValueError(f"relation_keys rows {_first_bad_rows(bad)} are not finite")
    norms = t.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, t / norms.clamp_min(1e-30), t).to(dtype).contiguous()
