"""The on-disk format of a :class:`~neuraldb.NeuralKVDatabase`: one ``.safetensors`` file, written from and read into
a :class:`~neuraldb.database_state.DatabaseState` (:func:`write_state`, :func:`read_state`; ``db.save`` and
``NeuralKVDatabase.load`` call them). Over 400 lines because the format is one unit: the writer, the reader and the
validation of every header field and tensor that the reader does before it allocates.

Tensors (row ``i`` of each belongs to the same fact)::

    keys        (n, key_dim)    float16/bfloat16/float32, unit-norm rows
    values      (n, value_dim)  same dtype, the residuals
    ids         (n,)            int64, the stable fact ids
    facts_json  (bytes,)        uint8, UTF-8 JSON list of n entries: null | {"fact": {...}} | {"dict": {...}}
    thresholds  (n,)            float32 in [-1, 1], the rows' own gate thresholds (-1: none); only in files of
                                format_version 2, written when some row has one
    relation_keys (n, key_dim)  the keys' dtype, unit or zero rows (zero: none); format_version 2, written when
                                some row has one (see neuraldb.relation_gate)

Header metadata (safetensors' string map): ``"neuraldb"`` holds a JSON object::

    {"format": "neuraldb.NeuralKVDatabase", "format_version": 1 (2 with thresholds), "key_dim": ..., "value_dim": ..., "dtype": ...,
     "count": n, "next_id": ..., "layer": ..., "gamma": ..., "template": ..., "model_id": ..., "module_path": ...,
     "config": {...}, "model_identity": {...} | null, "crc32": {"ids": "1c291ca3", "keys": ..., "values": ..., "facts_json": ...}}

Facts are a tensor rather than header metadata because safetensors caps the header at 100 MB, which 100k facts
with their evaluation prompts can exceed. Reading without neuraldb::

    >>> import json, zlib
    >>> from safetensors import safe_open
    >>> with safe_open("edits.safetensors", "pt") as f:       # doctest: +SKIP
    ...     meta = json.loads(f.metadata()["neuraldb"])
    ...     keys, values = f.get_tensor("keys"), f.get_tensor("values")
    ...     facts = json.loads(bytes(f.get_tensor("facts_json").numpy()))
    ...     assert f"{zlib.crc32(keys.numpy().tobytes()):08x}" == meta["crc32"]["keys"]   # fp16/fp32 keys

Every tensor's CRC-32 (``zlib.crc32`` of its bytes as stored, 8 hex digits) is in the metadata under ``"crc32"``
and is checked on load, so a flipped byte is reported instead of loaded (files written before neuraldb stored
checksums load with a warning). It detects corruption, not tampering: whoever crafts a file can write matching sums.

A save writes a temporary file beside the target, fsyncs it and renames it over the target (:mod:`neuraldb.atomic`:
symlinks are written through, the file keeps its permission bits, only regular files are replaced, and temporary
files of killed saves are removed by the next save), so an interrupted save leaves the previous file as it was.
neuraldb writes the safetensors layout itself rather than through ``safetensors.torch.save_file``, which makes a
full copy of every tensor in memory and a temporary file of its own that no later save could recognise.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import warnings
import zlib
from pathlib import Path

import torch

from neuraldb import host_memory
from neuraldb.atomic import atomic_path, file_kind, resolve_target
from neuraldb.database_inputs import MAX_DIM, STORAGE_DTYPES, dtype_name, fact_from_json, fact_to_json
from neuraldb.database_state import (
    METADATA,
    DatabaseState,
    check_ids_below,
    check_metadata,
    check_rows,
    check_state_relation_keys,
)
from neuraldb_kernels import check_gamma

FORMAT = "neuraldb.NeuralKVDatabase"
# Version 2 adds the thresholds tensor. A database without row thresholds is still written as version 1, so that
# older neuraldb versions keep reading it; they refuse version 2 with "upgrade neuraldb".
FORMAT_VERSION = 2
_VERSIONS = (1, 2)
META_KEY = "neuraldb"
CHECKSUM_KEY = "crc32"
# In file order: the 8-byte ids first, so every tensor starts aligned to its element size.
TENSORS = ("ids", "keys", "values", "facts_json")
OPTIONAL_TENSORS = ("thresholds", "relation_keys")
# safetensors refuses to read a longer header.
_MAX_HEADER_BYTES = 100_000_000
# Bytes per write and per checksum step: large enough that the Python loop costs nothing, small enough to stay in
# the last-level cache between a read and its checksum.
_IO_BYTES = 16 << 20
_LOAD_CHUNK_ROWS = 4096
_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.uint8: "U8",
}
_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _meta(state: DatabaseState) -> dict:
    check_metadata(
        state.layer, state.gamma, {n: getattr(state, n) for n in METADATA[2:5]}, state.config, state.model_identity
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if state.thresholds is not None or state.relation_keys is not None else 1,
        "key_dim": state.key_dim,
        "value_dim": state.value_dim,
        "dtype": dtype_name(state.dtype),
        "count": state.count,
        "next_id": state.next_id,
        **state.metadata(),
    }


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as stored in the file (little-endian), without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def crc32(t: torch.Tensor, value: int = 0) -> int:
    """``zlib.crc32`` of a contiguous CPU tensor's bytes, continuing from ``value`` (the sum over row chunks read one
    after another is the sum of the whole tensor)."""
    data = _bytes(t)
    for start in range(0, len(data), _IO_BYTES):
        value = zlib.crc32(data[start : start + _IO_BYTES], value)
    return value


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (contiguous, on the CPU) in the safetensors layout: an 8-byte little-endian header length,
    the JSON header (padded with spaces to 8 bytes), then each tensor's bytes in order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > _MAX_HEADER_BYTES:
        raise ValueError(f"the file header would be {len(raw)} bytes, over safetensors' limit; db.config is too large")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            data = _bytes(t)
            f.writelines(data[start : start + _IO_BYTES] for start in range(0, len(data), _IO_BYTES))


def write_state(state: DatabaseState, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically; see the module docstring for the format. ``state``'s tensors must not
    change meanwhile (``db.save`` holds the database's lock).

    Raises TypeError for a bad ``path`` or metadata that cannot be saved, ValueError when ``path`` exists and is not
    a regular file (a directory, a device, a FIFO), FileNotFoundError when its directory does not exist (all before
    anything is written), and OSError naming ``path`` (its subclass by errno) when writing fails; the previous file
    is left as it was.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = resolve_target(path)
    meta = _meta(state)
    ids = state.ids
    facts = json.dumps([fact_to_json(f, name=f"fact of id {i}") for i, f in zip(ids, state.facts)], allow_nan=False)
    # On the CPU these alias the live buffers: no clone, the caller keeps them still while writing.
    tensors = {
        "ids": torch.tensor(ids, dtype=torch.int64).reshape(len(ids)),
        "keys": state.keys.contiguous().cpu(),
        "values": state.values.contiguous().cpu(),
        "facts_json": torch.frombuffer(bytearray(facts.encode("utf-8")), dtype=torch.uint8),
    }
    if state.thresholds is not None:
        tensors["thresholds"] = state.thresholds.contiguous().cpu()
    if state.relation_keys is not None:
        tensors["relation_keys"] = state.relation_keys.contiguous().cpu()
    meta[CHECKSUM_KEY] = {name: f"{crc32(t):08x}" for name, t in tensors.items()}
    header = {META_KEY: json.dumps(meta, allow_nan=False)}
    try:
        with atomic_path(target) as tmp:
            _write_safetensors(tmp, tensors, header)
    except OSError as exc:
        what = f"cannot save the database to {str(path)!r}"
        if exc.errno is None:
            raise OSError(f"{what}: {exc}") from exc
        raise OSError(exc.errno, f"{what}: {exc.strerror}") from exc


class _Invalid(ValueError):
    pass


def _field(meta: dict, name: str, types: tuple[type, ...], *, optional: bool = False):
    if name not in meta:
        raise _Invalid(f"the metadata has no {name!r}")
    value = meta[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = "/".join(t.__name__ for t in types) + (" or null" if optional else "")
        raise _Invalid(f"metadata {name!r} must be {expected}, got {value!r:.100}")
    return value


def _open_regular(source: Path) -> int:
    """A read-only descriptor of ``source``, refused unless it is a regular file. O_NONBLOCK: opening a FIFO would
    otherwise wait for a writer, forever, and no signal interrupts it."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"path {str(source)!r}: no such file") from None
    except IsADirectoryError:  # platforms that cannot open a directory
        raise ValueError(f"cannot load {str(source)!r}: it is a directory, not a database file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(
            f"cannot load {str(source)!r}: it is a {file_kind(mode)}, not a database file written by "
            "NeuralKVDatabase.save"
        )
    return fd


def _path_of(fd: int, source: Path) -> str:
    # safe_open takes a path; this one names the file already opened, so nothing swapped in since is read.
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.exists(f"{base}/{fd}"):
            return f"{base}/{fd}"
    return str(source)


def read_state(path: str | os.PathLike) -> DatabaseState:
    """Read a database written by :func:`write_state`, on the CPU: its keys and values in storage of exactly its
    rows (2 MB pages, :mod:`neuraldb.host_memory`), already checked, ready for ``NeuralKVDatabase.from_state(state,
    adopt=True)``.

    Raises TypeError for a bad ``path``, FileNotFoundError for a missing file and ValueError, naming
    the file and the problem, for anything that is not a regular file, not a safetensors file, not a neuraldb
    database, of an unknown format version, corrupted (a checksum that does not match) or inconsistent (shapes,
    dtypes, ids, facts, non-finite or non-unit rows). Nothing is allocated beyond what the file holds. A file
    without checksums (written before neuraldb stored them) loads with a UserWarning.
    """
    from safetensors import SafetensorError, safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    source = Path(path)
    fd = _open_regular(source)
    try:
        with safe_open(_path_of(fd, source), framework="pt") as f:
            header = f.metadata() or {}
            names = set(f.keys())
            if META_KEY not in header:
                raise _Invalid(
                    "it is a safetensors file but not a neuraldb database (its header has no 'neuraldb' metadata; "
                    f"tensors: {sorted(names)[:5]})"
                )
            meta = _parse_meta(header[META_KEY])
            wanted = TENSORS + (OPTIONAL_TENSORS if meta["format_version"] >= 2 else ())
            missing = [t for t in TENSORS if t not in names]
            if missing:
                raise _Invalid(f"tensors {missing} are missing")
            # Only the header is read here; keys and values are read in row chunks straight into the database's
            # storage (see _build), so a load needs about the database's own memory rather than the file's size on
            # top of it.
            state = _build(meta, {t: f.get_slice(t) for t in wanted if t in names}, str(source))
    except ValueError as exc:  # _Invalid and the fact/metadata checks shared with NeuralKVDatabase
        raise ValueError(f"cannot load {str(source)!r}: {exc}") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"cannot load {str(source)!r}: it is not a readable safetensors file ({exc})") from None
    finally:
        os.close(fd)
    return state


def _parse_meta(text: str) -> dict:
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _Invalid(f"its 'neuraldb' metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Invalid(f"its 'neuraldb' metadata does not declare format {FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Invalid(f"metadata 'format_version' must be an int, got {version!r:.50}")
    if version not in _VERSIONS:
        hint = "; upgrade neuraldb to read it" if version > FORMAT_VERSION else ""
        raise _Invalid(
            f"format_version {version} is not supported (this neuraldb reads versions "
            f"{', '.join(map(str, _VERSIONS))}){hint}"
        )
    return meta


_HEX8 = re.compile(r"[0-9a-f]{8}")


def _checksums(meta: dict, names: tuple[str, ...]) -> dict[str, int] | None:
    sums = meta.get(CHECKSUM_KEY)
    if sums is None:
        return None
    if (
        not isinstance(sums, dict)
        or set(sums) != set(names)
        or not all(isinstance(v, str) and _HEX8.fullmatch(v) for v in sums.values())
    ):
        raise _Invalid(f"metadata {CHECKSUM_KEY!r} must map {', '.join(names)} to 8 hex digits, got {sums!r:.200}")
    return {name: int(v, 16) for name, v in sums.items()}


def _check_sum(name: str, got: int, sums: dict[str, int] | None) -> None:
    if sums is not None and got != sums[name]:
        raise _Invalid(
            f"tensor {name!r} does not match its checksum (crc32 {got:08x}, the metadata says {sums[name]:08x}): "
            "the file is corrupted"
        )


def _build(meta: dict, slices: dict, source: str) -> DatabaseState:
    key_dim = _field(meta, "key_dim", (int,))
    value_dim = _field(meta, "value_dim", (int,))
    count = _field(meta, "count", (int,))
    next_id = _field(meta, "next_id", (int,))
    dtype_name_ = _field(meta, "dtype", (str,))
    dtype = {dtype_name(d): d for d in STORAGE_DTYPES}.get(dtype_name_)
    if dtype is None:
        raise _Invalid(f"metadata 'dtype' must be float16/bfloat16/float32, got {dtype_name_!r:.50}")
    for name, value in (("key_dim", key_dim), ("value_dim", value_dim)):
        if not 0 < value <= MAX_DIM:
            raise _Invalid(f"metadata {name!r} must lie in [1, 2**31 - 1], got {value}")
    if count < 0:
        raise _Invalid(f"metadata 'count' must be >= 0, got {count}")
    if not 0 <= next_id <= 2**63 - 1:
        raise _Invalid(f"metadata 'next_id' must lie in [0, 2**63 - 1] (ids are int64), got {next_id}")
    layer = _field(meta, "layer", (int,), optional=True)
    if layer is not None and layer < 0:
        raise _Invalid(f"metadata 'layer' must be a non-negative int or null, got {layer}")
    gamma = _field(meta, "gamma", (int, float), optional=True)
    if gamma is not None:
        try:
            gamma = check_gamma(gamma)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range
            raise _Invalid(f"metadata 'gamma' must be a finite number in [-1, 1] or null, got {gamma!r:.50}") from None
    text = {name: _field(meta, name, (str,), optional=True) for name in ("template", "model_id", "module_path")}
    config = _field(meta, "config", (dict,))
    # Absent from files written before neuraldb recorded the weights' identity: they load, unchecked (None)
    identity = _field(meta, "model_identity", (dict,), optional=True) if "model_identity" in meta else None
    try:
        check_metadata(None, None, {}, {}, identity)
    except TypeError as exc:
        raise _Invalid(f"metadata {exc}".replace("db.model_identity", "'model_identity'")) from None
    sums = _checksums(meta, tuple(slices))

    # The header's shapes and dtypes, checked before a byte of data is read or allocated: a tensor's shape is
    # bounded by the file's size (safetensors checks that), and the metadata must agree with it.
    header = {}
    for name, sl in slices.items():
        raw = sl.get_dtype()
        header[name] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(raw, raw))
    for name, want_shape, want_dtype in (
        ("ids", (count,), torch.int64),
        ("keys", (count, key_dim), dtype),
        ("values", (count, value_dim), dtype),
    ):
        shape, got = header[name]
        if shape != want_shape:
            raise _Invalid(f"tensor {name!r} has shape {shape}, expected {want_shape} from the metadata")
        if got != want_dtype:
            raise _Invalid(
                f"tensor {name!r} has dtype {_name(got)}, expected {dtype_name(want_dtype)} from the metadata"
            )
    shape, got = header["facts_json"]
    if got != torch.uint8 or len(shape) != 1:
        raise _Invalid(f"tensor 'facts_json' must be 1-D uint8 (UTF-8 JSON), got {_name(got)} of shape {shape}")
    thresholds = None
    if "thresholds" in header:
        shape, got = header["thresholds"]
        if shape != (count,) or got != torch.float32:
            raise _Invalid(f"tensor 'thresholds' must be ({count},) float32, got {_name(got)} of shape {shape}")
        thresholds = slices["thresholds"][:].contiguous()
        _check_sum("thresholds", crc32(thresholds), sums)
        if count and not bool(((thresholds >= -1) & (thresholds <= 1)).all()):
            raise _Invalid("tensor 'thresholds' must hold finite numbers in [-1, 1]")
    relation_keys = None
    if "relation_keys" in header:
        shape, got = header["relation_keys"]
        if shape != (count, key_dim) or got != dtype:
            raise _Invalid(
                f"tensor 'relation_keys' must be ({count}, {key_dim}) {dtype_name(dtype)}, got {_name(got)} of shape "
                f"{shape}"
            )
        relation_keys = slices["relation_keys"][:].contiguous()
        _check_sum("relation_keys", crc32(relation_keys), sums)
        try:
            check_state_relation_keys(relation_keys, count, key_dim, dtype, relation_keys.device)
        except ValueError as exc:
            raise _Invalid(str(exc).replace("state.", "tensor ")) from None

    ids = slices["ids"][:]
    _check_sum("ids", crc32(ids), sums)
    id_list = ids.tolist()
    try:
        check_ids_below(id_list, next_id)
    except ValueError as exc:
        raise _Invalid(f"tensor {exc}") from None
    facts_raw = slices["facts_json"][:]
    _check_sum("facts_json", crc32(facts_raw), sums)
    try:
        facts = json.loads(bytes(facts_raw.numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(f"tensor 'facts_json' is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise _Invalid("tensor 'facts_json' nests lists or objects too deeply to parse") from None
    if not isinstance(facts, list) or len(facts) != count:
        got_len = len(facts) if isinstance(facts, list) else type(facts).__name__
        raise _Invalid(f"tensor 'facts_json' must be a JSON list of {count} entries, got {got_len}")
    fact_objs = [fact_from_json(e, name=f"facts_json[{i}]") for i, e in enumerate(facts)]
    if sums is None:
        warnings.warn(
            f"{source!r} has no checksums (it was written before neuraldb stored them), so corruption in it cannot "
            "be detected; save it again to add them",
            UserWarning,
            stacklevel=4,
        )

    # Exactly the file's rows: a file with no rows allocates nothing, whatever key_dim the metadata claims. Rows are
    # checked and copied chunk by chunk into that storage: peak memory is the database plus one chunk (an fp32 copy of
    # all keys for the norm check would be twice the keys' size).
    keys = host_memory.empty((count, key_dim), dtype, "cpu")
    values = host_memory.empty((count, value_dim), dtype, "cpu")
    running = {"keys": 0, "values": 0}
    for start in range(0, count, _LOAD_CHUNK_ROWS):
        stop = min(count, start + _LOAD_CHUNK_ROWS)
        k, v = slices["keys"][start:stop], slices["values"][start:stop]
        running["keys"], running["values"] = crc32(k, running["keys"]), crc32(v, running["values"])
        try:
            check_rows(k, v, start)
        except ValueError as exc:
            # A corrupted file is reported as such, not by whichever row check the damage happened to trip.
            for name in ("keys", "values"):
                _check_sum(name, _crc_rows(slices[name], count), sums)
            raise _Invalid(str(exc)) from None
        keys[start:stop].copy_(k)
        values[start:stop].copy_(v)
    for name in ("keys", "values"):
        _check_sum(name, running[name], sums)
    return DatabaseState(
        key_dim,
        value_dim,
        dtype,
        keys,
        values,
        id_list,
        fact_objs,
        next_id,
        layer=layer,
        gamma=gamma,
        config=config,
        model_identity=identity,
        thresholds=thresholds,
        relation_keys=relation_keys,
        **text,
    )


def _name(dtype: torch.dtype | str) -> str:
    return dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype


def _crc_rows(sl, count: int) -> int:
    value = 0
    for start in range(0, count, _LOAD_CHUNK_ROWS):
        value = crc32(sl[start : min(count, start + _LOAD_CHUNK_ROWS)], value)
    return value


__all__ = ["CHECKSUM_KEY", "FORMAT", "FORMAT_VERSION", "crc32", "read_state", "write_state"]
