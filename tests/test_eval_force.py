"""``neuraldb eval --db`` checks the database against the model as ``neuraldb generate`` does (issue 29): a database
made for other weights is one line naming ``--force``; ``--force`` evaluates anyway, with a warning."""

from __future__ import annotations

import json

import neuraldb
import pytest

pytest.importorskip("transformers")

from test_model_identity import edited_dirs, tuned_copy  # noqa: F401  (the fixture: a tiny model, its weights elsewhere, a db)


@pytest.fixture
def other_weights(edited_dirs, tmp_path):  # noqa: F811
    base, _, db = edited_dirs
    tuned_copy(base, tmp_path / "tuned")
    saved = neuraldb.NeuralKVDatabase.load(db)
    saved.gamma = 0.7  # a database as edit() saves one: with its gate threshold
    saved.save(db)
    facts = tmp_path / "facts.jsonl"
    fact = {"subject": "paris", "prompt": "{} is", "target_new": "rome", "target_true": "paris"}
    facts.write_text(json.dumps(fact) + "\n", encoding="utf-8")
    return tmp_path / "tuned", db, facts


def _eval(model, db, facts, out, *extra):
    from neuraldb.cli import main

    return main([
        "eval", "--model", str(model), "--db", str(db), "--dataset", "counterfact", "--facts", str(facts),
        "--n", "1", "--no-progress", "--out", str(out), *extra,
    ])  # fmt: skip


def test_eval_refuses_other_weights_in_one_line_unless_forced(other_weights, tmp_path, capsys):
    model, db, facts = other_weights
    capsys.readouterr()
    assert _eval(model, db, facts, tmp_path / "refused") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("neuraldb eval:")]
    err = [line for line in err if "report.png" not in line]
    assert len(err) == 1 and "error: the database's edits were made for" in err[0], err
    assert "other weights (the fingerprints differ)" in err[0] and "--force" in err[0], err
    assert not (tmp_path / "refused" / "results.json").exists()
    assert _eval(model, db, facts, tmp_path / "forced", "--force") == 0
    assert "the database's edits were made for" in capsys.readouterr().err
    assert json.loads((tmp_path / "forced" / "results.json").read_text(encoding="utf-8"))["n_facts"] == 1


def test_force_without_db_is_an_error(other_weights, tmp_path, capsys):
    from neuraldb.cli import main

    model, _, facts = other_weights
    argv = ["eval", "--model", str(model), "--dataset", "counterfact", "--facts", str(facts), "--out", str(tmp_path)]
    assert main([*argv, "--force"]) == 1
    assert "--force applies to --db" in capsys.readouterr().err
