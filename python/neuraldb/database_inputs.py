"""What callers hand to :class:`neuraldb.NeuralKVDatabase` and its file format, checked and converted before any
state changes: key/residual rows (shape, dtype, finiteness), unit-normalised keys, ids, fact metadata and its JSON.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch

from neuraldb.facts import Fact

FactLike = Fact | dict | None

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _rows(name: str, t: object, dim: int, dim_name: str) -> torch.Tensor:
    """``t`` as a detached 2-D (m, dim) floating tensor; 1-D input is one row."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INPUT_DTYPES:
        allowed = "/".join(map(_dtype_name, _INPUT_DTYPES))
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
    """Rows of ``keys`` scaled to unit length (computed in fp32, then cast to ``dtype``); ValueError naming
    ``keys`` and the rows that are zero or non-finite."""
    k = keys.float()
    bad = ~torch.isfinite(k).all(dim=1)
    if bad.any():
        raise ValueError(f"keys must be finite; rows {_first_bad_rows(bad)} contain inf or nan")
    # Dividing by the largest entry first keeps the norm from overflowing or underflowing in fp32.
    scale = k.abs().amax(dim=1, keepdim=True)
    zero = scale.squeeze(1) == 0
    if zero.any():
        raise ValueError(f"keys must have non-zero rows; rows {_first_bad_rows(zero)} are zero")
    k = k / scale
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
            f"residuals rows {_first_bad_rows(bad)} overflow {_dtype_name(dtype)} "
            f"(largest magnitude {torch.finfo(dtype).max:g}); store them in a wider dtype"
        )
    return out


def fact_to_json(fact: FactLike, name: str = "facts") -> dict | None:
    """The JSON form of one fact entry: null, ``{"fact": {...}}`` or ``{"dict": {...}}``."""
    import dataclasses
    import json

    if fact is None:
        return None
    if isinstance(fact, Fact):
        entry = {"fact": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(fact).items()}}
    elif isinstance(fact, dict):
        entry = {"dict": fact}
    else:
        raise TypeError(f"{name} must be a neuraldb.Fact, a dict or None, got {type(fact).__name__}")
    try:
        json.dumps(entry, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable so the database can be saved: {exc}") from None
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


def _check_facts(facts: object, m: int) -> list[FactLike]:
    if facts is None:
        return [None] * m
    if isinstance(facts, (Fact, dict, str)) or not isinstance(facts, Sequence):
        raise TypeError(f"facts must be a list of {m} Fact/dict/None entries, got {type(facts).__name__}")
    if len(facts) != m:
        raise ValueError(f"facts must have one entry per key row: expected {m}, got {len(facts)}")
    for i, f in enumerate(facts):
        fact_to_json(f, name=f"facts[{i}]")
    return list(facts)


def _check_ids(ids: object) -> list[int]:
    """``ids`` (an int or an iterable of ints) as a list; TypeError/ValueError naming ``ids``."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must hold integers, got a tensor of {ids.dtype}")
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not (isinstance(ids, Iterable) or hasattr(ids, "__index__")):
        raise TypeError(f"ids must be an int or an iterable of ints, got {type(ids).__name__}")
    items = list(ids) if isinstance(ids, Iterable) else [ids]
    out = []
    for i in items:
        if isinstance(i, bool):
            raise TypeError(f"ids must hold ints, got a bool ({i!r})")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"ids must hold ints, got {type(i).__name__} ({i!r})") from None
    seen: set[int] = set()
    dups = sorted({i for i in out if i in seen or seen.add(i)})
    if dups:
        raise ValueError(f"ids must not repeat; duplicated: {dups[:5]}")
    return out
