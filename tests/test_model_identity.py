"""Model identity is the weights fingerprint and the architecture (issue 29), checked the same way by patch_model,
edit(db=...), neuraldb.from_pretrained and the CLI; never a folder name or a quantisation suffix. Databases written
before neuraldb recorded an identity still load and patch, checked by what they have."""

from __future__ import annotations

import copy
import warnings

import neuraldb
import pytest
import torch
from _tiny_editing import FACTS, word_llama
from _tiny_models import PATCH_LAYER, tiny_model
from neuraldb.pretrained import ModelMismatchError, model_identity

transformers = pytest.importorskip("transformers")

EDIT = {"layer": 2, "gamma": 0.7, "progress": False, "n_prefixes": 1, "prefix_len": 3, "steps": 2}


def _db(model, model_id: str | None = "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1"):
    db = neuraldb.NeuralKVDatabase.for_model(model, PATCH_LAYER, dtype=torch.float32)
    db.add(torch.nn.functional.normalize(torch.randn(2, db.key_dim), dim=1), torch.zeros(2, db.value_dim))
    db.model_id = model_id
    return db


def test_a_database_records_the_identity_of_its_model_and_keeps_it_through_a_file(tmp_path):
    model = tiny_model("llama")
    db = _db(model)
    assert db.model_identity == model_identity(model)
    assert db.model_identity["architecture"] == "llama" and len(db.model_identity["fingerprint"]) == 32
    db.save(tmp_path / "db.safetensors")
    assert neuraldb.NeuralKVDatabase.load(tmp_path / "db.safetensors").model_identity == db.model_identity


def test_patch_model_refuses_a_database_made_for_other_weights_unless_forced():
    db = _db(tiny_model("llama"))
    other = tiny_model("llama", seed=1)  # the same architecture and widths: only the fingerprint tells them apart
    with pytest.raises(ModelMismatchError, match=r"(?s)db were made for .*other weights.*Pass force=True"):
        neuraldb.patch_model(other, db)
    assert neuraldb.patch_info(other) is None
    with pytest.warns(UserWarning, match=r"other weights.*anyway \(force=True\)"):
        neuraldb.patch_model(other, db, force=True)
    assert neuraldb.patch_info(other).db is db


def test_patch_model_refuses_another_architecture():
    db = _db(tiny_model("llama"))
    with pytest.raises(ModelMismatchError, match="architecture 'llama' != 'qwen2'"):
        neuraldb.patch_model(tiny_model("qwen2"), db)


def test_the_same_weights_from_another_folder_or_dtype_are_the_same_model(tmp_path):
    model = tiny_model("llama")
    db = _db(model)
    model.save_pretrained(tmp_path / "edited_hf")
    for dtype in (torch.float32, torch.bfloat16):
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "edited_hf", dtype=dtype)
        assert neuraldb.models.model_id(reloaded) != db.model_id  # a path, not the recorded name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            neuraldb.patch_model(reloaded, db)


def test_an_old_database_without_identity_loads_and_falls_back_to_the_hub_id(tmp_path):
    model = tiny_model("llama")
    db = _db(model)
    db.model_identity = None  # as in a file written before neuraldb recorded one
    db.save(tmp_path / "old.safetensors")
    old = neuraldb.NeuralKVDatabase.load(tmp_path / "old.safetensors")
    assert old.model_identity is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neuraldb.patch_model(tiny_model("llama", seed=1), old)  # nothing to tell the weights apart by: dims only
    named = tiny_model("llama")
    named.config.name_or_path = "HuggingFaceTB/SmolLM2-135M"  # another Hub id: the names decide
    with pytest.raises(ModelMismatchError, match="base model 'HuggingFaceTB/SmolLM2-135M-Instruct' != "):
        neuraldb.patch_model(named, old)
    named.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the checkpoint of the Q4_1 GGUF
    neuraldb.patch_model(named, old)


def test_a_quantised_database_on_the_checkpoint_says_why_it_differs():
    db = _db(tiny_model("llama"))
    checkpoint = tiny_model("llama", seed=1)
    checkpoint.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelMismatchError, match="made on the Q4_1 quantisation"):
        neuraldb.patch_model(checkpoint, db)


def test_save_pretrained_without_model_uses_the_identity_the_database_records(tmp_path):
    model = tiny_model("llama")
    db = _db(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db.save_pretrained(tmp_path)
    config = neuraldb.pretrained.read_config(tmp_path)
    assert config["fingerprint"] == neuraldb.fingerprint(model) and config["architecture"] == "llama"
    with pytest.raises(ModelMismatchError):
        neuraldb.from_pretrained(tiny_model("llama", seed=1), tmp_path)


def test_edit_refuses_to_append_to_a_database_of_other_weights_before_any_work():
    model, tok = word_llama()
    db = neuraldb.edit(model, tok, FACTS[:1], **EDIT)
    assert db.model_identity == model_identity(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(2)  # a fine-tune, say
    before = db.state().ids
    with pytest.raises(ModelMismatchError, match=r"db were made for .*other weights.*force=True"):
        neuraldb.edit(other, tok, FACTS[1:2], db=db, **EDIT)
    assert db.state().ids == before
    with pytest.warns(UserWarning, match="anyway"):
        neuraldb.edit(other, tok, FACTS[1:2], db=db, force=True, **EDIT)
    assert len(db) == 2 and db.model_identity == model_identity(model)  # the record keeps the first model's


def test_edit_gives_an_old_database_the_identity_of_the_model_it_appends_with():
    model, tok = word_llama()
    db = neuraldb.edit(model, tok, FACTS[:1], **EDIT)
    db.model_identity = None
    neuraldb.edit(model, tok, FACTS[1:2], db=db, **EDIT)
    assert db.model_identity == model_identity(model)


def test_a_bad_identity_in_a_file_is_refused(tmp_path):
    db = _db(tiny_model("llama"))
    db.model_identity = {"fingerprint": 3}
    with pytest.raises(TypeError, match="model_identity must be None or a dict of str values"):
        db.save(tmp_path / "db.safetensors")


# --- load_model: Hub ids from the local Hugging Face cache, dtype and device_map -----------------------------------

REV = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(root, repo_id="tinyorg/tiny-llama"):
    """``root`` laid out as the Hugging Face Hub cache holding ``repo_id`` at revision REV (refs/main -> REV)."""
    from test_models import tiny_model_dir

    repo = root / f"models--{repo_id.replace('/', '--')}"
    tiny_model_dir(repo / "snapshots" / REV, pad=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    return repo / "snapshots" / REV


@pytest.fixture
def offline(monkeypatch):
    """Any connection attempt fails the test: the cache lookup must never touch the network."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("load_model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_hub_id_loads_from_the_local_cache(tmp_path, monkeypatch, offline, variable):
    from neuraldb.models import hub_cache_dir, load_model, model_id

    cache = tmp_path / "hf" / "hub"
    snapshot = _fake_hub_cache(cache)
    monkeypatch.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else cache.parent))
    assert hub_cache_dir() == cache
    model, _ = load_model("tinyorg/tiny-llama")
    assert model_id(model) == "tinyorg/tiny-llama"  # the Hub id, not the snapshot path
    assert neuraldb.fingerprint(model) == neuraldb.fingerprint(load_model(snapshot)[0])
    assert neuraldb.pretrained_io.build_config(_db(model, model_id(model)), model)["base_model"] == "tinyorg/tiny-llama"


def test_a_hub_id_not_in_the_cache_says_how_to_get_it(tmp_path, monkeypatch, offline):
    from neuraldb.models import ModelNotFoundError, load_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match=r"'HuggingFaceTB/SmolLM2-135M-Instruct' is not in the local Hugging "
                       r"Face cache \(.*empty.*hf download HuggingFaceTB/SmolLM2-135M-Instruct"):  # fmt: skip
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_dtype_strings_and_device_map_as_transformers_users_expect(tmp_path, monkeypatch, offline):
    from neuraldb.models import load_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path)
    for dtype, want in (("bf16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32)):
        model, _ = load_model("tinyorg/tiny-llama", dtype)
        assert next(model.parameters()).dtype == want, dtype
    for device_map in ("auto", "cpu", {"": "cpu"}):
        model, _ = load_model("tinyorg/tiny-llama", "bfloat16", device_map=device_map)
        assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="pass device or device_map, not both"):
        load_model("tinyorg/tiny-llama", device="cpu", device_map="auto")


# --- the CLI: the same check, and the cheap one before the weights load --------------------------------------------


@pytest.fixture
def edited_dirs(tmp_path):
    """(a tiny model's folder, the same weights saved elsewhere with save_pretrained, a database made on them)."""
    from neuraldb.models import load_model
    from test_models import tiny_model_dir

    base = tiny_model_dir(tmp_path / "base", pad=True)
    model, tok = load_model(base)
    model.save_pretrained(tmp_path / "edited_hf")
    tok.save_pretrained(tmp_path / "edited_hf")
    db = neuraldb.NeuralKVDatabase.for_model(model, 1, dtype=torch.float32)
    db.add(torch.nn.functional.normalize(torch.randn(1, db.key_dim), dim=1), torch.zeros(1, db.value_dim))
    db.model_id = "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1"  # a recorded name that is neither folder
    db.save(tmp_path / "db.safetensors")
    return base, tmp_path / "edited_hf", tmp_path / "db.safetensors"


def tuned_copy(base, out):
    """``base``'s weights with one matrix changed, saved to ``out``: the same architecture, other weights."""
    from neuraldb.models import load_model

    model, tok = load_model(base)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _generate(model, db, *extra):
    from neuraldb.cli import main

    return main(["generate", "--model", str(model), "--db", str(db), "-p", "paris is", "--max-new-tokens", "1", *extra])


def test_cli_takes_the_same_weights_from_another_folder(edited_dirs, capsys):
    _, edited_hf, db = edited_dirs
    assert _generate(edited_hf, db) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err


def test_cli_refuses_other_weights_in_one_line_unless_forced(edited_dirs, tmp_path, capsys):
    base, _, db = edited_dirs
    tuned_copy(base, tmp_path / "tuned")
    capsys.readouterr()
    assert _generate(tmp_path / "tuned", db) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("neuraldb generate:")]
    assert len(err) == 1 and "error: the database's edits were made for" in err[0], err
    assert "other weights (the fingerprints differ)" in err[0] and "--force" in err[0], err
    assert _generate(tmp_path / "tuned", db, "--force") == 0
    assert capsys.readouterr().err.count("made for") == 1  # warned once, not again by patch_model


def test_cli_refuses_another_architecture_before_loading_the_weights(edited_dirs, tmp_path, monkeypatch, capsys):
    import json

    import neuraldb.cli

    base, _, db = edited_dirs
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    config = json.loads((base / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(dict(config, model_type="qwen2", architectures=["Qwen2ForCausalLM"])))

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the database was refused")

    monkeypatch.setattr(neuraldb.cli, "load_model_verbose", no_load)
    assert _generate(qwen, db) == 1
    err = capsys.readouterr().err
    assert "made for a 'llama' model, but" in err and "is 'qwen2'" in err and "--force" in err
    config["intermediate_size"] = 64  # the widths are checked from the config too
    (qwen / "config.json").write_text(json.dumps(config))
    assert _generate(qwen, db) == 1
    assert "db has key_dim=32, value_dim=16 but the down-projections" in capsys.readouterr().err
