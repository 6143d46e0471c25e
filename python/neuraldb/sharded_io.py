"""The on-disk format of a :class:`~neuraldb.ShardedNeuralKVDatabase`: a directory, one file per rank.

Layout (``save("edits.sharded")`` on 3 ranks)::

    edits.sharded/
      manifest.json                              format, world_size, routing, dims, dtype, count, next_id,
                                                 shard file names and counts, layer/gamma/template/... metadata
      shard-00000-of-00003-<token>.safetensors   rank 0's rows: an ordinary NeuralKVDatabase file (global ids)
      shard-00001-of-00003-<token>.safetensors
      shard-00002-of-00003-<token>.safetensors

Each shard file is written by ``NeuralKVDatabase.save`` and loads on its own with
``NeuralKVDatabase.load``. ``<token>`` is new per save and the manifest is written last, atomically: it is the
commit point, so an interrupted save leaves the previous manifest and its shards intact. Loading with another
world size reshards (every rank reads every shard and keeps the rows it owns under ``id % world_size``).

Per-row gate thresholds travel in the shard files: each is the single database's file, format_version 2 with a
``thresholds`` tensor where one of the shard's rows has one (version 1, readable by older neuraldb, otherwise).
The manifest holds none, so its format_version stays 1.

Both functions are collective, like the methods that call them (``ShardedNeuralKVDatabase.save``/``load``)::

    >>> db.save("edits.sharded")                                                  # doctest: +SKIP
    >>> db = neuraldb.ShardedNeuralKVDatabase.load("edits.sharded", device="cuda:0")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.atomic import atomic_path
from neuraldb.database import NeuralKVDatabase
from neuraldb.database_io import META_KEY
from neuraldb.database_state import METADATA as _METADATA
from neuraldb.sharded_agreement import MAX_IDS, _agree, _agree_call, _as_timeout, _digest, _header_device, _json_field
from neuraldb.sharded_writes import fill

MANIFEST = "manifest.json"
FORMAT = "neuraldb.ShardedNeuralKVDatabase"
FORMAT_VERSION = 1
ROUTING = "id % world_size"
# what save_sharded names a shard file: shard-RANK-of-WORLD-TOKEN.safetensors
_SHARD_FILE = re.compile(r"shard-\d{5}-of-\d{5}-[0-9a-f]{12}\.safetensors")


def save_sharded(db: Any, path: str | os.PathLike) -> None:
    """Collective: write ``db`` to the directory ``path`` (see :meth:`ShardedNeuralKVDatabase.save`)."""
    group = db.process_group
    device = db._header_device()
    box: list[Any] = [None]
    error: BaseException | None = None
    try:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        directory = Path(path)
        if db.rank == 0:
            if directory.exists() and not directory.is_dir():
                raise ValueError(f"path {str(directory)!r} exists and is not a directory")
            if not directory.parent.is_dir():
                raise FileNotFoundError(f"path {str(directory)!r}: directory {str(directory.parent)!r} does not exist")
            directory.mkdir(exist_ok=True)
            box[0] = uuid.uuid4().hex[:12]
    except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
        error = exc
    shown = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    db._check_call("save", [_json_field("path", str(shown))], error)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    token = box[0]
    names = [f"shard-{r:05d}-of-{db.world_size:05d}-{token}.safetensors" for r in range(db.world_size)]
    mine = directory / names[db.rank]
    with db.lock:
        error = None
        try:
            db.shard.save(mine)
            counts = len(db.shard)
        except Exception as exc:  # noqa: BLE001 - every rank must reach _agree, whatever failed
            error, counts = exc, -1
        try:
            _agree(error, group, "save", device)
        except BaseException:
            mine.unlink(missing_ok=True)
            raise
        all_counts: list[Any] = [None] * db.world_size
        dist.all_gather_object(all_counts, counts, group=group)
        error = None
        if db.rank == 0:
            try:
                manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "routing": ROUTING,
                    "world_size": db.world_size,
                    "key_dim": db.key_dim,
                    "value_dim": db.value_dim,
                    "dtype": str(db.dtype).removeprefix("torch."),
                    "count": len(db),
                    "next_id": db.next_id,
                    "shards": [{"file": n, "count": c} for n, c in zip(names, all_counts)],
                    **{name: getattr(db, name) for name in _METADATA},
                }
                with atomic_path(directory / MANIFEST) as tmp:
                    tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False), encoding="utf-8")
                # The previous save's shards, and those of a save killed before its manifest (never named by one).
                for f in directory.iterdir():
                    if _SHARD_FILE.fullmatch(f.name) and f.name not in names:
                        f.unlink(missing_ok=True)
            except Exception as exc:  # noqa: BLE001 - every rank must reach _agree, whatever failed
                error = exc
        try:
            _agree(error, group, "save", device)
        except BaseException:
            mine.unlink(missing_ok=True)
            raise


def load_sharded(
    path: str | os.PathLike,
    *,
    process_group: Any = None,
    device: torch.device | str = "cpu",
    cls: type,
    timeout: float | datetime.timedelta | None = None,
    **kwargs: Any,
) -> Any:
    """Collective: read a directory written by :func:`save_sharded` into a new ``cls`` (see
    :meth:`ShardedNeuralKVDatabase.load`); ``timeout`` and ``kwargs`` go to its constructor.

    Nothing is allocated from what the manifest claims before it is checked against the shard files: its
    ``next_id`` must be every shard's own ``next_id`` and above every id, each shard's ``count`` that shard's row
    count, and ``count`` their sum (a ValueError names the field otherwise)."""
    from safetensors import safe_open

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ShardedNeuralKVDatabase.load needs torch.distributed initialised on every rank")
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    wait = _as_timeout(timeout)
    out: Any = None
    error: BaseException | None = None
    manifest = ("manifest.json", 0, None)
    try:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        directory = Path(path)
        meta, raw = _read_manifest(directory)
        value = _digest(raw)
        manifest = ("manifest.json", value, f"#{value:016x} ({len(raw)} bytes)")
        files = [directory / s["file"] for s in meta["shards"]]
        same = meta["world_size"] == world
        next_id = meta["next_id"]
        all_ids: list[int] = []
        parts = []
        for r, f in enumerate(files):
            if same and r != rank:  # the others' ids and header only, for the live ids
                with safe_open(str(f), framework="pt") as h:
                    ids = _ids_of(f, h.get_tensor("ids"))
                    shard_next_id = _shard_next_id(f, h.metadata())
            else:
                db = NeuralKVDatabase.load(f)
                if (db.key_dim, db.value_dim, db.dtype) != (meta["key_dim"], meta["value_dim"], _dtype(meta)):
                    raise ValueError(f"cannot load {str(f)!r}: its dims/dtype differ from the manifest")
                ids, shard_next_id = db.ids(), db.next_id
                parts.append(db)
            _check_shard(f, r, ids, shard_next_id, meta)
            all_ids += ids
        if len(all_ids) != meta["count"]:
            raise ValueError(
                f"cannot load {str(directory)!r}: the manifest's count is {meta['count']}, but the shards hold "
                f"{len(all_ids)} rows"
            )
        if len(set(all_ids)) != len(all_ids):
            raise ValueError(f"cannot load {str(directory)!r}: an id is held by two shards")
        dims = (meta["key_dim"], meta["value_dim"])
        out = cls(*dims, process_group=process_group, dtype=_dtype(meta), device=device, timeout=wait, **kwargs)
        ids = [i for p in parts for i in p.ids()]
        keys = torch.cat([p.keys for p in parts]) if parts else torch.empty(0, out.key_dim, dtype=out.dtype)
        values = torch.cat([p.values for p in parts]) if parts else torch.empty(0, out.value_dim, dtype=out.dtype)
        facts = [p.fact(i) for p in parts for i in p.ids()]
        thresholds = torch.cat([p.thresholds for p in parts]) if parts else None
        # The rows read here are this rank's; the manifest's other shards hold the rest of the live ids.
        fill(out, ids, keys, values, facts, list(range(len(ids))), next_id, live=all_ids, thresholds=thresholds)
        for name in _METADATA:
            setattr(out, name, meta.get(name, {} if name == "config" else None))
    except Exception as exc:  # noqa: BLE001 -- every rank must reach the agreement, whatever failed
        error = exc
    try:
        where = torch.device(device)
    except (TypeError, RuntimeError):
        where = torch.device("cpu")
    options = _json_field("options", {k: str(v) for k, v in sorted(kwargs.items())})
    _agree_call(process_group, _header_device(process_group, where), "load", (manifest, options), error, wait)
    assert out is not None
    return out


def _ids_of(f: Path, t: torch.Tensor) -> list[int]:
    if t.dtype != torch.int64 or t.dim() != 1:
        raise ValueError(f"cannot load {str(f)!r}: tensor 'ids' must be 1-D int64, got {t.dtype} {tuple(t.shape)}")
    return t.tolist()


def _shard_next_id(f: Path, header: dict | None) -> object:
    """A shard file's own ``next_id`` (from its header, without reading its rows)."""
    try:
        return json.loads((header or {})[META_KEY])["next_id"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"cannot load {str(f)!r}: not a NeuralKVDatabase file (no next_id in its header)") from None


def _check_shard(f: Path, r: int, ids: list[int], shard_next_id: object, meta: dict) -> None:
    """Shard ``r``'s file against the manifest: the same next_id, the manifest's count of rows, its own ids."""
    next_id = meta["next_id"]
    if shard_next_id != next_id:
        raise ValueError(
            f"cannot load {str(f)!r}: the manifest's next_id ({next_id}) is not the shard's own next_id "
            f"({shard_next_id!r:.40})"
        )
    count = meta["shards"][r]["count"]
    if len(ids) != count:
        raise ValueError(
            f"cannot load {str(f)!r}: the manifest's shards[{r}].count is {count}, the file holds {len(ids)}"
        )
    outside = [i for i in ids if not 0 <= i < next_id]
    if outside:
        raise ValueError(f"cannot load {str(f)!r}: ids {outside[:5]} are not below the manifest's next_id ({next_id})")
    wrong = [i for i in ids if i % meta["world_size"] != r]
    if wrong:
        raise ValueError(f"cannot load {str(f)!r}: ids {wrong[:5]} do not belong to shard {r}")


def _read_manifest(directory: Path) -> tuple[dict, bytes]:
    """The validated ``manifest.json`` of ``directory`` and its bytes (FileNotFoundError/ValueError saying what is
    wrong)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"path {str(directory)!r}: no {MANIFEST} (not a sharded database written by save)")
    raw = path.read_bytes()
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot load {str(path)!r}: not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"cannot load {str(path)!r}: it does not declare format {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"cannot load {str(path)!r}: format_version {meta.get('format_version')!r} is not supported")
    if meta.get("routing") != ROUTING:
        raise ValueError(f"cannot load {str(path)!r}: unknown routing {meta.get('routing')!r}")
    for name, low in (("world_size", 1), ("key_dim", 1), ("value_dim", 1), ("count", 0)):
        _check_int(path, name, meta.get(name), low, None)
    _check_int(path, "next_id", meta.get("next_id"), 0, MAX_IDS)
    shards = meta.get("shards")
    if not isinstance(shards, list) or len(shards) != meta["world_size"]:
        raise ValueError(f"cannot load {str(path)!r}: 'shards' must list world_size entries")
    for r, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or "/" in s["file"] or "\\" in s["file"]:
            raise ValueError(f"cannot load {str(path)!r}: bad shard entry {s!r:.200}")
        _check_int(path, f"shards[{r}].count", s.get("count"), 0, None)
    return meta, raw


def _check_int(path: Path, name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"cannot load {str(path)!r}: {name} must be {bound}, got {value!r:.40}")


def _dtype(meta: dict) -> torch.dtype:
    d = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(meta.get("dtype"))
    if d is None:
        raise ValueError(f"manifest dtype {meta.get('dtype')!r} is not float16/bfloat16/float32")
    return d


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "ROUTING", "load_sharded", "save_sharded"]
