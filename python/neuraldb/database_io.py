"""The on-disk format of a :class:`~neuraldb.NeuralKVDatabase`: one ``.safetensors`` file.

Tensors (row ``i`` of each belongs to the same fact)::

    keys        (n, key_dim)    float16/bfloat16/float32, unit-norm rows
    values      (n, value_dim)  same dtype, the residuals
    ids         (n,)            int64, the stable fact ids
    facts_json  (bytes,)        uint8, UTF-8 JSON list of n entries: null | {"fact": {...}} | {"dict": {...}}

Header metadata (safetensors' string map): ``"neuraldb"`` holds a JSON object::

    {"format": "neuraldb.NeuralKVDatabase", "format_version": 1, "key_dim": ..., "value_dim": ..., "dtype": ...,
     "count": n, "next_id": ..., "layer": ..., "gamma": ..., "template": ..., "model_id": ..., "module_path": ...,
     "config": {...}}

Facts are a tensor rather than header metadata because safetensors caps the header at 100 MB, which 100k facts
with their evaluation prompts can exceed. Reading without neuraldb::

    >>> import json
    >>> from safetensors import safe_open
    >>> with safe_open("edits.safetensors", "pt") as f:       # doctest: +SKIP
    ...     meta = json.loads(f.metadata()["neuraldb"])
    ...     keys, values = f.get_tensor("keys"), f.get_tensor("values")
    ...     facts = json.loads(bytes(f.get_tensor("facts_json").numpy()))

A save writes a temporary file beside the target, fsyncs it and renames it over the target, so an interrupted
save leaves the previous file as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from neuraldb.atomic import atomic_path
from neuraldb.database import NeuralKVDatabase, check_gamma
from neuraldb.database_inputs import STORAGE_DTYPES, fact_from_json, fact_to_json

FORMAT = "neuraldb.NeuralKVDatabase"
FORMAT_VERSION = 1
META_KEY = "neuraldb"
TENSORS = ("keys", "values", "ids", "facts_json")
# fp16 keys are unit rows only up to rounding: sqrt(d) entries each off by at most 2^-11 relative.
_UNIT_TOLERANCE = 1e-2


def _meta(db: NeuralKVDatabase) -> dict:
    try:
        json.dumps(db.config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"db.config must be JSON-serialisable to save: {exc}") from None
    for name in ("template", "model_id", "module_path"):
        value = getattr(db, name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"db.{name} must be a str or None to save, got {type(value).__name__}")
    if not isinstance(db.config, dict):
        raise TypeError(f"db.config must be a dict, got {type(db.config).__name__}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key_dim": db.key_dim,
        "value_dim": db.value_dim,
        "dtype": str(db.dtype).removeprefix("torch."),
        "count": len(db),
        "next_id": db.next_id,
        "layer": db.layer,
        "gamma": db.gamma,
        "template": db.template,
        "model_id": db.model_id,
        "module_path": db.module_path,
        "config": db.config,
    }


def save_database(db: NeuralKVDatabase, path: str | os.PathLike) -> None:
    """Write ``db`` to ``path`` atomically; see the module docstring for the format."""
    from safetensors.torch import save_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"path {str(target)!r} is a directory; give a file name such as edits.safetensors")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"path {str(target)!r}: directory {str(target.parent)!r} does not exist")
    with db.lock:
        meta = _meta(db)
        ids = db.ids()
        facts = json.dumps([fact_to_json(db.fact(i), name=f"fact of id {i}") for i in ids], allow_nan=False)
        tensors = {
            "keys": db.keys.contiguous().cpu(),
            "values": db.values.contiguous().cpu(),
            "ids": torch.tensor(ids, dtype=torch.int64).reshape(len(ids)),
            "facts_json": torch.frombuffer(bytearray(facts.encode("utf-8")), dtype=torch.uint8),
        }
        # The slices alias the live buffers on CPU; a clone is not needed because the lock is held while writing.
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, allow_nan=False)})


class _Invalid(ValueError):
    pass


def _field(meta: dict, name: str, types: tuple[type, ...], *, optional: bool = False):
    if name not in meta:
        raise _Invalid(f"its metadata has no {name!r}")
    value = meta[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = "/".join(t.__name__ for t in types) + (" or null" if optional else "")
        raise _Invalid(f"metadata {name!r} must be {expected}, got {value!r:.100}")
    return value


def load_database(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> NeuralKVDatabase:
    """Read a database written by :func:`save_database`.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and the problem, for a file
    that is not a safetensors file, not a neuraldb database, of an unknown format version, or inconsistent
    (shapes, dtypes, ids, facts, non-finite or non-unit rows).
    """
    from safetensors import SafetensorError, safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"path {str(source)!r}: no such file")
    if source.is_dir():
        raise ValueError(f"path {str(source)!r} is a directory, not a database file written by NeuralKVDatabase.save")
    try:
        with safe_open(str(source), framework="pt") as f:
            header = f.metadata() or {}
            names = set(f.keys())
            if META_KEY not in header:
                raise _Invalid(
                    "it is a safetensors file but not a neuraldb database (no 'neuraldb' metadata; "
                    f"tensors: {sorted(names)[:5]})"
                )
            meta = _parse_meta(header[META_KEY])
            missing = [t for t in TENSORS if t not in names]
            if missing:
                raise _Invalid(f"tensors {missing} are missing")
            # keys and values are read in row chunks straight into the database's storage (see _build), so a load
            # needs about the database's own memory rather than the file's size on top of it.
            tensors = {t: _Rows(f.get_slice(t)) if t in ("keys", "values") else f.get_tensor(t) for t in TENSORS}
            return _build(meta, tensors, device)
    except ValueError as exc:  # _Invalid and the fact/metadata checks shared with NeuralKVDatabase
        raise ValueError(f"cannot load {str(source)!r}: {exc}") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"cannot load {str(source)!r}: it is not a readable safetensors file ({exc})") from None


def _parse_meta(text: str) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"its 'neuraldb' metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Invalid(f"its 'neuraldb' metadata does not declare format {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade neuraldb to read it" if isinstance(version, int) and version > FORMAT_VERSION else ""
        raise _Invalid(f"format_version {version!r} is not supported (this neuraldb reads {FORMAT_VERSION}) {hint}")
    return meta


def _build(meta: dict, tensors: dict[str, torch.Tensor], device: torch.device | str) -> NeuralKVDatabase:
    key_dim = _field(meta, "key_dim", (int,))
    value_dim = _field(meta, "value_dim", (int,))
    count = _field(meta, "count", (int,))
    next_id = _field(meta, "next_id", (int,))
    dtype_name = _field(meta, "dtype", (str,))
    dtype = {str(d).removeprefix("torch."): d for d in STORAGE_DTYPES}.get(dtype_name)
    if dtype is None:
        raise _Invalid(f"metadata dtype {dtype_name!r} is not one of float16/bfloat16/float32")
    if key_dim <= 0 or value_dim <= 0 or count < 0:
        raise _Invalid(f"metadata key_dim={key_dim}, value_dim={value_dim}, count={count} are not valid sizes")

    keys, values, ids, facts_raw = (tensors[t] for t in TENSORS)
    for name, t, shape in (("keys", keys, (count, key_dim)), ("values", values, (count, value_dim))):
        if tuple(t.shape) != shape:
            raise _Invalid(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape} from the metadata")
        if t.dtype != dtype:
            raise _Invalid(f"tensor {name!r} has dtype {t.dtype}, expected {dtype_name} from the metadata")
    if ids.dtype != torch.int64 or tuple(ids.shape) != (count,):
        raise _Invalid(f"tensor 'ids' must be int64 of shape ({count},), got {ids.dtype} {tuple(ids.shape)}")
    id_list = ids.tolist()
    if len(set(id_list)) != count:
        raise _Invalid("tensor 'ids' repeats ids")
    if count and (min(id_list) < 0 or max(id_list) >= next_id):
        raise _Invalid(f"tensor 'ids' must lie in [0, next_id={next_id}), got [{min(id_list)}, {max(id_list)}]")
    if facts_raw.dtype != torch.uint8 or facts_raw.dim() != 1:
        raise _Invalid("tensor 'facts_json' must be a 1-D uint8 tensor of UTF-8 JSON")
    try:
        facts = json.loads(bytes(facts_raw.numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(f"tensor 'facts_json' is not UTF-8 JSON ({exc})") from None
    if not isinstance(facts, list) or len(facts) != count:
        got = len(facts) if isinstance(facts, list) else type(facts).__name__
        raise _Invalid(f"tensor 'facts_json' must be a JSON list of {count} entries, got {got}")
    fact_objs = [fact_from_json(e, name=f"facts_json[{i}]") for i, e in enumerate(facts)]

    db = NeuralKVDatabase(key_dim, value_dim, dtype=dtype, device="cpu")
    try:
        db.layer = _field(meta, "layer", (int,), optional=True)
        gamma = _field(meta, "gamma", (int, float), optional=True)
        db.gamma = None if gamma is None else check_gamma(gamma)
    except (TypeError, ValueError) as exc:
        raise _Invalid(f"metadata {exc}") from None
    db.template = _field(meta, "template", (str,), optional=True)
    db.model_id = _field(meta, "model_id", (str,), optional=True)
    db.module_path = _field(meta, "module_path", (str,), optional=True)
    db.config = _field(meta, "config", (dict,))
    # Rows are checked and copied chunk by chunk into the reserved storage: peak memory is the database plus one
    # chunk (an fp32 copy of all keys for the norm check would be twice the keys' size).
    db._reserve(count)
    for start in range(0, count, _LOAD_CHUNK_ROWS):
        stop = min(count, start + _LOAD_CHUNK_ROWS)
        k, v = _chunk(keys, start, stop), _chunk(values, start, stop)
        for name, t in (("keys", k), ("values", v)):
            bad = ~torch.isfinite(t).all(dim=1)
            if bad.any():
                raise _Invalid(f"tensor {name!r} has non-finite rows {(bad.nonzero().flatten()[:5] + start).tolist()}")
        off = ((k.float().norm(dim=1) - 1).abs() > _UNIT_TOLERANCE).nonzero().flatten()
        if off.numel():
            raise _Invalid(f"tensor 'keys' rows {(off[:5] + start).tolist()} are not unit-norm")
        db._keys[start:stop].copy_(k)
        db._values[start:stop].copy_(v)
    # The rows are in place already: _restore's copy of a view onto itself is a no-op.
    db._restore(db._keys[:count], db._values[:count], id_list, fact_objs, next_id)
    return db.to(device)


_LOAD_CHUNK_ROWS = 4096
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class _Rows:
    """A 2-D tensor of the file, read lazily: ``shape`` and ``dtype`` from the header, rows on demand."""

    def __init__(self, sl) -> None:
        self._slice = sl
        self.shape = tuple(sl.get_shape())
        raw = sl.get_dtype()
        self.dtype = _SAFETENSORS_DTYPES.get(raw, raw)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._slice[start:stop]


def _chunk(t, start: int, stop: int) -> torch.Tensor:
    return t.rows(start, stop) if isinstance(t, _Rows) else t[start:stop]


__all__ = ["save_database", "load_database", "FORMAT", "FORMAT_VERSION"]
