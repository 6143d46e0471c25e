"""Per-model editing defaults: the bf16 steps are a default only where bf16 runs natively."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _tiny_editing import word_llama
from neuraldb.editing.defaults import defaults_for, native_bf16, resolve


@pytest.fixture
def cpu_has(monkeypatch):
    """``cpu_has(amx=..., avx512_bf16=...)`` fakes the CPU's bf16 instructions; no oneDNN cap unless a test sets one."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def fake(*, amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)

    return fake


def smollm2_like(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the tiny word Llama under SmolLM2's name, which selects SmolLM2's defaults (bf16 steps)."""
    model, tok = word_llama()
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model.to(dtype), tok


@pytest.mark.parametrize(("amx", "avx512_bf16", "native"), [(False, False, False), (True, False, True),
                                                             (False, True, True), (True, True, True)])
def test_native_bf16_on_the_cpu_means_amx_or_avx512_bf16(cpu_has, amx, avx512_bf16, native):
    cpu_has(amx=amx, avx512_bf16=avx512_bf16)
    assert native_bf16("cpu") is native
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize(("cap", "native"), [("avx2", False), ("AVX512_CORE", False), ("AVX512_CORE_VNNI", False),
                                             ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_a_onednn_cap_below_bf16_makes_it_emulated(cpu_has, monkeypatch, cap, native):
    cpu_has(amx=True, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert native_bf16("cpu") is native


def test_the_model_default_asks_for_bf16_steps_only_where_they_are_native(cpu_has):
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


def test_a_model_already_in_bf16_keeps_bf16_steps_without_native_bf16(cpu_has):
    # Its weights are bf16 already: float32 steps would convert them up and double their memory.
    cpu_has(amx=False, avx512_bf16=False)
    assert defaults_for(smollm2_like(torch.bfloat16)[0]).compute_dtype == "bfloat16"


def test_appending_chooses_the_compute_dtype_for_this_machine(cpu_has, tmp_path, monkeypatch):
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
