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
