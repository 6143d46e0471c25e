"""The on-disk format of a :class:`~neuraldb.ShardedNeuralKVDatabase`: a directory, one file per rank.

Layout (``save("edits.sharded")`` on 3 ranks)::

    edits.sharded/
      manifest.json                              format, world_size, routing, dims, dtype, count, next_id,
                                                 shard file names and counts, layer/gamma/template/... metadata
      shard-00000-of-00003-<token>.safetensors   rank 0's rows: an ordinary NeuralKVDatabase file (global ids)
      shard-00001-of-00003-<token>.safetensors
      shard-00002-of-00003-<token>.safetensors

Each shard file is written by :func:`neuraldb.database_io.save_database` and loads on its own with
``NeuralKVDatabase.load``. ``<token>`` is new per save and the manifest is written last, atomically: it is the
commit point, so an interrupted save leaves the previous manifest and its shards intact. Loading with another
world size reshards (every rank reads every shard and keeps the rows it owns under ``id % world_size``).

Both functions are collective, like the methods that call them (``ShardedNeuralKVDatabase.save``/``load``)::

    >>> db.save("edits.sharded")                                                  # doctest: +SKIP
    >>> db = neuraldb.ShardedNeuralKVDatabase.load("edits.sharded", device="cuda:0")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from neuraldb.atomic import atomic_path
from neuraldb.sharded import _METADATA, ShardedNeuralKVDatabase, _agree

MANIFEST = "manifest.json"
FORMAT = "neuraldb.ShardedNeuralKVDatabase"
FORMAT_VERSION = 1
ROUTING = "id % world_size"


def save_sharded(db: ShardedNeuralKVDatabase, path: str | os.PathLike) -> None:
    """Collective: write ``db`` to the directory ``path`` (see :meth:`ShardedNeuralKVDatabase.save`)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    group = db.process_group
    box: list[Any] = [None]
    error: BaseException | None = None
    if db.rank == 0:
        try:
            if directory.exists() and not directory.is_dir():
                raise ValueError(f"path {str(directory)!r} exists and is not a directory")
            if not directory.parent.is_dir():
                raise FileNotFoundError(f"path {str(directory)!r}: directory {str(directory.parent)!r} does not exist")
            directory.mkdir(exist_ok=True)
            box[0] = uuid.uuid4().hex[:12]
        except Exception as exc:  # every rank must reach _agree, whatever failed
            error = exc
    _agree(error, group)
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
        except Exception as exc:  # every rank must reach _agree, whatever failed
            error, counts = exc, -1
        try:
            _agree(error, group)
        except BaseException:
            mine.unlink(missing_ok=True)
            raise
        all_counts: list[Any] = [None] * db.world_size
        dist.all_gather_object(all_counts, counts, group=group)
        error = None
        if db.rank == 0:
            try:
                old = None
                try:
                    old = _read_manifest(directory)
                except (OSError, ValueError):
                    pass
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
                if old is not None:
                    for s in old["shards"]:
                        if s["file"] not in names:
                            (directory / s["file"]).unlink(missing_ok=True)
            except Exception as exc:  # every rank must reach _agree, whatever failed
                error = exc
        try:
            _agree(error, group)
        except BaseException:
            mine.unlink(missing_ok=True)
            raise


def load_sharded(
    path: str | os.PathLike,
    *,
    process_group: Any = None,
    device: torch.device | str = "cpu",
    cls: type[ShardedNeuralKVDatabase] = ShardedNeuralKVDatabase,
    **kwargs: Any,
) -> ShardedNeuralKVDatabase:
    """Collective: read a directory written by :func:`save_sharded` into a new ``cls`` (see
    :meth:`ShardedNeuralKVDatabase.load`); ``kwargs`` go to its constructor."""
    from safetensors import safe_open

    from neuraldb.database_io import load_database

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    result: tuple | None = None
    error: BaseException | None = None
    try:
        meta = _read_manifest(directory)
        files = [directory / s["file"] for s in meta["shards"]]
        same = meta["world_size"] == world
        all_ids: list[int] = []
        if same:  # the others' ids only, for the live bitmap
            for r, f in enumerate(files):
                if r != rank:
                    with safe_open(str(f), framework="pt") as h:
                        all_ids += h.get_tensor("ids").tolist()
        parts = []
        for r in [rank] if same else range(len(files)):
            f = files[r]
            db = load_database(f)
            if (db.key_dim, db.value_dim, db.dtype) != (meta["key_dim"], meta["value_dim"], _dtype(meta)):
                raise ValueError(f"cannot load {str(f)!r}: its dims/dtype differ from the manifest")
            if db.next_id != meta["next_id"]:
                raise ValueError(f"cannot load {str(f)!r}: its next_id differs from the manifest")
            wrong = [i for i in db.ids() if i % meta["world_size"] != r]
            if wrong:
                raise ValueError(f"cannot load {str(f)!r}: ids {wrong[:5]} do not belong to shard {r}")
            all_ids += db.ids()
            parts.append(db)
        if len(all_ids) != meta["count"] or len(set(all_ids)) != len(all_ids):
            raise ValueError(
                f"cannot load {str(directory)!r}: the shards hold {len(all_ids)} ids, expected "
                f"{meta['count']} distinct ones"
            )
        result = (meta, parts, all_ids)
    except Exception as exc:  # every rank must reach _agree, whatever failed
        error = exc
    _agree(error, process_group)
    assert result is not None
    meta, parts, all_ids = result
    out = cls(meta["key_dim"], meta["value_dim"], process_group=process_group, dtype=_dtype(meta), device=device,
              **kwargs)
    ids = [i for p in parts for i in p.ids()]
    keys = torch.cat([p.keys for p in parts]) if parts else torch.empty(0, out.key_dim, dtype=out.dtype)
    values = torch.cat([p.values for p in parts]) if parts else torch.empty(0, out.value_dim, dtype=out.dtype)
    facts = [p.fact(i) for p in parts for i in p.ids()]
    # The rows read here are this rank's; the manifest's other shards hold the rest of the live ids.
    out._fill(ids, keys, values, facts, list(range(len(ids))), meta["next_id"], live=all_ids)
    for name in _METADATA:
        setattr(out, name, meta.get(name, {} if name == "config" else None))
    return out


def _read_manifest(directory: Path) -> dict:
    """The validated ``manifest.json`` of ``directory`` (FileNotFoundError/ValueError saying what is wrong)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"path {str(directory)!r}: no {MANIFEST} (not a sharded database written by save)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot load {str(path)!r}: not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"cannot load {str(path)!r}: it does not declare format {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"cannot load {str(path)!r}: format_version {meta.get('format_version')!r} is not supported")
    if meta.get("routing") != ROUTING:
        raise ValueError(f"cannot load {str(path)!r}: unknown routing {meta.get('routing')!r}")
    shards = meta.get("shards")
    if not isinstance(shards, list) or len(shards) != meta.get("world_size") or not shards:
        raise ValueError(f"cannot load {str(path)!r}: 'shards' must list world_size entries")
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or "/" in s["file"] or "\\" in s["file"]:
            raise ValueError(f"cannot load {str(path)!r}: bad shard entry {s!r:.200}")
    return meta


def _dtype(meta: dict) -> torch.dtype:
    d = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(meta.get("dtype"))
    if d is None:
        raise ValueError(f"manifest dtype {meta.get('dtype')!r} is not float16/bfloat16/float32")
    return d


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "ROUTING", "load_sharded", "save_sharded"]
