"""NeuralKVDatabase.save/load: round trip, plain safetensors + json readability, atomic writes, precise errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neuraldb import NeuralKVDatabase
from neuraldb import database_io
from neuraldb.facts import Fact

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
    assert meta["key_dim"] == D1 and meta["layer"] == 2 and meta["gamma"] == 0.7 and meta["template"] == "<s>{}"
    assert ids.tolist() == db.ids() and torch.equal(keys, db.keys)
    assert facts[db.ids().index(0)]["fact"]["subject"] == "Paris"


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "db.safetensors"
    old = _db()
    old.save(path)
    original = path.read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
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
    """Save a good database, then rewrite it with changed metadata fields and/or tensors."""
    path = tmp_path / "db.safetensors"
    _db().save(path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["neuraldb"])
    data = load_file(str(path))
    header.update(meta or {})
    data.update(tensors or {})
    for name in drop:
        data.pop(name)
    save_file(data, str(path), metadata={"neuraldb": json.dumps(header)})
    return path


def _facts_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


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
        (dict(meta={"format": "something.else"}), "does not declare format"),
        (dict(meta={"format_version": 2}), "format_version 2 is not supported.*upgrade"),
        (dict(meta={"format_version": "1"}), "format_version"),
        (dict(meta={"key_dim": D1 + 1}), "'keys' has shape"),
        (dict(meta={"count": 7}), "'keys' has shape"),
        (dict(meta={"dtype": "float32"}), "'keys' has dtype"),
        (dict(meta={"dtype": "int8"}), "dtype 'int8'"),
        (dict(meta={"layer": "two"}), "'layer'"),
        (dict(meta={"gamma": 4.0}), "gamma"),
        (dict(meta={"template": 3}), "'template'"),
        (dict(meta={"config": []}), "'config'"),
        (dict(meta={"next_id": 2}), "next_id"),
        (dict(drop=("values",)), r"\['values'\] are missing"),
        (dict(tensors={"values": torch.zeros(3, D2 + 1, dtype=torch.float16)}), "'values' has shape"),
        (dict(tensors={"ids": torch.tensor([0, 0, 2])}), "repeats"),
        (dict(tensors={"ids": torch.tensor([0, 2])}), "'ids' must be int64 of shape"),
        (dict(tensors={"ids": torch.tensor([0.0, 2.0, 3.0])}), "'ids' must be int64"),
        (dict(tensors={"values": torch.full((3, D2), float("nan"), dtype=torch.float16)}), "non-finite"),
        (dict(tensors={"keys": torch.full((3, D1), 2.0, dtype=torch.float16)}), "not unit-norm"),
        (dict(tensors={"facts_json": _facts_tensor([None])}), "list of 3 entries"),
        (dict(tensors={"facts_json": _facts_tensor([None, None, {"weird": 1}])}), r"facts_json\[2\]"),
        (dict(tensors={"facts_json": _facts_tensor([None, None, {"fact": {"subject": "x"}}])}), "invalid Fact"),
        (dict(tensors={"facts_json": torch.tensor([255, 0], dtype=torch.uint8)}), "not UTF-8 JSON"),
    ],
)
def test_load_inconsistent_file_says_what_is_wrong(tmp_path, kwargs, match):
    path = _tamper(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        NeuralKVDatabase.load(path)
    assert str(path) in str(info.value)


def test_load_metadata_not_json(tmp_path):
    path = tmp_path / "db.safetensors"
    save_file({"keys": torch.zeros(1)}, str(path), metadata={"neuraldb": "{not json"})
    with pytest.raises(ValueError, match="not JSON"):
        NeuralKVDatabase.load(path)


def test_load_bad_path_type():
    with pytest.raises(TypeError, match="path"):
        NeuralKVDatabase.load(None)


def test_format_constants():
    assert database_io.FORMAT_VERSION == 1 and database_io.FORMAT == "neuraldb.NeuralKVDatabase"
