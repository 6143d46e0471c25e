"""``neuraldb.calibration`` and ``neuraldb calibrate``: the fitted thresholds follow the documented rule, a fact's own
prompt keeps opening its row, bad input changes nothing, and the command saves (or, dry, does not)."""

from __future__ import annotations

import pytest
import torch
from _tiny_editing import FACTS, word_llama
from neuraldb import NeuralKVDatabase, templates
from neuraldb.calibration import (
    best_rows,
    calibrate,
    opens,
    read_corpus,
    sequence_negatives_of,
    text_openings,
    text_states,
)
from neuraldb.cli import main
from neuraldb.editing import compute_keys, model_access
from neuraldb.facts import Fact

LAYER = 1
# Ordinary text made of the facts' words: the subjects' last words come back out of their subjects' context.
TEXT = " ".join(
    [
        "The mother tongue of Darrieux is French . Hughes plays the guitar . Yasuda is in Paris .",
        "I visit the Tower of Rome . A5 was created by Apple . Because Hughes originates from London .",
    ]
    * 6
)


@pytest.fixture(scope="module")
def tiny():
    return word_llama()


def _db(model, tok, gamma=0.3, facts=FACTS):
    keys = compute_keys(model, tok, facts, LAYER, n_prefixes=0, template="<s>{}")
    db = NeuralKVDatabase(keys.shape[1], model.config.hidden_size, dtype=torch.float32)
    db.add(keys, torch.randn(len(facts), model.config.hidden_size), facts=facts)
    db.layer, db.gamma, db.template = LAYER, gamma, "<s>{}"
    return db


def test_thresholds_follow_the_rule_and_own_prompts_still_open(tiny):
    model, tok = tiny
    db = _db(model, tok)
    report = calibrate(model, tok, db, [TEXT], tokens=4096, delta=0.02, margin=0.1)
    pos, neg, t = report.positives, report.negatives, db.thresholds
    want = torch.minimum(neg + 0.02, pos - 0.1)
    raised = (neg > -1) & (want > db.gamma)
    assert report.raised == int(raised.sum()) > 0, "the text must give some row a negative above gamma"
    assert torch.allclose(t[raised], want[raised])
    assert (t[~raised] == -1).all()
    assert torch.equal(report.thresholds, t)
    # Every threshold is below its own prompt's cosine: the rows their own prompts retrieved, they still retrieve.
    assert report.own_after == report.own_before
    assert ((t < pos) | (t == -1)).all()
    # A calibration position still opening a row must be one the row could not be separated from.
    text = text_states(model, tok, LAYER, [TEXT], tokens=4096)
    score, row = best_rows(text, torch.nn.functional.normalize(db.keys.float(), dim=-1))
    still = opens(score, row, db.gamma, t)
    assert int(still.sum()) == report.text_open_after <= report.text_open_before
    conflict = neg + 0.02 > t
    assert conflict[row[still]].all()


def test_a_dry_run_changes_nothing_and_rows_without_a_fact_keep_their_threshold(tiny):
    model, tok = tiny
    db = _db(model, tok)
    [extra] = db.add(db.keys[:1].clone(), torch.zeros(1, db.value_dim), facts=[{"note": "no Fact"}])
    db.set_thresholds(extra, 0.5)
    before = db.thresholds
    report = calibrate(model, tok, db, [TEXT], tokens=4096, dry_run=True)
    assert torch.equal(db.thresholds, before)
    assert report.fitted == len(FACTS) and report.thresholds[-1].item() == 0.5
    calibrate(model, tok, db, [TEXT], tokens=4096)
    assert db.thresholds[-1].item() == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"texts": []}, ValueError, "texts: the calibration corpus"),
        ({"texts": ["   "]}, ValueError, "texts: the calibration corpus"),
        ({"texts": "a plain string"}, ValueError, "texts"),
        ({"delta": 1.5}, ValueError, r"delta must be a number in \[0, 1\]"),
        ({"margin": -0.1}, ValueError, r"margin must be a number in \[0, 1\]"),
        ({"skip": 10**6}, ValueError, "fewer than 2 tokens left"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(tiny, kwargs, error, match):
    model, tok = tiny
    db = _db(model, tok)
    args = {"texts": [TEXT], **kwargs}
    with pytest.raises(error, match=match):
        calibrate(model, tok, db, args.pop("texts"), **args)
    assert (db.thresholds == -1).all()


def test_a_database_without_a_layer_is_refused(tiny):
    model, tok = tiny
    db = _db(model, tok)
    db.layer = None
    with pytest.raises(ValueError, match="records no layer"):
        calibrate(model, tok, db, [TEXT])


def test_text_openings_with_and_without_thresholds(tiny):
    model, tok = tiny
    db = _db(model, tok)
    calibrate(model, tok, db, [TEXT], tokens=4096)
    res = text_openings(model, tok, db, [TEXT], tokens=4096)
    assert res["positions"] > 100 and res["rows"] == len(FACTS)
    assert res["open_pct"] <= res["open_without_thresholds_pct"]
    assert text_openings(model, tok, db, [TEXT], tokens=4096, rows=0)["open"] == 0


def test_sequence_negatives_shut_a_row_that_answers_inside_another_facts_question(tiny):
    # The extra row's key is read at "plays" after "I . Yasuda": close to the state at "plays" in "Toko Yasuda plays
    # the piano", a position of another fact's sequence that is not its subject (as a zsRE key read at a merged ")?"
    # resembles every question's "?"). Other facts' prompts are scored only at their subjects, so only the sequence
    # negatives see it.
    model, tok = tiny
    facts = [*FACTS, Fact("Yasuda plays", "I . {} the", "piano")]
    db = _db(model, tok, facts=facts)
    state = model_access.last_token_states(model, tok, ["Toko Yasuda plays"], LAYER, db.template)
    keys = torch.nn.functional.normalize(db.keys.float(), dim=-1)
    score, row = best_rows(state, keys)
    assert int(row[0]) == len(FACTS) and float(score[0]) > db.gamma, "the construction must open the extra row"

    before = calibrate(model, tok, db, None, word_negatives=False, sequence_negatives=False, dry_run=True)
    assert opens(score, row, db.gamma, before.thresholds).all()
    report = calibrate(model, tok, db, None, word_negatives=False)
    assert not opens(score, row, db.gamma, db.thresholds).any()
    assert db.thresholds[len(FACTS)] == pytest.approx(min(float(score[0]) + 0.05, 1.0 - 0.1), abs=1e-4)
    assert report.own_after == report.own_before == len(facts)


def test_sequence_negatives_skip_the_subject_and_the_facts_own_row(tiny):
    model, tok = tiny
    fact = FACTS[0]
    n = len(templates.encode(tok, "<s>{}", fact.text)) + len(templates.encode_target(tok, fact.target_new)) - 1
    own = compute_keys(model, tok, [fact], LAYER, n_prefixes=0, template="<s>{}")
    other = torch.nn.functional.normalize(torch.randn(1, own.shape[1]), dim=-1)
    # Only another row's key (the fact's own row, 1, is not among them): every position but the first token and the
    # subject's last is a negative.
    score, row = sequence_negatives_of(model, tok, LAYER, "<s>{}", [fact], [1], other)
    assert score.shape == row.shape == (n - 2,) and (row == 0).all()
    # Only the fact's own row: nothing is left.
    score, row = sequence_negatives_of(model, tok, LAYER, "<s>{}", [fact], [0], own)
    assert score.numel() == 0


def test_sequence_negatives_are_the_same_whatever_the_scoring_block(tiny, monkeypatch):
    from neuraldb import calibration

    model, tok = tiny
    keys = torch.nn.functional.normalize(compute_keys(model, tok, FACTS, LAYER, n_prefixes=0, template="<s>{}"), dim=-1)
    rows = list(range(len(FACTS)))
    # Owners of the kept positions must follow their sequences into a block shared with other facts.
    whole = sequence_negatives_of(model, tok, LAYER, "<s>{}", FACTS, rows, keys, batch_size=2)
    monkeypatch.setattr(calibration, "_SCORE_BLOCK", 1)
    apart = sequence_negatives_of(model, tok, LAYER, "<s>{}", FACTS, rows, keys, batch_size=2)
    assert whole[0].numel() > 0
    assert torch.equal(whole[1], apart[1]) and torch.allclose(whole[0], apart[0])
    per_fact = [sequence_negatives_of(model, tok, LAYER, "<s>{}", [f], [r], keys) for f, r in zip(FACTS, rows)]
    assert torch.equal(whole[1], torch.cat([p[1] for p in per_fact]))


def test_read_corpus(tmp_path):
    import gzip

    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"some text\n"))
    assert read_corpus(tmp_path / "a.txt.gz") == "some text\n"
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "empty.txt")


# ---- the command -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _edited(tiny_dir, tmp_path) -> tuple:
    from test_cli import JOB_FACTS, _facts_file

    facts = _facts_file(tmp_path / "facts.jsonl", JOB_FACTS)
    db = tmp_path / "db.safetensors"
    common = ["--model", str(tiny_dir), "--threads", "1"]
    assert main(["edit", *common, "--facts", str(facts), "--out", str(db), "--no-progress", "--gamma", "0.2"]) == 0
    text = tmp_path / "text.txt"
    text.write_text("the capital of france is paris . paris is in france . " * 40)
    return db, text, common


def test_the_command_saves_thresholds_and_a_dry_run_does_not(tiny_dir, tmp_path, capsys):
    db, text, common = _edited(tiny_dir, tmp_path)
    before = db.read_bytes()
    assert main(["calibrate", str(db), *common, "--text", str(text), "--dry-run", "--eval-text", str(text)]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out and "--eval-text:" in out
    assert db.read_bytes() == before
    out_db = tmp_path / "calibrated.safetensors"
    assert main(["calibrate", str(db), *common, "--text", str(text), "--out", str(out_db)]) == 0
    assert f"{out_db}: 6 facts" in capsys.readouterr().out
    assert db.read_bytes() == before
    assert NeuralKVDatabase.load(out_db).thresholds.shape == (6,)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--delta", "2"], 2, "expected a number in [0, 1]"),
        (["--text", "missing.txt"], 1, "No such file or directory"),
        (["--text", "EMPTY"], 1, "holds no text"),
        (["--relation-gate", "0.4", "--subject-gate", "0.3"], 1, "a row holds one of their keys"),
    ],
)
def test_command_errors_are_one_line(tiny_dir, tmp_path, extra, code, message, capsys):
    db, text, common = _edited(tiny_dir, tmp_path)
    (tmp_path / "EMPTY").write_text("")
    extra = [str(tmp_path / e) if e in ("missing.txt", "EMPTY") else e for e in extra]
    argv = ["calibrate", str(db), *common, "--text", str(text), *extra]
    before = db.read_bytes()
    capsys.readouterr()
    try:
        got = main(argv)
    except SystemExit as e:  # usage errors exit from the parser
        got = e.code
    assert got == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert db.read_bytes() == before


def test_the_command_turns_the_relation_gate_on(tiny_dir, tmp_path, capsys):
    db, text, common = _edited(tiny_dir, tmp_path)
    argv = ["calibrate", str(db), *common, "--text", str(text), "--relation-gate", "0.4", "--relation-window", "8"]
    assert main(argv) == 0
    assert "relation gate on (rho 0.4, window 8): 6 relation keys" in capsys.readouterr().out
    back = NeuralKVDatabase.load(db)
    assert back.relation_gate == {"rho": 0.4, "window": 8} and back.relation_keys.shape == (6, back.key_dim)


def test_the_command_turns_the_subject_gate_on(tiny_dir, tmp_path, capsys):
    db, text, common = _edited(tiny_dir, tmp_path)
    assert main(["calibrate", str(db), *common, "--text", str(text), "--subject-gate", "0.3"]) == 0
    assert "subject gate on (rho 0.3):" in capsys.readouterr().out
    back = NeuralKVDatabase.load(db)
    assert back.relation_gate == {"rho": 0.3, "window": 0, "offset": -1}


@pytest.mark.parametrize("flag", [[], ["--no-calibrate"]])
def test_edit_fits_thresholds_unless_told_not_to(tiny_dir, tmp_path, flag, capsys, monkeypatch):
    from neuraldb import calibration
    from test_cli import JOB_FACTS, _facts_file

    calls = []
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    facts = _facts_file(tmp_path / "facts.jsonl", JOB_FACTS)
    db = tmp_path / "db.safetensors"
    argv = ["edit", "--model", str(tiny_dir), "--threads", "1", "--facts", str(facts), "--out", str(db)]
    assert main([*argv, "--no-progress", *flag]) == 0
    assert calls == ([] if flag else [None])  # the database's own negatives, no text
    assert ("Fitting per-row gate thresholds" in capsys.readouterr().err) == (not flag)
