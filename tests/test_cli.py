"""The ``neuraldb`` console script: argument parsing, info/delete on small databases, error messages."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from neuraldb import NeuralKVDatabase, cli
from neuraldb.cli import build_parser, main, parse_id_ranges, parse_ids
from neuraldb.facts import Fact

FACT = {"subject": "paris", "prompt": "{} is in", "target_new": "france"}


def one_error_line(err: str) -> str:
    """stderr's one line, once progress lines (model load, editing) are set aside; fails on a traceback or more."""
    assert "Traceback" not in err, err
    noise = ("Loading model ", "Loaded in ", "Loading weights", "Editing ")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(noise)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("neuraldb"), lines
    return lines[0]


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
    assert parse_id_ranges(["0-1000000000000000000"]) == [range(10**18 + 1)]  # never expanded
    for bad in (["x"], ["7-5"], ["-1"], [","], ["9" * 5000]):
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
        (["bogus"], "invalid choice"),
        (["edit", "--facts", "f", "--out", "o", "--layer", "-1"], "--layer: expected a non-negative integer"),
        (["edit", "--facts", "f", "--out", "o", "--limit", "-5"], "--limit: expected a non-negative integer"),
        (["info", "x", "--limit", "-5"], "--limit: expected a non-negative integer"),
        (["generate", "--dtype", "float99", "-p", "x"], "--dtype: invalid choice: 'float99'"),
        (["generate", "--device", "nonsense", "-p", "x"], "--device: not a torch device"),
        (["generate", "-p", "caf\udce9"], "--prompt/-p: not valid UTF-8 text"),  # a Latin-1 byte in argv
        (["eval", "--dataset", "zsre", "--facts", "f", "--out", "o", "--n", "-5"], "--n: expected a positive"),
        (["eval", "--dataset", "zsre", "--facts", "f", "--out", "o", "--threads", "0"], "--threads: expected a"),
        (["eval", "--dataset", "zsre", "--facts", "f", "--out", "o", "--edit-args", "{bad"], "--edit-args: not JSON"),
        (["eval", "--dataset", "zsre", "--facts", "f", "--out", "o", "--edit-args", "[6]"], "a JSON object"),
        (["demo", "--max-new-tokens", "0"], "expected a positive integer"),
    ],
)
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in one_error_line(capsys.readouterr().err)


# --- info / delete ------------------------------------------------------------------------------------------------


def test_info(db_path, capsys):
    assert main(["info", str(db_path)]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for line in ("facts 4", "model tiny:test", "module model.layers.3.mlp.down_proj", "layer 3", "gamma 0.7",
                 "template '<s>{}'", "key/value dim 8/4", "dtype float32", "next id 4",
                 "own thresholds 0 rows (`neuraldb calibrate` fits them)"):  # fmt: skip
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


def test_missing_and_broken_database(db_path, tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.safetensors")]) == 1
    assert "database not found" in one_error_line(capsys.readouterr().err)
    (tmp_path / "junk.safetensors").write_bytes(b"not a database")
    (tmp_path / "facts.jsonl").write_text(json.dumps(FACT) + "\n")
    (tmp_path / "cut.safetensors").write_bytes(db_path.read_bytes()[: db_path.stat().st_size // 2])
    for bad in ("junk.safetensors", "facts.jsonl", "cut.safetensors", "."):
        assert main(["info", str(tmp_path / bad)]) == 1
        assert "cannot read database" in one_error_line(capsys.readouterr().err)
    # generate reads the database before it loads a model: the error is the database's, not the model's
    assert main(["generate", "--model", "no-such-model", "--db", str(tmp_path / "cut.safetensors"), "-p", "x"]) == 1
    assert "cannot read database" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("out", ["dir", "/proc/x.safetensors", "missing/x.safetensors"])
def test_delete_refuses_an_output_it_cannot_write(db_path, tmp_path, out, capsys):
    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "dir").mkdir()
    out = out if out.startswith("/") else str(tmp_path / out)
    before = db_path.read_bytes()
    assert main(["delete", str(db_path), "--ids", "0", "--out", out]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert any(w in line for w in ("is a directory", "cannot write", "does not exist")), line
    assert db_path.read_bytes() == before


@pytest.mark.parametrize("ids", ["0-1000000000", "2-1000000000000000000"])
def test_delete_a_huge_range_is_not_expanded(db_path, ids, capsys):
    before = db_path.read_bytes()
    assert main(["delete", str(db_path), "--ids", ids]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "id 4, 5, 6, 7, 8, 9, 10, 11, 12, 13 ..." in line and "nothing deleted" in line
    assert db_path.read_bytes() == before
    assert main(["delete", str(db_path), "--ids", "1-3", "0-3"]) == 0  # overlapping ranges: each id once
    assert len(NeuralKVDatabase.load(db_path)) == 0


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


@pytest.mark.parametrize(
    "out, flags, message",
    [
        ("/proc/edits.safetensors", [], "cannot write /proc/edits.safetensors"),
        ("dir", [], "is a directory"),
        ("dir", ["--overwrite"], "is a directory"),
        ("dir", ["--append"], "is a directory"),
        ("/dev/null", ["--overwrite"], "not a regular file"),
        ("file/edits.safetensors", [], "cannot"),  # a file where the directory should be
    ],
)
def test_edit_checks_its_output_before_any_work(tmp_path, out, flags, message, capsys):
    if out.startswith("/") and not Path(out).parent.is_dir():
        pytest.skip(f"no {Path(out).parent} here")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    out = out if out.startswith("/") else str(tmp_path / out)
    # The facts file is missing and the model unknown: an error about either would mean the output came later.
    argv = ["edit", "--model", "no-such-model", "--facts", str(tmp_path / "absent.jsonl"), "--out", out, *flags]
    assert main(argv) == 1
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["latin-1", "latin-1 gzip", "cut gzip", "deep"])
def test_edit_unreadable_facts_files_are_one_line(tmp_path, kind, capsys):
    line = (json.dumps(FACT) + "\n").encode()
    data = {
        "latin-1": line + '{"subject": "caf\xe9"}\n'.encode("latin-1"),
        "latin-1 gzip": gzip.compress(line + '{"subject": "caf\xe9"}\n'.encode("latin-1")),
        "cut gzip": gzip.compress(line * 100)[:-12],
        "deep": line + b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    }[kind]
    (tmp_path / "facts.jsonl").write_bytes(data)
    argv = ["edit", "--model", "no-such-model", "--facts", str(tmp_path / "facts.jsonl"), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    expected = "not a readable gzip file" if kind == "cut gzip" else "line 2: "
    assert f"facts.jsonl: {expected}" in one_error_line(capsys.readouterr().err)


def test_eval_checks_its_inputs_before_the_model_loads(tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACT) + "\n")
    base = ["eval", "--model", "no-such-model", "--dataset", "counterfact"]
    for argv, message in [
        ([*base, "--facts", str(tmp_path), "--out", str(tmp_path / "o")], "is a directory"),
        ([*base, "--facts", str(facts), "--db", str(tmp_path / "absent"), "--out", str(tmp_path / "o")], "no such"),
        ([*base, "--facts", str(facts), "--out", str(facts)], "cannot create the directory"),
        (["eval", "--combine", str(tmp_path / "absent.json"), "--out", str(tmp_path / "o")], "cannot read"),
        (["eval", "--combine", str(facts), str(tmp_path / "facts.jsonl"), "--out", str(tmp_path / "o")], None),
    ]:
        if message is None:  # not an evaluation run: skipped with a note, no traceback
            assert main(argv) == 0
            assert "Traceback" not in capsys.readouterr().err
            continue
        assert main(argv) == 1
        assert message in one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")  # down_proj maps 32 -> 16 at 2 layers


def _db(path: Path, key_dim: int = 32, value_dim: int = 16, layer: int = 1, module: str | None = None) -> Path:
    db = NeuralKVDatabase(key_dim, value_dim, dtype=torch.float32)
    db.add(torch.nn.functional.normalize(torch.randn(2, key_dim), dim=1), torch.randn(2, value_dim))
    db.layer, db.module_path = layer, module
    db.save(path)
    return path


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"key_dim": 8, "value_dim": 4}, "db has key_dim=8, value_dim=4"),
        ({"layer": 99}, "layer must be in [0, 2)"),
        ({"module": "model.layers.7.nope"}, "module 'model.layers.7.nope' does not exist"),
    ],
)
def test_generate_checks_the_database_against_the_model_before_answering(tiny_dir, tmp_path, shape, message, capsys):
    db = _db(tmp_path / "db.safetensors", **shape)
    assert main(["generate", "--model", str(tiny_dir), "--db", str(db), "-p", "paris is", "--max-new-tokens", "1"]) == 1
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err)
    assert "unedited" not in captured.out  # nothing was generated


def test_edit_append_checks_the_database_against_the_model_before_editing(tiny_dir, tmp_path, capsys):
    db = _db(tmp_path / "db.safetensors", key_dim=8, value_dim=4)
    before = db.read_bytes()
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACT) + "\n")
    argv = ["edit", "--model", str(tiny_dir), "--facts", str(facts), "--out", str(db), "--append", "--no-progress"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "db has key_dim=8, value_dim=4" in one_error_line(captured.err) and "Editing" not in captured.err
    assert db.read_bytes() == before


def test_edit_layer_out_of_range_is_one_line(tiny_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACT) + "\n")
    argv = ["edit", "--model", str(tiny_dir), "--facts", str(facts), "--out", str(tmp_path / "o"), "--layer", "99"]
    assert main(argv) == 1
    assert "layer must be in [0, 2)" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_interrupt_and_unexpected_errors_are_one_line(db_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    def broken(args):
        raise RuntimeError("an internal\nbug")

    monkeypatch.setitem(cli.COMMANDS, "info", interrupted)
    assert main(["info", str(db_path)]) == 130
    assert one_error_line(capsys.readouterr().err) == "neuraldb info: interrupted"
    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    assert main(["info", str(db_path)]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "neuraldb info: error: unexpected RuntimeError: an internal bug (--debug shows the traceback)"
    )
    # --debug (before or after the command) and $NEURALDB_DEBUG let the exception through, traceback and all
    for argv in (["--debug", "info", str(db_path)], ["info", str(db_path), "--debug"]):
        with pytest.raises(RuntimeError, match="an internal"):
            main(argv)
    monkeypatch.setenv("NEURALDB_DEBUG", "1")
    with pytest.raises(RuntimeError, match="an internal"):
        main(["info", str(db_path)])


def test_warnings_are_one_line(tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(FACT) + "\n" + json.dumps(dict(FACT, target_new=" ")) + "\n")
    assert main(["edit", "--model", "no-such-model", "--facts", str(facts), "--out", str(tmp_path / "o")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("Loading model")]
    assert len(lines) == 2 and lines[0].startswith("neuraldb edit: warning: skipped 1 record(s)"), lines
    assert lines[1].startswith("neuraldb edit: error: no model 'no-such-model'"), lines


def test_generate_refuses_a_database_built_for_another_model(db_path, tmp_path, capsys):
    from test_models import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "tiny")
    assert main(["generate", "--model", str(model_dir), "--db", str(db_path), "-p", "paris is in"]) == 1
    err = capsys.readouterr().err
    # refused from the model's config, before its weights load (model identity itself: test_model_identity.py)
    assert "the database was built at layer 3, but" in err and "has 2 (layer must be in [0, 2))" in err


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

    from neuraldb.cli_demo import demo_facts, run_demo
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

    # The edit fires in chat too: the question as a user turn of SmolLM2's chat template
    chat = ["generate", "--db", str(db), "--chat", "--prompt", "Where is the Colosseum?", "--max-new-tokens", "16"]
    assert main([*chat, "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Rome" in lines[1] and "Athens" not in lines[1] and "Athens" in lines[2], lines

    assert main(["info", str(db)]) == 0
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1" in out and f"0  {prompt} -> Athens  (was: Rome)" in out

    assert main(["delete", str(db), "--ids", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "--db", str(db), "--prompt", prompt, "--max-new-tokens", "3", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == lines[1].replace("unedited:", "edited:  "), lines  # deleted: the edit is gone


# --- checkpointed jobs: --checkpoint-every/--resume/--slice and merge (the library side: test_edit_resume.py) -----------

JOB_FACTS = [
    {"subject": s, "prompt": p, "target_new": t}
    for s, p in (("paris", "{} is in"), ("the capital", "{} of france is"), ("france", "the capital of {} is"))
    for t in ("paris", "in")
]


def _facts_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_edit_resume_and_merge_on_the_command_line(tiny_dir, tmp_path, capsys):
    facts = _facts_file(tmp_path / "facts.jsonl", JOB_FACTS)
    common = ["--model", str(tiny_dir), "--facts", str(facts), "--checkpoint-every", "2", "--threads", "1"]
    full, a, b = (tmp_path / f"{n}.safetensors" for n in ("full", "a", "b"))
    assert main(["edit", *common, "--out", str(full), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{full}: facts 0..1 saved" in err and f"{full}: facts 0..5 saved" in err  # one line per checkpoint
    assert main(["edit", *common, "--out", str(b), "--slice", "2:", "--no-progress"]) == 0
    assert main(["edit", *common, "--out", str(a), "--slice", ":2", "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{b}: facts 2..5 (4) of 6" in out and f"{a}: facts 0..1 (2) of 6" in out
    assert main(["edit", *common, "--out", str(a), "--slice", ":2", "--resume", "--no-progress"]) == 0
    assert "Edited 0 facts; resumed at fact 2" in capsys.readouterr().out  # a finished job: nothing redone

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(b), str(a), "--out", str(merged)]) == 0
    assert f"{merged}: 6 facts" in capsys.readouterr().out
    m, f = NeuralKVDatabase.load(merged), NeuralKVDatabase.load(full)
    assert m.ids() == f.ids() == list(range(6))
    assert torch.equal(m.keys, f.keys) and torch.equal(m.values, f.values)


def test_edit_resume_refusals_are_one_line_before_the_model_loads(tiny_dir, tmp_path, capsys):
    facts = _facts_file(tmp_path / "facts.jsonl", JOB_FACTS)
    other = _facts_file(tmp_path / "other.jsonl", JOB_FACTS[::-1])
    db = tmp_path / "job.safetensors"
    base = ["edit", "--model", str(tiny_dir), "--out", str(db), "--checkpoint-every", "2", "--no-progress"]
    assert main([*base, "--facts", str(facts), "--slice", "0:4", "--threads", "1"]) == 0
    capsys.readouterr()
    before = db.read_bytes()
    refused = [
        (["--facts", str(other), "--slice", "0:4", "--resume"], "was edited from other facts (6 facts, sha256"),
        (["--facts", str(facts), "--slice", "0:4", "--resume", "--limit", "5"], "was edited from other facts"),
        (["--facts", str(facts), "--slice", "0:4", "--resume", "--layer", "0"], "was edited with layer=1 (asked: 0)"),
        (["--facts", str(facts), "--slice", "0:6", "--resume"], "holds the job for slice 0:4, not 0:6"),
        (["--facts", str(facts), "--slice", "0:4"], "exists: pass --append to add to it, --overwrite"),
        (["--facts", str(facts), "--slice", "4:9", "--resume"], "--slice 4:9 is outside the 6 facts of"),
        (["--facts", str(facts), "--slice", "0:4", "--append"], "--append cannot be combined with --checkpoint-every"),
    ]
    for extra, message in refused:
        assert main([*base, *extra]) == 1, extra
        err = capsys.readouterr().err
        assert message in one_error_line(err) and "Loading model" not in err, (extra, err)
    assert db.read_bytes() == before
    with pytest.raises(SystemExit) as e:
        main([*base, "--facts", str(facts), "--slice", "3:2"])
    assert e.value.code == 2 and "invalid slice '3:2'" in one_error_line(capsys.readouterr().err)


def test_merge_refusals_are_one_line(tiny_dir, tmp_path, capsys):
    facts = _facts_file(tmp_path / "facts.jsonl", JOB_FACTS)
    paths = {}
    for part in ("0:2", "1:3", "4:"):
        paths[part] = tmp_path / f"{part.replace(':', '_')}.safetensors"
        argv = ["edit", "--model", str(tiny_dir), "--facts", str(facts), "--out", str(paths[part]), "--slice", part]
        assert main([*argv, "--checkpoint-every", "2", "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    plain = _db(tmp_path / "plain.safetensors")
    out = tmp_path / "m.safetensors"
    refused = [
        ([paths["0:2"], paths["1:3"]], "(facts 0:2) and", "overlap"),
        ([paths["0:2"], paths["4:"]], "facts 2:4 are in none of the databases", "--allow-gaps"),
        ([paths["0:2"], plain], "plain.safetensors was not written by a checkpointed edit", ""),
        ([paths["0:2"], tmp_path / "missing.safetensors"], "database not found", ""),
    ]
    for dbs, message, also in refused:
        assert main(["merge", *map(str, dbs), "--out", str(out)]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert message in line and also in line, line
    assert not out.exists()
    assert main(["merge", str(paths["4:"]), str(paths["0:2"]), "--out", str(out), "--allow-gaps"]) == 0
    assert NeuralKVDatabase.load(out).ids() == [0, 1, 4, 5]
    assert main(["merge", str(paths["0:2"]), "--out", str(out)]) == 1
    assert "exists: pass --overwrite" in one_error_line(capsys.readouterr().err)


def test_the_command_imports_no_torch_before_its_error_handler_runs():
    # torch and transformers load inside main()'s handler, so Ctrl-C or an error while they load is one line too;
    # before, `import neuraldb` loaded them and a Ctrl-C in the command's first second printed a traceback.
    code = "import sys, neuraldb, neuraldb.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


@pytest.mark.parametrize("flag", [[], ["--no-warm-start"]])
def test_edit_no_warm_start(tiny_dir, tmp_path, flag, monkeypatch, capsys):
    from dataclasses import replace

    from neuraldb.editing import defaults

    real = defaults.defaults_for
    monkeypatch.setattr(defaults, "defaults_for", lambda m: replace(real(m), warm_start=True))  # as SmolLM2's
    facts = _facts_file(tmp_path / "facts.jsonl", JOB_FACTS[:2])
    for mode in ([], ["--checkpoint-every", "2"]):
        out = tmp_path / f"db{len(mode)}.safetensors"
        argv = ["edit", "--model", str(tiny_dir), "--facts", str(facts), "--out", str(out), "--no-progress"]
        assert main([*argv, "--threads", "1", "--no-calibrate", *mode, *flag]) == 0
        assert NeuralKVDatabase.load(out).config["warm_start"] is (not flag)
    capsys.readouterr()
