"""Per-model editing defaults: chosen by what the model is (family and size), never by its name or folder; the bf16
steps are a default only where bf16 runs natively."""

from __future__ import annotations

import copy
from dataclasses import replace

import neuraldb
import pytest
import torch
import transformers
from _tiny_editing import word_llama
from neuraldb import architectures as arch
from neuraldb.editing.defaults import MODEL_DEFAULTS, EditConfig, defaults_for, native_bf16, resolve


@pytest.fixture
def cpu_has(monkeypatch):
    """``cpu_has(amx=..., avx512_bf16=...)`` fakes the CPU's bf16 instructions; no oneDNN cap unless a test sets one."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def fake(*, amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)

    return fake


@pytest.fixture
def smollm2_like(monkeypatch):
    """``smollm2_like(dtype)`` -> (model, tokenizer): the tiny word Llama, its size registered in the family table with
    SmolLM2-135M's tuned values (bf16 steps), as a swept size of the Llama family would be."""
    model, tok = word_llama()
    tuned = arch.Tuned("tiny", arch.model_size(model), arch.SMOLLM2_135M.edit)
    monkeypatch.setitem(arch.ARCHITECTURES, "llama", replace(arch.ARCHITECTURES["llama"], tuned=(tuned,)))

    def make(dtype: torch.dtype = torch.float32):
        return model.to(dtype), tok

    return make


def on_meta(config: transformers.PretrainedConfig, name: str) -> torch.nn.Module:
    """A model of ``config``'s real size without its memory, recorded as loaded from ``name``."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config))
    model.config.name_or_path = name
    return model


SMOLLM2_135M = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True,
)  # fmt: skip
# the next size of the family: the same architecture, none of the 135M sweep's numbers apply
SMOLLM2_360M = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
    num_key_value_heads=5, tie_word_embeddings=True,
)  # fmt: skip
GEMMA3_270M = transformers.Gemma3TextConfig(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256,
)  # fmt: skip


def test_the_same_model_in_two_folders_gets_the_same_defaults(tmp_path):
    # the bug this guards against: a folder whose name held "smollm2-135m" got SmolLM2's tuned values and any
    # other folder got the family's (layer 8, 5 prefixes, 20 steps: five times the time per fact)
    model, tok = word_llama()
    loaded = []
    for folder in ("SmolLM2-135M-Instruct", "my-copy"):
        model.save_pretrained(tmp_path / folder)
        tok.save_pretrained(tmp_path / folder)
        loaded.append(neuraldb.load_model(tmp_path / folder)[0])
    assert defaults_for(loaded[0]) == defaults_for(loaded[1])


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/data/models/my-finetune", ""])
def test_smollm2_135m_is_recognised_by_its_size_wherever_it_was_loaded_from(name):
    cfg = defaults_for(on_meta(SMOLLM2_135M, name))
    tuned = replace(EditConfig(), **arch.SMOLLM2_135M.edit)
    assert cfg == replace(tuned, compute_dtype="float32")  # bf16 is never native on the meta device
    assert (cfg.layer, cfg.n_prefixes, cfg.steps, cfg.lr) == (6, 3, 10, 2.0)
    # patching a database that names no layer lands where editing does (it took round(0.25 * 30) = 8)
    assert arch.default_layer(on_meta(SMOLLM2_135M, name)) == 6


def test_another_size_of_the_family_gets_the_family_defaults():
    # even under the swept size's name: the numbers were tuned for that size's layers and widths
    model = on_meta(SMOLLM2_360M, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert arch.tuned_for(model) is None
    assert defaults_for(model) == replace(EditConfig(), layer=8, gamma=0.65)  # round(0.25 * 32)
    shallower = copy.deepcopy(SMOLLM2_135M)
    shallower.num_hidden_layers = 24  # one fact differs, e.g. a pruned copy
    assert defaults_for(on_meta(shallower, "SmolLM2-135M")) == replace(EditConfig(), layer=6, gamma=0.65)


def test_gemma3_270m_is_recognised_by_its_size():
    model = on_meta(GEMMA3_270M, "/elsewhere/gemma")
    assert arch.tuned_for(model) is arch.GEMMA3_270M
    cfg = defaults_for(model)
    # layer: the family's fraction (round(0.25 * 18)), as the sweep used it; gamma: the sweep's
    assert (cfg.layer, cfg.gamma, cfg.lr, cfg.n_prefixes, cfg.steps) == (5, 0.75, 0.5, 3, 10)


def test_tuned_entries_name_edit_config_fields_and_one_entry_per_size():
    for family, spec in arch.ARCHITECTURES.items():
        assert len({t.size for t in spec.tuned}) == len(spec.tuned), family
        for t in spec.tuned:
            assert set(t.edit) <= EditConfig.names(), (family, t.name)
    assert set(MODEL_DEFAULTS) == {"SmolLM2-135M", "Gemma-3-270M"}
    with pytest.raises(TypeError):
        arch.SMOLLM2_135M.edit["lr"] = 1.0  # type: ignore[index]


def test_an_explicit_value_wins_over_the_tuned_one():
    model = on_meta(SMOLLM2_135M, "smollm2")
    cfg = resolve(model, layer=3, lr=0.1, steps=None)
    assert (cfg.layer, cfg.lr, cfg.steps) == (3, 0.1, 10)  # None leaves the default


def test_a_model_of_no_known_family_gets_generic_values_and_no_layer():
    assert defaults_for(torch.nn.Linear(4, 4)) == EditConfig()


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "native"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_native_bf16_on_the_cpu_means_amx_or_avx512_bf16(cpu_has, amx, avx512_bf16, native):
    cpu_has(amx=amx, avx512_bf16=avx512_bf16)
    assert native_bf16("cpu") is native
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize(
    ("cap", "native"),
    [
        ("avx2", False),
        ("AVX512_CORE", False),
        ("AVX512_CORE_VNNI", False),
        ("AVX512_CORE_BF16", True),
        ("AVX512_CORE_AMX", True),
        ("ALL", True),
    ],
)
def test_a_onednn_cap_below_bf16_makes_it_emulated(cpu_has, monkeypatch, cap, native):
    cpu_has(amx=True, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert native_bf16("cpu") is native


def test_the_model_default_asks_for_bf16_steps_only_where_they_are_native(cpu_has, smollm2_like):
    model, _ = smollm2_like()
    cpu_has(amx=True, avx512_bf16=False)
    native = defaults_for(model)
    cpu_has(amx=False, avx512_bf16=False)
    emulated = defaults_for(model)
    assert native.compute_dtype == "bfloat16" and emulated.compute_dtype == "float32"
    assert replace(native, compute_dtype="float32") == emulated  # nothing else moves
    # what the caller asks for stands either way
    assert resolve(model, compute_dtype="bfloat16").compute_dtype == "bfloat16"
    cpu_has(amx=True, avx512_bf16=True)
    assert resolve(model, compute_dtype="float32").compute_dtype == "float32"


def test_a_model_already_in_bf16_keeps_bf16_steps_without_native_bf16(cpu_has, smollm2_like):
    # Its weights are bf16 already: float32 steps would convert them up and double their memory.
    cpu_has(amx=False, avx512_bf16=False)
    assert defaults_for(smollm2_like(torch.bfloat16)[0]).compute_dtype == "bfloat16"


def test_appending_chooses_the_compute_dtype_for_this_machine(cpu_has, smollm2_like, tmp_path, monkeypatch):
    # A database edited where bf16 is native, appended to where it is not: the steps go float32 there.
    from _tiny_editing import FACTS
    from neuraldb.editing import edit

    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = smollm2_like()
    cpu_has(amx=True, avx512_bf16=True)
    db = edit(model, tok, FACTS[:2], layer=2, progress=False, n_prefixes=1, prefix_len=3, steps=2)
    assert db.config["compute_dtype"] == "bfloat16" and db.config["lr"] == 2.0
    db.config["lr"] = 1.5  # inherited by the append, unlike the compute dtype
    cpu_has(amx=False, avx512_bf16=False)
    edit(model, tok, FACTS[2:3], db=db, progress=False)
    assert db.config["compute_dtype"] == "float32" and db.config["lr"] == 1.5 and len(db) == 3


def test_a_database_recorded_before_a_field_existed_goes_on_as_it_was_edited(monkeypatch):
    from neuraldb.editing import defaults
    from neuraldb.editing.defaults import recorded

    assert recorded({}, {"steps", "extra_steps"}) == {}  # nothing recorded: nothing fixed
    assert recorded({"steps": 10}, {"steps", "extra_steps"}) == {"steps": 10, "extra_steps": 0}
    assert recorded({"steps": 10, "extra_steps": 5}, {"steps", "extra_steps"}) == {"steps": 10, "extra_steps": 5}
    model, tok = word_llama()
    facts = neuraldb.facts.parse(
        [{"subject": "Toko Yasuda", "prompt": "{} plays the", "target_new": "piano"}], format="neuraldb"
    )
    kw = {"layer": 2, "n_prefixes": 1, "prefix_len": 3, "steps": 2}
    db = neuraldb.edit(model, tok, facts, progress=False, **kw)
    for name in ("extra_steps", "warm_start", "warm_steps"):  # as a file written before these were fields
        del db.config[name]
    newer = replace(defaults.defaults_for(model), extra_steps=7, warm_start=True, warm_steps=1)
    monkeypatch.setattr(defaults, "defaults_for", lambda m: newer)
    neuraldb.edit(model, tok, facts, db=db, progress=False)
    assert db.config["extra_steps"] == 0 and db.config["steps"] == 2
    assert db.config["warm_start"] is False and db.config["warm_steps"] == 3
