"""NeuralKVDatabase.save/load: round trip, plain safetensors + json readability, atomic writes, precise errors."""

from __future__ import annotations

import errno
import itertools
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from neuraldb import NeuralKVDatabase, database_io
from neuraldb.facts import Fact
from safetensors import safe_open
from safetensors.torch import load_file, save_file

D1, D2 = 8, 4


def _db(n=4, dtype=torch.float16):
    db = NeuralKVDatabase(D1, D2, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    facts = [Fact("Paris", "{} is in", "Italy", target_true="France", paraphrases=("p",), extras={"case": 1})]
    facts += [{"free": "form", "n": [1, 2]}] + [None] * (n - 2)
    db.add(torch.randn(n, D1, generator=g), torch.randn(n, D2, generator=g), facts=facts)
    db.delete([1])
    db.layer, db.gamma, db.template = 2, 0.7, "<s>{}"
    db.model_id, db.module_path, db.config = "tiny", "model.layers.2.mlp.down_proj", {"lr": 0.5, "steps": [1, 2]}
    return db


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_keeps_everything(tmp_path, dtype):
    db = _db(dtype=dtype)
    path = tmp_path / "db.safetensors"
    db.save(path)
    back = NeuralKVDatabase.load(path)
    assert back.ids() == db.ids() and back.next_id == db.next_id and back.dtype == dtype
    assert torch.equal(back.keys, db.keys) and torch.equal(back.values, db.values)
    assert [back.fact(i) for i in back.ids()] == [db.fact(i) for i in db.ids()]
    assert isinstance(back.fact(0), Fact) and back.fact(0).paraphrases == ("p",) and back.fact(0).extras == {"case": 1}
    for attr in ("layer", "gamma", "template", "model_id", "module_path", "config", "key_dim", "value_dim"):
        assert getattr(back, attr) == getattr(db, attr), attr
    assert back.add(torch.randn(1, D1), torch.randn(1, D2)) == [db.next_id]  # ids continue, never reused


def test_empty_database_round_trips(tmp_path):
    db = NeuralKVDatabase(D1, D2)
    db.save(tmp_path / "e.safetensors")
    back = NeuralKVDatabase.load(str(tmp_path / "e.safetensors"))
    assert len(back) == 0 and back.keys.shape == (0, D1) and back.layer is None


def test_readable_with_plain_safetensors_and_json(tmp_path):
    db = _db()
    db.save(tmp_path / "db.safetensors")
    with safe_open(str(tmp_path / "db.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["neuraldb"])
        keys, ids = f.get_tensor("keys"), f.get_tensor("ids")
        facts = json.loads(bytes(f.get_tensor("facts_json").numpy()))
    assert meta["format"] == "neuraldb.NeuralKVDatabase" and meta["format_version"] == 1
    assert f"{zlib.crc32(keys.numpy().tobytes()):08x}" == meta["crc32"]["keys"]  # as the format docstring says
    assert meta["key_dim"] == D1 and meta["layer"] == 2 and meta["gamma"] == 0.7 and meta["template"] == "<s>{}"
    assert ids.tolist() == db.ids() and torch.equal(keys, db.keys)
    assert facts[db.ids().index(0)]["fact"]["subject"] == "Paris"


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "db.safetensors"
    old = _db()
    old.save(path)
    original = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the whole file is written, then the disk turns out to be full
    with pytest.raises(OSError, match="cannot save the database to .*db.safetensors.*No space left") as info:
        _db(n=6).save(path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()

    def partial(target, tensors, metadata):
        target.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(database_io, "_write_safetensors", partial)
    with pytest.raises(OSError, match="cannot save the database to .*: disk full"):
        _db(n=6).save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["db.safetensors"]  # no temporary file left behind


def test_save_bad_paths_and_metadata(tmp_path):
    db = _db()
    with pytest.raises(ValueError, match="directory"):
        db.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        db.save(tmp_path / "missing" / "db.safetensors")
    with pytest.raises(TypeError, match="path"):
        db.save(3)
    db.config = {"fn": print}
    with pytest.raises(TypeError, match="config"):
        db.save(tmp_path / "db.safetensors")
    assert not list(tmp_path.iterdir())


# ---- load errors -----------------------------------------------------------------------------------------------


def _tamper(tmp_path, *, meta=None, tensors=None, drop=()):
    """Save a good database, then rewrite it with changed metadata fields and/or tensors. The checksums of changed
    tensors are recomputed: a crafted file can have matching ones, and the other checks must still catch it."""
    path = tmp_path / "db.safetensors"
    _db().save(path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["neuraldb"])
    data = load_file(str(path))
    data.update(tensors or {})
    for name, t in (tensors or {}).items():
        header["crc32"][name] = f"{database_io.crc32(t.contiguous()):08x}"
    header.update(meta or {})
    for name in drop:
        data.pop(name)
    save_file(data, str(path), metadata={"neuraldb": json.dumps(header)})
    return path


def _raw(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _facts_tensor(obj) -> torch.Tensor:
    return _raw(json.dumps(obj).encode())


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        NeuralKVDatabase.load(tmp_path / "nope.safetensors")


def test_load_directory(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        NeuralKVDatabase.load(tmp_path)


def test_load_not_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        NeuralKVDatabase.load(path)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "db.safetensors"
    _db().save(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="cannot load"):
        NeuralKVDatabase.load(path)


def test_load_foreign_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a neuraldb database"):
        NeuralKVDatabase.load(path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"meta": {"format": "something.else"}}, "does not declare format"),
        ({"meta": {"format_version": 3}}, "format_version 3 is not supported.*upgrade"),
        ({"meta": {"format_version": "1"}}, "'format_version' must be an int, got '1'"),
        ({"meta": {"key_dim": D1 + 1}}, "'keys' has shape"),
        ({"meta": {"count": 7}}, r"'ids' has shape \(3,\), expected \(7,\)"),
        ({"meta": {"dtype": "float32"}}, "'keys' has dtype"),
        ({"meta": {"dtype": "int8"}}, "'dtype' must be float16/bfloat16/float32, got 'int8'"),
        ({"meta": {"layer": "two"}}, "'layer'"),
        ({"meta": {"gamma": 4.0}}, "gamma"),
        ({"meta": {"template": 3}}, "'template'"),
        ({"meta": {"config": []}}, "'config'"),
        ({"meta": {"next_id": 2}}, "next_id"),
        ({"meta": {"next_id": 2**70}}, r"'next_id' must lie in \[0, 2\*\*63 - 1\]"),
        ({"meta": {"next_id": -1, "count": 0}}, "'next_id' must lie in"),
        ({"meta": {"layer": -2}}, "'layer' must be a non-negative int or null, got -2"),
        ({"meta": {"gamma": 10**400}}, "'gamma' must be a finite number in"),
        ({"meta": {"key_dim": 2**62}}, r"'key_dim' must lie in \[1, 2\*\*31 - 1\], got 4611686018427387904"),
        ({"meta": {"value_dim": 0}}, r"'value_dim' must lie in \[1, 2\*\*31 - 1\], got 0"),
        ({"meta": {"crc32": "deadbeef"}}, "'crc32' must map ids, keys, values, facts_json to 8 hex digits"),
        ({"meta": {"crc32": {"keys": "deadbeef"}}}, "'crc32' must map"),
        ({"drop": ("facts_json",)}, r"\['facts_json'\] are missing"),
        ({"tensors": {"facts_json": torch.zeros(2, 2, dtype=torch.uint8)}}, r"'facts_json' must be 1-D uint8"),
        ({"tensors": {"facts_json": _facts_tensor([None] * 3)[:-1]}}, "not UTF-8 JSON"),
        ({"tensors": {"facts_json": _raw(b"[" * 100_000 + b"]" * 100_000)}}, "nests .* too deeply"),
        ({"drop": ("values",)}, r"\['values'\] are missing"),
        ({"tensors": {"values": torch.zeros(3, D2 + 1, dtype=torch.float16)}}, "'values' has shape"),
        ({"tensors": {"ids": torch.tensor([0, 0, 2])}}, "holds id 0 twice"),
        ({"tensors": {"ids": torch.tensor([0, 2])}}, r"'ids' has shape \(2,\), expected \(3,\)"),
        ({"tensors": {"ids": torch.tensor([0.0, 2.0, 3.0])}}, "'ids' has dtype float32, expected int64"),
        ({"tensors": {"values": torch.full((3, D2), float("nan"), dtype=torch.float16)}}, "non-finite"),
        ({"tensors": {"keys": torch.full((3, D1), 2.0, dtype=torch.float16)}}, "not unit-norm"),
        ({"tensors": {"facts_json": _facts_tensor([None])}}, "list of 3 entries"),
        ({"tensors": {"facts_json": _facts_tensor([None, None, {"weird": 1}])}}, r"facts_json\[2\]"),
        ({"tensors": {"facts_json": _facts_tensor([None, None, {"fact": {"subject": "x"}}])}}, "invalid Fact"),
        ({"tensors": {"facts_json": torch.tensor([255, 0], dtype=torch.uint8)}}, "not UTF-8 JSON"),
    ],
)
def test_load_inconsistent_file_says_what_is_wrong(tmp_path, kwargs, match):
    path = _tamper(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        NeuralKVDatabase.load(path)
    message = str(info.value)
    assert message.startswith(f"cannot load {str(path)!r}: ")
    words = message.lower().replace("'", " ").split()
    assert all(a != b for a, b in itertools.pairwise(words) if a.isalpha()), f"a word repeats: {message}"


def test_load_metadata_not_json(tmp_path):
    path = tmp_path / "db.safetensors"
    save_file({"keys": torch.zeros(1)}, str(path), metadata={"neuraldb": "{not json"})
    with pytest.raises(ValueError, match="not JSON"):
        NeuralKVDatabase.load(path)


def test_load_bad_path_type():
    with pytest.raises(TypeError, match="path"):
        NeuralKVDatabase.load(None)


def test_format_constants():
    assert database_io.FORMAT_VERSION == 2 and database_io.FORMAT == "neuraldb.NeuralKVDatabase"


# ---- what a load refuses before reading, and what it allocates -------------------------------------------------


def test_load_refuses_a_fifo_without_blocking(tmp_path):
    # Opening a FIFO for reading waits for a writer, holding the GIL, and no signal interrupts it: a separate process
    # keeps a regression from hanging the test run.
    fifo = tmp_path / "db.safetensors"
    os.mkfifo(fifo)
    code = "import sys; from neuraldb import NeuralKVDatabase; NeuralKVDatabase.load(sys.argv[1])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("load blocked on the FIFO")
    assert f"ValueError: cannot load {str(fifo)!r}: it is a FIFO, not a database file" in done.stderr, done.stderr


def test_load_refuses_a_device():
    with pytest.raises(ValueError, match="'/dev/null': it is a character device"):
        NeuralKVDatabase.load("/dev/null")


def test_load_allocates_no_more_than_the_file_holds(tmp_path):
    # An empty database's metadata may claim any width: its tensors have no bytes, so safetensors cannot bound it.
    path = _tamper(
        tmp_path,
        meta={"count": 0, "key_dim": 2**28},
        tensors={
            "keys": torch.empty(0, 2**28, dtype=torch.float16),
            "values": torch.empty(0, D2, dtype=torch.float16),
            "ids": torch.empty(0, dtype=torch.int64),
            "facts_json": _facts_tensor([]),
        },
    )
    db = NeuralKVDatabase.load(path)
    assert (db.key_dim, len(db), db.capacity) == (2**28, 0, 0), "no rows in the file, none reserved"


def test_load_checks_the_device_before_reading(tmp_path):
    path = tmp_path / "db.safetensors"
    _db().save(path)
    with pytest.raises(TypeError, match="device"):
        NeuralKVDatabase.load(path, device="nowhere")
    with pytest.raises(ValueError, match="meta"):
        NeuralKVDatabase.load(path, device="meta")


# ---- checksums -----------------------------------------------------------------------------------------------


def _data_start(path, name) -> int:
    """Where tensor ``name``'s bytes start in the file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]


def _flip(path, offset, mask=0x01):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "name,byte,mask",
    [
        ("keys", 0, 0x01),  # the lowest mantissa bit of one key entry: still finite and unit-norm
        ("keys", 1, 0x7C),  # an fp16 exponent turned all-ones: a non-finite row the row checks would report
        ("values", 5, 0x01),
        ("ids", 0, 0x01),
        ("facts_json", 3, 0x01),
    ],
)
def test_one_flipped_byte_is_reported_as_corruption(tmp_path, name, byte, mask):
    path = tmp_path / "db.safetensors"
    _db().save(path)
    _flip(path, _data_start(path, name) + byte, mask)
    with pytest.raises(ValueError, match=f"tensor '{name}' does not match its checksum.*corrupted") as info:
        NeuralKVDatabase.load(path)
    assert str(path) in str(info.value)


def test_file_without_checksums_loads_with_a_warning(tmp_path):
    db = _db()
    path = tmp_path / "db.safetensors"
    db.save(path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["neuraldb"])
    del header["crc32"]
    save_file(load_file(str(path)), str(path), metadata={"neuraldb": json.dumps(header)})
    with pytest.warns(UserWarning, match="no checksums"):
        back = NeuralKVDatabase.load(path)
    assert back.ids() == db.ids() and torch.equal(back.keys, db.keys)


def test_file_is_valid_safetensors_for_every_reader(tmp_path):
    # safetensors.torch.load parses the whole buffer and checks every offset; neuraldb writes the layout itself.
    from safetensors.torch import load

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        path = tmp_path / f"{dtype}.safetensors"
        db = _db(n=5, dtype=dtype)
        db.save(path)
        tensors = load(path.read_bytes())
        assert torch.equal(tensors["keys"], db.keys) and tensors["ids"].tolist() == db.ids()
    empty = tmp_path / "empty.safetensors"
    NeuralKVDatabase(D1, D2).save(empty)
    assert load(empty.read_bytes())["keys"].shape == (0, D1)


# ---- what a save replaces --------------------------------------------------------------------------------------


def test_save_keeps_the_files_permission_bits(tmp_path):
    path = tmp_path / "db.safetensors"
    _db().save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, "a new file: what open() would give it"
    path.chmod(0o640)
    _db(n=5).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_save_writes_through_a_symlink(tmp_path):
    real = tmp_path / "real.safetensors"
    link = tmp_path / "link.safetensors"
    _db().save(real)
    link.symlink_to(real.name)
    db = _db(n=6)
    db.save(link)
    assert link.is_symlink() and os.readlink(link) == real.name
    assert NeuralKVDatabase.load(real).ids() == db.ids()


def test_save_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "db.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a FIFO, not a regular file"):
        _db().save(fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode), "the node is left as it was"
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo.name)
    with pytest.raises(ValueError, match="is a FIFO.*leads to"):
        _db().save(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.safetensors", "link.safetensors"]
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own, safe to lose
    except OSError:
        return  # no CAP_MKNOD: the FIFO above stands for every non-regular file
    with pytest.raises(ValueError, match="is a character device, not a regular file"):
        _db().save(device)
    assert stat.S_ISCHR(device.lstat().st_mode)


_SLOW_SAVE = """
import os, sys, time, torch
from neuraldb import NeuralKVDatabase

def stall(fd):  # the temporary file is written and about to be renamed: the worst moment to die
    print("writing", flush=True)
    time.sleep(600)

os.fsync = stall
db = NeuralKVDatabase(8, 4)
db.add(torch.randn(3, 8), torch.randn(3, 4))
db.save(sys.argv[1])
"""


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_save_removes_temporaries_of_a_killed_save(tmp_path):
    path = tmp_path / "db.safetensors"
    old = _db()
    old.save(path)
    original = path.read_bytes()
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_SAVE), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready and child.stdout.readline().strip() == "writing", "the child never reached the write"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "db.safetensors"]
    assert leftovers == [f".db.safetensors.tmp-{child.pid}-" + leftovers[0][-8:]], leftovers
    assert path.read_bytes() == original
    dead = _dead_pid()
    keep = [
        f".db.safetensors.tmp-{os.getpid()}-0123abcd",  # a live writer (this process)
        f".other.safetensors.tmp-{dead}-0123abcd",  # another target's
        f".db.safetensors.tmp-{dead}-0123abcdx",  # not the exact pattern
        f"db.safetensors.tmp-{dead}-0123abcd",
    ]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".db.safetensors.tmp-{dead}-89abcdef").write_bytes(b"x")
    _db(n=5).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["db.safetensors"])
