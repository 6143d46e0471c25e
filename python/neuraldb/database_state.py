"""``DatabaseState``: everything a :class:`~neuraldb.NeuralKVDatabase` holds, as one plain record.

It is the one interface between a database and whatever stores or moves it: ``db.state()`` gives it,
``NeuralKVDatabase.from_state(state)`` builds a database from it, the file format (:mod:`neuraldb.database_io`)
writes and reads it, and the sharded database (:mod:`neuraldb.sharded`) splits, gathers and restores its shards
through it. :func:`check_state` is the validation all of them share: what a state must satisfy to become a database.

Example::

    >>> import torch
    >>> state = DatabaseState(key_dim=2, value_dim=1, dtype=torch.float32, keys=torch.tensor([[0.6, 0.8]]),
    ...                       values=torch.tensor([[5.0]]), ids=[3], facts=[None], next_id=4, gamma=0.7)
    >>> check_state(state)
    >>> state.count, state.metadata()["gamma"]
    (1, 0.7)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neuraldb.database_inputs import STORAGE_DTYPES, FactLike, check_dim, check_facts, dtype_name
from neuraldb_kernels import check_gamma

# The metadata a database carries besides its rows, in the order files and manifests list it.
METADATA = ("layer", "gamma", "template", "model_id", "module_path", "config", "model_identity")
# Ids are stored as int64.
MAX_ID = 2**63 - 1
# fp16 keys are unit rows only up to rounding: sqrt(d) entries each off by at most 2^-11 relative.
UNIT_TOLERANCE = 1e-2
# Rows per chunk of a row scan: bounds its fp32 temporaries.
SCAN_ROWS = 4096


class DatabaseChangedError(RuntimeError):
    """The database's rows changed while they were being read and fitted; nothing was set. Run again."""


def recorded_layer(db) -> int:
    """The layer ``db`` records; ValueError naming what to do when it records none."""
    if db.layer is None:
        raise ValueError("db: the database records no layer (it was not built by neuraldb.edit); set db.layer first")
    return db.layer


@dataclass
class DatabaseState:
    """The rows (row ``i`` of ``keys``/``values`` is fact ``ids[i]`` with metadata ``facts[i]``), the next id to
    hand out and the metadata of one database. ``keys``/``values`` may be views of a live database's storage (see
    :meth:`neuraldb.NeuralKVDatabase.state`)."""

    key_dim: int
    value_dim: int
    dtype: torch.dtype
    keys: torch.Tensor
    values: torch.Tensor
    ids: list[int]
    facts: list[FactLike]
    next_id: int
    layer: int | None = None
    gamma: float | None = None
    template: str | None = None
    model_id: str | None = None
    module_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # The weights the rows were computed on (neuraldb.pretrained_io.model_identity: architecture, fingerprint ...);
    # None in files written before neuraldb recorded it.
    model_identity: dict[str, Any] | None = None
    # Per-row gate thresholds, float32 (count,) on the rows' device; None: no row has one of its own (all -1).
    thresholds: torch.Tensor | None = None
    # Per-row relation keys (count, key_dim) in ``dtype``, unit or zero rows; None: no row has one.
    relation_keys: torch.Tensor | None = None

    @property
    def count(self) -> int:
        """The number of rows."""
        return len(self.ids)

    def metadata(self) -> dict[str, Any]:
        """``{name: value}`` of :data:`METADATA`."""
        return {name: getattr(self, name) for name in METADATA}

    def replace(self, **changes: Any) -> DatabaseState:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def select_rows(self, rows: Sequence[int]) -> DatabaseState:
        """A copy holding only the rows at positions ``rows`` (in that order) with their ids, facts, thresholds and
        relation keys; the metadata and ``next_id`` unchanged.

        >>> s = DatabaseState(key_dim=1, value_dim=1, dtype=torch.float32, keys=torch.ones(3, 1),
        ...                   values=torch.tensor([[1.0], [2.0], [3.0]]), ids=[4, 5, 6], facts=[None] * 3, next_id=7)
        >>> s.select_rows([2, 0]).ids, s.select_rows([2, 0]).values.flatten().tolist()
        ([6, 4], [3.0, 1.0])
        """
        positions = list(rows)
        bad = [r for r in positions if not 0 <= r < self.count]
        if bad:
            raise IndexError(f"rows must be positions in [0, {self.count}); got {bad[:5]}")

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[torch.tensor(positions, dtype=torch.long, device=t.device)]

        return self.replace(
            keys=pick(self.keys),
            values=pick(self.values),
            ids=[self.ids[r] for r in positions],
            facts=[self.facts[r] for r in positions],
            thresholds=pick(self.thresholds),
            relation_keys=pick(self.relation_keys),
        )


def check_metadata(
    layer: object, gamma: object, text: dict[str, object], config: object, model_identity: object = None
) -> None:
    """TypeError/ValueError unless the metadata can be saved and loaded back: ``layer`` a non-negative int or None,
    ``gamma`` a number in [-1, 1] or None, the ``text`` fields str or None, ``config`` a JSON-serialisable dict,
    ``model_identity`` None or a dict of str (or None) values."""
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise TypeError(f"layer must be a non-negative int or None, got {layer!r:.50}")
    if gamma is not None:
        check_gamma(gamma)
    for name, value in text.items():
        if value is not None and not isinstance(value, str):
            raise TypeError(f"db.{name} must be a str or None to save, got {type(value).__name__}")
    if not isinstance(config, dict):
        raise TypeError(f"db.config must be a dict, got {type(config).__name__}")
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"db.config must be JSON-serialisable to save: {exc}") from None
    if model_identity is not None and (
        not isinstance(model_identity, dict)
        or not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in model_identity.items())
    ):
        raise TypeError(f"db.model_identity must be None or a dict of str values, got {model_identity!r:.100}")


def check_rows(keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
    """ValueError naming the first rows (numbered from ``start``) that are not finite, or keys that are not
    unit-norm."""
    for name, t in (("keys", keys), ("values", values)):
        bad = ~torch.isfinite(t).all(dim=1)
        if bad.any():
            raise ValueError(f"tensor {name!r} has non-finite rows {(bad.nonzero().flatten()[:5] + start).tolist()}")
    off = ((keys.float().norm(dim=1) - 1).abs() > UNIT_TOLERANCE).nonzero().flatten()
    if off.numel():
        raise ValueError(f"tensor 'keys' rows {(off[:5] + start).tolist()} are not unit-norm")


def check_state_thresholds(thresholds: object, n: int, device: torch.device) -> None:
    """ValueError unless ``thresholds`` is None or float32 ``(n,)`` on ``device`` with every entry in [-1, 1]."""
    if thresholds is None:
        return
    if not isinstance(thresholds, torch.Tensor) or thresholds.dtype != torch.float32 or tuple(thresholds.shape) != (n,):
        got = (
            f"{tuple(thresholds.shape)} {dtype_name(thresholds.dtype)}"
            if isinstance(thresholds, torch.Tensor)
            else type(thresholds).__name__
        )
        raise ValueError(f"state.thresholds must be None or ({n},) float32, got {got}")
    if thresholds.device != device:
        raise ValueError(f"state.thresholds must be on the rows' device ({device}), got {thresholds.device}")
    if n and not bool(((thresholds >= -1) & (thresholds <= 1)).all()):
        raise ValueError("state.thresholds must be finite numbers in [-1, 1]")


def check_state_relation_keys(
    relation_keys: object, n: int, key_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    """ValueError unless ``relation_keys`` is None or ``(n, key_dim)`` in ``dtype`` on ``device``, each row finite and
    of unit length or zero."""
    if relation_keys is None:
        return
    if (
        not isinstance(relation_keys, torch.Tensor)
        or relation_keys.dtype != dtype
        or tuple(relation_keys.shape) != (n, key_dim)
        or relation_keys.device != device
    ):
        raise ValueError(f"state.relation_keys must be None or ({n}, {key_dim}) {dtype_name(dtype)} on {device}")
    for start in range(0, n, SCAN_ROWS):
        norms = relation_keys[start : start + SCAN_ROWS].float().norm(dim=1)
        if not bool((torch.isfinite(norms) & ((norms == 0) | ((norms - 1).abs() <= UNIT_TOLERANCE))).all()):
            raise ValueError("state.relation_keys rows must be finite, of unit length or zero")


def check_ids_below(ids: list[int], next_id: int) -> None:
    """ValueError unless ``ids`` are distinct ints in ``[0, next_id)`` and ``next_id`` fits int64."""
    if not 0 <= next_id <= MAX_ID:
        raise ValueError(f"next_id must lie in [0, 2**63 - 1] (ids are int64), got {next_id}")
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"ids holds id {twice} twice")
    if ids and (min(ids) < 0 or max(ids) >= next_id):
        raise ValueError(f"ids must lie in [0, next_id={next_id}), got [{min(ids)}, {max(ids)}]")


def check_state(state: DatabaseState, *, rows: bool = True) -> None:
    """TypeError/ValueError unless ``state`` can become a database: dims, dtype, shapes, ids, next_id, facts and
    metadata, and with ``rows`` (default) finite rows and unit-norm keys (one chunked scan of the rows; a loader
    that checked them while reading passes False)."""
    check_dim("key_dim", state.key_dim)
    check_dim("value_dim", state.value_dim)
    if state.dtype not in STORAGE_DTYPES:
        raise TypeError(f"dtype must be one of {'/'.join(map(dtype_name, STORAGE_DTYPES))}, got {state.dtype!r}")
    n = state.count
    for name, t, width in (("keys", state.keys, state.key_dim), ("values", state.values, state.value_dim)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, width) or t.dtype != state.dtype:
            got = f"{tuple(t.shape)} {dtype_name(t.dtype)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"state.{name} must be ({n}, {width}) {dtype_name(state.dtype)}, got {got}")
    if state.keys.device != state.values.device:
        raise ValueError(f"state.keys and state.values are on {state.keys.device} and {state.values.device}")
    check_ids_below(state.ids, state.next_id)
    check_state_thresholds(state.thresholds, n, state.keys.device)
    check_state_relation_keys(state.relation_keys, n, state.key_dim, state.dtype, state.keys.device)
    if len(state.facts) != n:
        raise ValueError(f"state.facts must have one entry per id: expected {n}, got {len(state.facts)}")
    check_metadata(
        state.layer, state.gamma, {n: getattr(state, n) for n in METADATA[2:5]}, state.config, state.model_identity
    )
    if rows:
        check_facts(state.facts, n)
        for start in range(0, n, SCAN_ROWS):
            stop = min(n, start + SCAN_ROWS)
            check_rows(state.keys[start:stop], state.values[start:stop], start)


__all__ = ["METADATA", "DatabaseState", "check_metadata", "check_rows", "check_state"]
