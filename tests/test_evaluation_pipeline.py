"""run_eval's post-edit and deleted-state CounterFact scores (gate-skip re-scoring) equal a full evaluation."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _tiny_editing import EVAL_FACTS, facts_jsonl, word_llama
from neuraldb import patch_model, templates, unpatch_model
from neuraldb.database import NeuralKVDatabase
from neuraldb.evaluation.counterfact import evaluate_counterfact
from neuraldb.evaluation.deletion import half_summary
from neuraldb.evaluation.pipeline import run_eval


def test_run_eval_gate_skip_equals_full_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = word_llama()
    facts = EVAL_FACTS[:4]
    path = facts_jsonl(tmp_path / "facts.jsonl", facts)
    run = run_eval(
        model_name="tiny",
        dataset="counterfact",
        facts_path=path,
        n_facts=None,
        save_db=tmp_path / "db",
        edit_kwargs={"layer": 2, "gamma": 0.9, "n_prefixes": 1, "prefix_len": 3, "steps": 5},
        fluency=False,
        deletion=True,
        show_progress=False,
        model_and_tok=(model, tok),
    )
    unpatch_model(model)
    done, total = run["rescored_prompts"]["post"]
    assert 0 < done < total  # both the copied and the re-scored paths ran
    assert run["thresholds"] == "calibrated" and "of 4 rows got a threshold" in run["calibration"]

    db = NeuralKVDatabase.load(tmp_path / "db")  # saved as evaluated: with the thresholds `neuraldb edit` fits
    pf = lambda s: templates.apply(db.template, s)
    patch_model(model, db)
    try:
        full = evaluate_counterfact(model, tok, facts, prompt_fn=pf, show_progress=False)
        db.delete(db.ids()[0::2])
        deleted = evaluate_counterfact(model, tok, facts, prompt_fn=pf, show_progress=False)
    finally:
        unpatch_model(model)
    for k in ("efficacy", "generalization", "specificity"):
        assert run["post"]["summary"][k] == full["summary"][k]
    for a, b in zip(run["post"]["per_fact"], full["per_fact"]):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            for x, y in zip(a[kind], b[kind]):
                assert x["nll_new"] == pytest.approx(y["nll_new"], abs=1e-5)
    for half, idx in (("odd", [1, 3]), ("even", [0, 2])):
        assert run["deletion"]["halves"][half]["deleted_even"] == half_summary(deleted, idx, "counterfact")


def test_run_eval_on_a_seeded_subset_edits_all_and_scores_the_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = word_llama()
    facts = EVAL_FACTS[:4]
    path = facts_jsonl(tmp_path / "facts.jsonl", facts)
    run = run_eval(
        model_name="tiny",
        dataset="counterfact",
        facts_path=path,
        n_facts=None,
        eval_facts=2,
        seed=3,
        save_db=tmp_path / "db",
        edit_kwargs={"layer": 2, "gamma": 0.9, "n_prefixes": 1, "prefix_len": 3, "steps": 5},
        fluency=False,
        deletion=True,
        show_progress=False,
        model_and_tok=(model, tok),
        calibrate=False,
    )
    unpatch_model(model)
    assert run["thresholds"] is None and run["calibration"] is None
    assert bool((NeuralKVDatabase.load(tmp_path / "db").thresholds == -1).all())  # as edited
    idx = run["evaluated_indices"]
    assert len(idx) == 2 and idx == sorted(set(idx)) and run["n_evaluated"] == 2 and run["n_facts"] == 4
    assert any("subset of 2" in n for n in run["notes"])

    db = NeuralKVDatabase.load(tmp_path / "db")
    assert len(db) == 4
    pf = lambda s: templates.apply(db.template, s)
    patch_model(model, db)
    try:
        full = evaluate_counterfact(model, tok, [facts[i] for i in idx], prompt_fn=pf, show_progress=False)
    finally:
        unpatch_model(model)
    assert len(run["post"]["per_fact"]) == 2
    for a, b in zip(run["post"]["per_fact"], full["per_fact"]):
        for x, y in zip(a["rewrite"], b["rewrite"]):
            assert x["nll_new"] == pytest.approx(y["nll_new"], abs=1e-5)
    halves = run["deletion"]["halves"]
    assert halves["even"]["post"]["n_facts"] == sum(i % 2 == 0 for i in idx)
    assert halves["odd"]["post"]["n_facts"] == sum(i % 2 == 1 for i in idx)
