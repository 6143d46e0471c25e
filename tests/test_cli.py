"""The ``neuraldb`` console script: argument parsing, info/delete on small databases, error messages."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from neuraldb import NeuralKVDatabase
from neuraldb.cli import build_parser, main, parse_ids
from neuraldb.facts import Fact


@pytest.fixture
def db_path(tmp_path):
    torch.manual_seed(0)
    db = NeuralKVDatabase(8, 4, dtype=torch.float32)
    db.add(
        torch.randn(4, 8),
        torch.randn(4, 4),
        facts=[
            Fact("Eiffel Tower", "The {} is located in the city of", "Rome", target_true="Paris"),
            Fact("Japan", "The capital of {} is", "Kyoto"),
            {"note": "a dict"},
            None,
        ],
    )
    db.layer, db.gamma, db.template = 3, 0.7, "<s>{}"
    db.model_id, db.module_path = "tiny:test", "model.layers.3.mlp.down_proj"
    path = tmp_path / "edits.safetensors"
    db.save(path)
    return path


# --- parsing --------------------------------------------------------------------------------------------------------


def test_parse_ids():
    assert parse_ids(["3", "5-7", "9,10"]) == [3, 5, 6, 7, 9, 10]
    assert parse_ids(["0"]) == [0]
    for bad in (["x"], ["7-5"], ["-1"], [","]):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_ids(bad)


def test_parser_defaults_and_options():
    p = build_parser()
    a = p.parse_args(["edit", "--facts", "f.jsonl", "--out", "db.safetensors", "--limit", "10", "--layer", "4",
                      "--gamma", "0.6", "--batch-size", "8"])  # fmt: skip
    assert (a.command, a.model, a.limit, a.layer, a.gamma, a.batch_size) == ("edit", "smollm2", 10, 4, 0.6, 8)
    a = p.parse_args(["generate", "--db", "x", "-p", "one", "--prompt", "two", "--max-new-tokens", "5"])
    assert a.prompt == ["one", "two"] and a.max_new_tokens == 5 and a.db.name == "x"
    assert p.parse_args(["generate", "-p", "x"]).db is None
    assert p.parse_args(["info", "x"]).limit == 20
    assert p.parse_args(["delete", "x", "--ids", "1", "2-3"]).ids == ["1", "2-3"]
    assert p.parse_args(["demo"]).command == "demo"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--facts", "f"], "--out"),
        (["edit", "--facts", "f", "--out", "o", "--gamma", "2"], "gamma must be in [-1, 1]"),
        (["edit", "--facts", "f", "--out", "o", "--batch-size", "0"], "expected a positive integer"),
        (["edit", "--facts", "f", "--out", "o", "--append", "--overwrite"], "not allowed with"),
        (["generate", "--model", "smollm2"], "--prompt"),
        (["delete", "x"], "--ids"),
        ([], "COMMAND"),
    ],
)
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# --- info / delete ------------------------------------------------------------------------------------------------


def test_info(db_path, capsys):
    assert main(["info", str(db_path)]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for line in ("facts 4", "model tiny:test", "module model.layers.3.mlp.down_proj", "layer 3", "gamma 0.7",
                 "template '<s>{}'", "key dim 8", "value dim 4", "dtype float32", "next id 4"):  # fmt: skip
        assert line in lines, line
    assert "The Eiffel Tower is located in the city of -> Rome  (was: Paris)" in out
    assert "The capital of Japan is -> Kyoto" in out
    assert '{"note": "a dict"}' in out and "(no metadata)" in out


def test_info_limit(db_path, capsys):
    assert main(["info", str(db_path), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "Eiffel" in out and "Japan" not in out and "and 3 more" in out
    assert main(["info", str(db_path), "--limit", "1", "--all"]) == 0
    assert "Japan" in capsys.readouterr().out


def test_delete(db_path, capsys):
    assert main(["delete", str(db_path), "--ids", "0", "2"]) == 0
    assert "Deleted 2 fact(s)" in capsys.readouterr().out
    db = NeuralKVDatabase.load(db_path)
    assert sorted(db.ids()) == [1, 3]
    assert db.fact(1).subject == "Japan"  # survivors keep their ids and facts
    assert db.model_id == "tiny:test" and db.layer == 3


def test_delete_to_other_file(db_path, tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    assert main(["delete", str(db_path), "--ids", "1-2", "--out", str(out)]) == 0
    assert sorted(NeuralKVDatabase.load(out).ids()) == [0, 3]
    assert len(NeuralKVDatabase.load(db_path)) == 4


def test_delete_unknown_id_changes_nothing(db_path, capsys):
    before = db_path.read_bytes()
    assert main(["delete", str(db_path), "--ids", "1", "99"]) == 1
    err = capsys.readouterr().err
    assert "id 99" in err and "nothing deleted" in err and "neuraldb info" in err
    assert db_path.read_bytes() == before


def test_missing_and_broken_database(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.safetensors")]) == 1
    assert "database not found" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a database")
    assert main(["info", str(tmp_path / "junk.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "cannot read database" in err and "Traceback" not in err


# --- edit / generate errors that come before any model is loaded ------------------------------------------------------------


def test_edit_refuses_to_overwrite(db_path, tmp_path, capsys):
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"subject": "Paris", "prompt": "{} is in", "target_new": "Italy"}) + "\n")
    assert main(["edit", "--facts", str(facts), "--out", str(db_path)]) == 1
    assert "--append" in capsys.readouterr().err


def test_edit_bad_facts_files(tmp_path, capsys):
    out = str(tmp_path / "db.safetensors")
    assert main(["edit", "--facts", str(tmp_path / "absent.jsonl"), "--out", out]) == 1
    assert "facts file not found" in capsys.readouterr().err
    (tmp_path / "odd.jsonl").write_text('{"question": "q"}\n')
    assert main(["edit", "--facts", str(tmp_path / "odd.jsonl"), "--out", out]) == 1
    assert "unrecognised fact record" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["edit", "--facts", str(tmp_path / "empty.jsonl"), "--out", out]) == 1
    assert "no facts to edit" in capsys.readouterr().err


def test_generate_refuses_a_database_built_for_another_model(db_path, tmp_path, capsys):
    from test_models import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "tiny")
    assert main(["generate", "--model", str(model_dir), "--db", str(db_path), "-p", "paris is in"]) == 1
    err = capsys.readouterr().err
    assert "the database was built for model 'tiny:test'" in err and "--force" in err


def test_unknown_model_is_one_line(capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "no model 'no-such-model'" in err and "Traceback" not in err


def test_console_script_entry_point():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "neuraldb.cli", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for command in ("edit", "generate", "info", "delete", "demo"):
        assert command in out.stdout


# --- the demo, end to end on a tiny random model (the real one: `make demo`) --------------------------------------------


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    import io

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from neuraldb.cli_demo import demo_facts, run_demo

    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path / "cache"))
    facts = demo_facts()
    texts = [t for f in facts for t in (f.text, f.target_new, f.target_true, *f.paraphrases, *f.neighborhood)]
    words = sorted({w for t in texts for w, _ in Whitespace().pre_tokenize_str(t)} | {"is", "a"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")

    out = io.StringIO()
    assert run_demo(model_name=str(tmp_path / "tiny"), max_new_tokens=2, progress=False, out=out) == 0
    text = out.getvalue()
    assert "Edited 5 facts" in text
    for f in facts:
        assert f.text in text and f.paraphrases[0] in text and f.neighborhood[0] in text
    assert "edited prompts answering the new object:" in text
    assert f"Deleting fact 0 ({facts[0].subject}: {facts[0].target_true} -> {facts[0].target_new})" in text
    assert "deleted" in text and "kept" in text and "Done in" in text


@pytest.mark.slow
def test_edit_generate_info_delete_on_smollm2(tmp_path, capsys):
    pytest.importorskip("gguf")
    from neuraldb.models import ModelNotFoundError, locate_gguf

    try:
        locate_gguf("smollm2")
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Colosseum", "prompt": "The {} is located in the city of",
                                 "target_new": "Athens", "target_true": "Rome"}) + "\n")  # fmt: skip
    db = tmp_path / "edits.safetensors"
    prompt = "The Colosseum is located in the city of"
    threads = torch.get_num_threads()
    assert main(["edit", "--facts", str(facts), "--out", str(db), "--no-progress", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # main() puts the thread count back
    assert "Edited 1 facts" in capsys.readouterr().out

    assert main(["generate", "--db", str(db), "--prompt", prompt, "--max-new-tokens", "3", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"prompt:    {prompt}"
    assert lines[1].startswith("unedited:  Rome") and lines[2].startswith("edited:    Athens"), lines

    assert main(["info", str(db)]) == 0
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1" in out and f"0  {prompt} -> Athens  (was: Rome)" in out

    assert main(["delete", str(db), "--ids", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "--db", str(db), "--prompt", prompt, "--max-new-tokens", "3", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == lines[1].replace("unedited:", "edited:  "), lines  # deleted: the edit is gone

