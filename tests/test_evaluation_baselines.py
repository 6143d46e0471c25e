"""neuraldb eval --method memit|alphaedit on a tiny model: the same metrics, the weights restored bitwise afterwards,
WikiText-2 perplexity kept on the half that C0 does not read (issue 25)."""

from __future__ import annotations

import gzip

import pytest

pytest.importorskip("tokenizers")

from _tiny_editing import EVAL_FACTS, FACTS, facts_jsonl, word_llama
from _tiny_models import assert_bitwise
from neuraldb.architectures import down_proj_module
from neuraldb.evaluation.pipeline import run_eval

EDIT = {"layer": 2, "gamma": 0.9, "n_prefixes": 1, "prefix_len": 3, "steps": 5}


def _general_dir(tmp_path):
    d = tmp_path / "general"
    d.mkdir()
    text = "\n".join(f.text + " " + f.target_true for f in FACTS * 8)
    with gzip.open(d / "wikitext2_raw_test.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    return d


def _baseline_run(tmp_path, model, tok, method: str, options: dict) -> dict:
    """``run_eval`` of ``method`` on four tiny facts, WikiText-2 only."""
    return run_eval(
        model_name="tiny",
        dataset="counterfact",
        facts_path=facts_jsonl(tmp_path / "facts.jsonl", EVAL_FACTS[:4]),
        n_facts=None,
        edit_kwargs=EDIT,
        general_dir=_general_dir(tmp_path),
        general_tasks=["wikitext2"],
        show_progress=False,
        model_and_tok=(model, tok),
        method=method,
        baseline_options=options,
    )


@pytest.mark.parametrize(
    ("method", "options"), [("memit", {"lam": 0.1}), ("alphaedit", {"threshold": 1e-6, "l2": 1e-3})]
)
def test_baseline_method_scores_and_restores_the_weights(tmp_path, monkeypatch, method, options):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = word_llama()
    before = down_proj_module(model, EDIT["layer"])[1].weight.detach().clone()
    run = _baseline_run(tmp_path, model, tok, method, options)
    assert_bitwise(down_proj_module(model, EDIT["layer"])[1].weight.detach(), before)
    assert run["method"] == method and run["gamma"] is None
    info = run["baseline"]
    assert info["method"] == method and info["layer"] == EDIT["layer"] and info["delta_norm"] > 0
    assert info["residual_fit"]["mean_cosine"] > 0.5
    assert any("first" in n and "second half estimates C0" in n for n in run["notes"])
    assert run["post"]["summary"]["efficacy"] is not None
    assert run["post"]["per_fact"] != run["pre"]["per_fact"]  # every prompt re-scored with the update in place
    g = run["general"]
    assert g["pre"]["tasks"]["wikitext2"]["n_tokens"] == g["post"]["tasks"]["wikitext2"]["n_tokens"]
    assert g["pre"]["tasks"]["wikitext2"]["token_ppl"] != g["post"]["tasks"]["wikitext2"]["token_ppl"]


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_baseline_spread_over_layers_scores_and_restores_every_layer(tmp_path, monkeypatch, method):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = word_llama()
    layers = [0, 1, EDIT["layer"]]
    before = {lay: down_proj_module(model, lay)[1].weight.detach().clone() for lay in layers}
    hp = {"lam": 0.1} if method == "memit" else {"threshold": 1e-6, "l2": 1e-3}
    run = _baseline_run(tmp_path, model, tok, method, {**hp, "layers": layers})
    for lay, w in before.items():
        assert_bitwise(down_proj_module(model, lay)[1].weight.detach(), w)
    info = run["baseline"]
    assert info["layers"] == layers and info["layer"] == EDIT["layer"] and "at each of layers" in info["formula"]
    assert set(info["delta_norms"]) == {str(lay) for lay in layers} and min(info["delta_norms"].values()) > 0
    assert info["target_fit"]["mean_cosine"] > 0.5
    assert run["post"]["per_fact"] != run["pre"]["per_fact"]


def test_baseline_method_refuses_deletion_and_unknown_options(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = word_llama()
    path = facts_jsonl(tmp_path / "facts.jsonl", EVAL_FACTS[:2])
    kw = {"model_name": "tiny", "dataset": "counterfact", "facts_path": path, "n_facts": None, "edit_kwargs": EDIT}
    with pytest.raises(ValueError, match="deletion"):
        run_eval(**kw, deletion=True, method="memit", show_progress=False, model_and_tok=(model, tok))
    with pytest.raises(ValueError, match="unknown baseline option"):
        run_eval(**kw, method="memit", baseline_options={"lambda": 1}, show_progress=False, model_and_tok=(model, tok))
    refused = {
        "layers must end at the database layer": {"layers": [0, 1]},
        "for one layer": {"layers": [1, 2], "sequential": 2},
    }
    for match, bad in refused.items():
        with pytest.raises(ValueError, match=match):
            run_eval(**kw, method="memit", baseline_options=bad, show_progress=False, model_and_tok=(model, tok))
