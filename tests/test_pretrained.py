"""Edits as a portable artifact (neuraldb.pretrained): the weights fingerprint, db.save_pretrained /
NeuralKVDatabase.from_pretrained, neuraldb.from_pretrained's checks, and a patched model's save_pretrained that
never loses the edits silently."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import neuraldb
import pytest
import torch
from _tiny_models import PATCH_LAYER, assert_bitwise, capture, per_token, prompt, separated_position, tiny_model
from neuraldb.facts import Fact
from neuraldb.pretrained import CONFIG_NAME, DATABASE_NAME, base_model_id, read_config

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM


def _edited(arch="llama", seed=0):
    """(model, ids, unedited logits, db with one fact that changes the logits at one position)."""
    model = tiny_model(arch, seed=seed)
    ids = prompt(12)
    _, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    with torch.no_grad(), capture(module) as cap:
        base = model(ids).logits
    keys, out = per_token(cap.inputs[0], ids)[0], per_token(cap.outputs[0], ids)
    db = neuraldb.NeuralKVDatabase.for_model(model, PATCH_LAYER)
    p, db.gamma = separated_position(keys)
    residual = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(5)) * float(out.abs().max()) * 4
    db.add(keys[p], residual, facts=[Fact("Danielle Darrieux", "The mother tongue of {} is", "English")])
    db.template = "<s>{}"
    db.model_id = "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1"
    return model, ids, base, db


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- the fingerprint ------------------------------------------------------------------------------------------------


def test_fingerprint_survives_bf16_and_save_pretrained_and_tells_weights_apart(tmp_path):
    model = tiny_model("llama")
    fp = neuraldb.fingerprint(model)
    assert len(fp) == 32 and int(fp, 16) >= 0
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert neuraldb.fingerprint(bf16) == fp
    model.save_pretrained(tmp_path / "fp32")
    bf16.save_pretrained(tmp_path / "bf16")
    for folder, dtype in (("fp32", torch.float32), ("fp32", torch.bfloat16), ("bf16", torch.float32)):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=dtype)
        assert next(reloaded.parameters()).dtype == dtype
        assert neuraldb.fingerprint(reloaded) == fp, (folder, dtype)
    # other weights: another seed, and one weight of one attention matrix moved by far more than bf16 rounding
    assert neuraldb.fingerprint(tiny_model("llama", seed=1)) != fp
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.model.layers[0].self_attn.q_proj.weight[0, 0] += 0.5
    assert neuraldb.fingerprint(nudged) != fp
    assert neuraldb.fingerprint(tiny_model("qwen2")) != fp  # same shapes and seed, another architecture's layout


def test_fingerprint_refuses_what_it_cannot_read():
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(tiny_model("llama").config)
    with pytest.raises(ValueError, match="meta device"):
        neuraldb.fingerprint(meta)
    with pytest.raises(ValueError, match="no floating-point parameters"):
        neuraldb.fingerprint(torch.nn.ReLU())


# --- the directory --------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    model, _, _, db = _edited()
    db.save_pretrained(tmp_path / "edits", model=model)
    assert sorted(p.name for p in (tmp_path / "edits").iterdir()) == [CONFIG_NAME, DATABASE_NAME]
    back = neuraldb.NeuralKVDatabase.from_pretrained(tmp_path / "edits")
    assert back.ids() == db.ids() and back.fact(0) == db.fact(0)
    assert_bitwise(back.keys, db.keys)
    assert_bitwise(back.values, db.values)
    for name in ("layer", "gamma", "template", "model_id", "module_path"):
        assert getattr(back, name) == getattr(db, name), name

    config = read_config(tmp_path / "edits")
    assert config["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # no GGUF suffix: it is recorded apart
    assert config["base_model_quantization"] == "Q4_1"
    assert config["architecture"] == "llama" and config["model_class"] == "LlamaForCausalLM"
    assert config["fingerprint"] == neuraldb.fingerprint(model) and config["fingerprint_dtype"] == "float32"
    assert config["module_path"] == "model.layers.1.mlp.down_proj" and config["layer"] == PATCH_LAYER
    assert config["gamma"] == db.gamma and config["template"] == "<s>{}"
    assert (config["key_dim"], config["value_dim"], config["num_facts"]) == (db.key_dim, db.value_dim, 1)

    neuraldb.save_pretrained(db, tmp_path / "again", model=model)  # the function is the method
    assert read_config(tmp_path / "again") == config


@pytest.mark.parametrize(
    "recorded, expected",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1", ("HuggingFaceTB/SmolLM2-135M-Instruct", None, "Q4_1")),
        ("google/gemma-3-270m:Q4_K_M", ("google/gemma-3-270m", None, "Q4_K_M")),
        ("smollm2", ("HuggingFaceTB/SmolLM2-135M-Instruct", None, "Q4_1")),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", ("HuggingFaceTB/SmolLM2-135M-Instruct", None, None)),
        ("gpt2", ("gpt2", None, None)),
        (
            "/home/u/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/" + "ab12" * 10,
            ("HuggingFaceTB/SmolLM2-135M-Instruct", "ab12" * 10, None),
        ),
        ("/home/u/models/my-smollm", (None, None, None)),  # a local path means nothing elsewhere
        ("./edited_hf", (None, None, None)),
        ("gguf:SmolLM2-135M-Instruct.Q4_1.gguf", (None, None, None)),
        (None, (None, None, None)),
    ],
)
def test_base_model_id_keeps_hub_ids_and_drops_paths(recorded, expected):
    assert base_model_id(recorded) == expected


def test_a_folder_written_by_save_pretrained_names_its_base_model(tmp_path):
    model, _, _, db = _edited()
    db.save_pretrained(tmp_path, model=model)
    assert base_model_id(str(tmp_path)) == ("HuggingFaceTB/SmolLM2-135M-Instruct", None, "Q4_1")
    db.model_id = str(tmp_path)  # edits made on a model loaded from that folder
    db.save_pretrained(tmp_path / "next", model=model)
    assert read_config(tmp_path / "next")["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_bad_directories_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not written by neuraldb's save_pretrained"):
        read_config(tmp_path)
    model, _, _, db = _edited()
    db.save(tmp_path / DATABASE_NAME)
    with pytest.raises(FileNotFoundError, match="NeuralKVDatabase.load"):
        neuraldb.NeuralKVDatabase.from_pretrained(tmp_path)
    db.save_pretrained(tmp_path, model=model)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99.*upgrade"):
        neuraldb.from_pretrained(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config | {"num_facts": 7}))
    with pytest.raises(ValueError, match="disagree.*num_facts: 7 vs 1"):
        neuraldb.NeuralKVDatabase.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config | {"database_file": "../elsewhere.safetensors"}))
    with pytest.raises(ValueError, match="database_file must be a file name"):
        neuraldb.NeuralKVDatabase.from_pretrained(tmp_path)


# --- neuraldb.from_pretrained ---------------------------------------------------------------------------------------


def test_from_pretrained_checks_the_model_and_patches_it(tmp_path):
    model, ids, base, db = _edited()
    neuraldb.patch_model(model, db)
    patched = _logits(model, ids)
    assert not torch.equal(patched, base)
    db.save_pretrained(tmp_path, model=model)

    fresh = tiny_model("llama")
    assert neuraldb.from_pretrained(fresh, tmp_path) is fresh
    assert len(neuraldb.patch_info(fresh).db) == 1
    assert_bitwise(_logits(fresh, ids), patched)
    # the same weights in bf16 are the same model
    neuraldb.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path)


def test_other_weights_are_refused_naming_both_unless_forced(tmp_path):
    model, _, _, db = _edited()
    db.save_pretrained(tmp_path, model=model)
    other = tiny_model("llama", seed=1)
    mine, theirs = neuraldb.fingerprint(model), neuraldb.fingerprint(other)
    with pytest.raises(ValueError, match=rf"(?s)made for HuggingFaceTB/SmolLM2-135M-Instruct.*{mine}.*{theirs}.*force"):
        neuraldb.from_pretrained(other, tmp_path)
    assert neuraldb.patch_info(other) is None
    with pytest.warns(UserWarning, match=r"other weights.*Using them anyway \(force=True\)"):
        neuraldb.from_pretrained(other, tmp_path, force=True)
    assert len(neuraldb.patch_info(other).db) == 1


def test_another_architecture_is_refused_naming_both_unless_forced(tmp_path):
    model, _, _, db = _edited()
    db.save_pretrained(tmp_path, model=model)
    qwen = tiny_model("qwen2")  # the same widths: only the check tells them apart
    with pytest.raises(ValueError, match=r"architecture 'llama' != 'qwen2'"):
        neuraldb.from_pretrained(qwen, tmp_path)
    assert neuraldb.patch_info(qwen) is None
    with pytest.warns(UserWarning, match="anyway"):
        neuraldb.from_pretrained(qwen, tmp_path, force=True)
    assert neuraldb.patch_info(qwen) is not None


def test_fp16_mismatch_says_why(tmp_path):
    model, _, _, db = _edited()
    db.save_pretrained(tmp_path, model=model)
    half = copy.deepcopy(model).to(torch.float16)
    if neuraldb.fingerprint(half) == neuraldb.fingerprint(model):
        pytest.skip("this fp16 copy happens to round like bf16")
    with pytest.raises(ValueError, match="fp16 rounds differently"):
        neuraldb.from_pretrained(half, tmp_path)


def test_saved_without_model_warns_at_both_ends(tmp_path):
    _, _, _, db = _edited()
    db.model_identity = None  # a database that does not know its weights (built by hand, or an older file)
    with pytest.warns(UserWarning, match="without model=.*no fingerprint"):
        db.save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config["fingerprint"] is None and config["architecture"] is None
    with pytest.warns(UserWarning, match="record no fingerprint"):
        neuraldb.from_pretrained(tiny_model("llama", seed=1), tmp_path)


# --- a patched model's save_pretrained ------------------------------------------------------------------------------


def test_patched_model_save_pretrained_saves_the_edits_beside_and_reloads_them(tmp_path):
    model, ids, base, db = _edited()
    neuraldb.patch_model(model, db)
    patched = _logits(model, ids)
    with pytest.warns(UserWarning, match=r"1 edits beside them.*neuraldb\.from_pretrained\(AutoModelForCausalLM"):
        model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", CONFIG_NAME, DATABASE_NAME} <= names

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_bitwise(_logits(reloaded, ids), base)  # the weights alone are the unedited model
    neuraldb.from_pretrained(reloaded, tmp_path)
    assert_bitwise(_logits(reloaded, ids), patched)
    assert read_config(tmp_path)["fingerprint"] == neuraldb.fingerprint(model)


def test_unpatched_model_save_pretrained_is_unchanged(tmp_path):
    never, _, _, db = _edited()
    never.save_pretrained(tmp_path / "never")
    model = tiny_model("llama")
    neuraldb.patch_model(model, db)
    neuraldb.patch_model(model, db)  # re-patching does not wrap twice
    assert model.__dict__["save_pretrained"].own is None
    neuraldb.unpatch_model(model)
    assert "save_pretrained" not in model.__dict__
    assert model.save_pretrained.__func__ is type(model).save_pretrained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "unpatched")
    files = sorted(p.name for p in (tmp_path / "never").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "unpatched").iterdir())
    assert CONFIG_NAME not in files
    for name in files:
        assert (tmp_path / "never" / name).read_bytes() == (tmp_path / "unpatched" / name).read_bytes(), name


def test_unpatch_restores_the_instances_own_save_pretrained(tmp_path):
    model, _, _, db = _edited()
    calls = []

    def own(directory, *args, **kwargs):
        calls.append(directory)
        type(model).save_pretrained(model, directory, *args, **kwargs)

    model.save_pretrained = own
    neuraldb.patch_model(model, db)
    with pytest.warns(UserWarning, match="edits beside them"):
        model.save_pretrained(tmp_path)
    assert calls == [tmp_path] and (tmp_path / DATABASE_NAME).is_file()
    neuraldb.unpatch_model(model)
    assert model.__dict__["save_pretrained"] is own


def test_copies_of_a_patched_model_save_their_own_database(tmp_path):
    model, _, _, db = _edited()
    neuraldb.patch_model(model, db)
    for name, twin in (("deep", copy.deepcopy(model)), ("pickled", pickle.loads(pickle.dumps(model)))):
        assert twin.__dict__["save_pretrained"].model is twin
        twin_db = neuraldb.patch_info(twin).db
        twin_db.delete(twin_db.ids())
        with pytest.warns(UserWarning, match="the 0 edits"):
            twin.save_pretrained(tmp_path / name)
        assert read_config(tmp_path / name)["num_facts"] == 0
    assert len(db) == 1


def test_push_to_hub_and_unsavable_databases_are_refused_before_writing(tmp_path):
    model, _, _, db = _edited()
    neuraldb.patch_model(model, db)
    with pytest.raises(ValueError, match="push_to_hub=True.*without the edits"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()
    patch = neuraldb.patch_info(model)
    patch.db = object()  # stands for a store save_pretrained cannot write (a sharded database)
    try:
        with pytest.raises(TypeError, match="cannot write beside the weights"):
            model.save_pretrained(tmp_path / "other")
    finally:
        patch.db = db
    assert not (tmp_path / "other").exists()


def test_only_the_main_process_writes_the_database(tmp_path):
    model, _, _, db = _edited()
    neuraldb.patch_model(model, db)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path, is_main_process=False)
    assert not (tmp_path / DATABASE_NAME).exists()
