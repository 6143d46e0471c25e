"""Argument checks for ``gated_retrieval``: every error names the argument and what was expected."""

from __future__ import annotations

import math

import torch

QUERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KEY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {t.dtype}")


def check_gamma(gamma: object) -> float:
    """``gamma`` as a float, or a ValueError/TypeError saying it must be a finite number in [-1, 1].

    Example::

        >>> check_gamma(1)
        1.0
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a float in [-1, 1], got {type(gamma).__name__}")
    try:
        g = float(gamma)
    except OverflowError:  # an int beyond float's range
        g = math.inf
    if not math.isfinite(g) or not -1.0 <= g <= 1.0:
        raise ValueError(f"gamma must be a finite float in [-1, 1], got {gamma!r}")
    return g


def _check_query_tensor(queries: object) -> None:
    _check_tensor("queries", queries, QUERY_DTYPES)
    assert isinstance(queries, torch.Tensor)
    if queries.dim() < 1:
        raise ValueError("queries must have shape (..., d1) with at least one dim, got a 0-d tensor")
    if queries.shape[-1] == 0:
        raise ValueError(f"queries must have shape (..., d1) with d1 >= 1, got {tuple(queries.shape)}")


def check_queries(queries: object, d1: int, device: torch.device) -> None:
    """Validate queries for keys ``(m, d1)`` on ``device``: a float tensor of shape ``(..., d1)`` there."""
    _check_query_tensor(queries)
    assert isinstance(queries, torch.Tensor)
    if queries.shape[-1] != d1:
        raise ValueError(f"queries must have shape (..., {d1}) to match the keys, got {tuple(queries.shape)}")
    if queries.device != device:
        raise ValueError(f"queries must be on the keys' device ({device}), got {queries.device}")


def check_inputs(queries: object, keys: object, values: object, gamma: object) -> float:
    """Validate the op's arguments (shapes, dtypes, devices, gamma) and return gamma as a float."""
    _check_query_tensor(queries)
    _check_tensor("keys", keys, KEY_DTYPES)
    _check_tensor("values", values, VALUE_DTYPES)
    assert isinstance(queries, torch.Tensor) and isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
    if keys.dim() != 2:
        raise ValueError(f"keys must be 2-D (m, d1), got shape {tuple(keys.shape)}")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (m, d2), got shape {tuple(values.shape)}")
    d1 = queries.shape[-1]
    if keys.shape[1] != d1:
        raise ValueError(f"keys must have shape (m, {d1}) to match queries (..., {d1}), got {tuple(keys.shape)}")
    if values.shape[0] != keys.shape[0]:
        raise ValueError(
            f"values must have one row per key: expected shape ({keys.shape[0]}, d2), got {tuple(values.shape)}"
        )
    if keys.device != queries.device or values.device != queries.device:
        raise ValueError(
            "queries, keys and values must be on one device, got "
            f"queries on {queries.device}, keys on {keys.device}, values on {values.device}"
        )
    return check_gamma(gamma)


def check_thresholds(thresholds: object, keys: torch.Tensor) -> torch.Tensor | None:
    """None, or per-row gate thresholds ``(m,)`` for ``keys`` ``(m, d1)``: float32 on the keys' device, every
    entry finite and in [-1, 1] (-1: the row has no threshold of its own). Returns them (or None)."""
    if thresholds is None:
        return None
    _check_tensor("thresholds", thresholds, (torch.float32,))
    assert isinstance(thresholds, torch.Tensor)
    if thresholds.shape != (keys.shape[0],):
        raise ValueError(
            f"thresholds must have shape ({keys.shape[0]},), one per key row, got {tuple(thresholds.shape)}"
        )
    if thresholds.device != keys.device:
        raise ValueError(f"thresholds must be on the keys' device ({keys.device}), got {thresholds.device}")
    if thresholds.numel() and not bool(((thresholds >= -1) & (thresholds <= 1)).all()):
        raise ValueError("thresholds must be finite numbers in [-1, 1] (-1: no threshold of the row's own)")
    return thresholds
