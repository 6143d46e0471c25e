"""General ability through lm-evaluation-harness (neuraldb.evaluation.general_lm_eval) against the builtin scorer
(neuraldb.evaluation.general), on a tiny random Llama with a character tokenizer and tiny local task files: where the
definitions are the same, the numbers are the same; the CLI's lm-eval-missing error is one line."""

from __future__ import annotations

import gzip
import json
import math
import string

import pytest
import torch
from _tiny_models import CONFIGS


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _char_model():
    """A tiny random Llama (tests/_tiny_models.py, longer positions) and a tokenizer with one token per character."""
    import tokenizers
    import transformers

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", "<pad>", *string.printable])}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = tokenizers.decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = CONFIGS["llama"]()
    cfg.max_position_embeddings = 1024
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), tok


def _write(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def _data(tmp_path):
    d = tmp_path / "general_eval"
    d.mkdir()
    words = ["red", "blue", "a cat", "the sun", "water", "stone", "up", "rain"]
    _write(
        d / "arc_easy.jsonl.gz",
        [{"query": f"Question: What is {i}?", "choices": words[i % 3 : i % 3 + 4], "gold": i % 4} for i in range(7)],
    )
    _write(
        d / "piqa.jsonl.gz",
        [{"query": f"Question: How to do {i}?\n", "choices": words[i : i + 2], "gold": i % 2} for i in range(6)],
    )
    _write(
        d / "commonsense_qa.jsonl.gz",
        [
            {
                "query": f"Question: Pick {i}.\nChoices:\nA. x\nB. y\nC. z\nD. w\nAnswer:",
                "choices": list("ABCD"),
                "gold": i % 4,
            }
            for i in range(5)
        ],
    )
    _write(
        d / "winograd_wsc273.jsonl.gz",
        [
            {
                "context_options": [f"Tom met {w} so Tom", f"Tom met {w} so {w}"],
                "continuation": "ran away.",
                "gold": i % 2,
            }
            for i, w in enumerate(words[:5])
        ],
    )
    _write(
        d / "mmlu_test.jsonl.gz",
        [
            {"subject": "high_school_physics", "question": f"What is {w}?", "choices": words[:4], "answer": i % 4}
            for i, w in enumerate(words[:5])
        ],
    )
    _write(d / "lambada_openai.jsonl.gz", [{"context": f"I saw {w} and then", "continuation": "it"} for w in words[:5]])
    lines = [
        " = Cats = ",
        " The cat sat on the mat . ",
        " = = Life = = ",
        " It ran @-@ fast . ",
        " = Dogs = ",
        " A dog .",
    ]
    with gzip.open(d / "wikitext2_raw_test.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return d


MC = ["arc_easy", "piqa", "commonsense_qa", "wsc273", "mmlu", "lambada_openai"]


def test_lm_eval_equals_builtin_where_the_definitions_agree(tmp_path):
    pytest.importorskip("lm_eval")
    from neuraldb.evaluation.general import evaluate_general
    from neuraldb.evaluation.general_lm_eval import evaluate_general_lm_eval

    model, tok = _char_model()
    d = _data(tmp_path)
    kw = {"tasks": MC, "limit": 5, "seed": 0, "batch_size": 4, "show_progress": False}
    ours = evaluate_general(model, tok, d, **kw)
    theirs = evaluate_general_lm_eval(model, tok, d, **kw)
    assert theirs["backend"].startswith("lm-eval ")
    assert list(theirs["tasks"]) == MC
    for task in MC:
        a, b = ours["tasks"][task], theirs["tasks"][task]
        assert b["n"] == a["n"] == 5, task
        assert b["primary"] == a["primary"] and b["value"] == pytest.approx(a["value"]), task
        assert b["acc"] == pytest.approx(a["acc"]), task
        if task not in ("wsc273", "lambada_openai"):  # lm-eval's wsc273 has no acc_norm; lambada has none
            assert b["acc_norm"] == pytest.approx(a["acc_norm"]), task
    assert theirs["tasks"]["lambada_openai"]["ppl"] == pytest.approx(ours["tasks"]["lambada_openai"]["ppl"], rel=1e-4)
    assert theirs["average"] == pytest.approx(ours["average"])


def test_lm_eval_same_subsample_and_a_prompt_template(tmp_path):
    pytest.importorskip("lm_eval")
    from neuraldb.evaluation.general import evaluate_general
    from neuraldb.evaluation.general_lm_eval import evaluate_general_lm_eval

    model, tok = _char_model()
    d = _data(tmp_path)
    kw = {
        "tasks": ["arc_easy"],
        "limit": 3,
        "seed": 1,
        "batch_size": 2,
        "show_progress": False,
        "prompt_fn": lambda s: "Q> " + s,
    }
    a, b = evaluate_general(model, tok, d, **kw)["tasks"]["arc_easy"], evaluate_general_lm_eval(model, tok, d, **kw)
    assert b["tasks"]["arc_easy"]["n"] == a["n"] == 3
    assert (b["tasks"]["arc_easy"]["acc"], b["tasks"]["arc_easy"]["acc_norm"]) == pytest.approx(
        (a["acc"], a["acc_norm"])
    )


def test_lm_eval_wikitext_documents_and_perplexities(tmp_path):
    pytest.importorskip("lm_eval")
    from neuraldb.evaluation.general_lm_eval import evaluate_general_lm_eval

    model, tok = _char_model()
    r = evaluate_general_lm_eval(model, tok, _data(tmp_path), tasks=["wikitext2"], show_progress=False)
    w = r["tasks"]["wikitext2"]
    assert w["n_docs"] == 2 and w["primary"] == "token_ppl" and w["value"] == w["token_ppl"]
    # a random model over ~100 characters: perplexities near the vocabulary size, all from one log-likelihood
    assert 10 < w["token_ppl"] < 1000 and w["bits_per_byte"] == pytest.approx(math.log2(w["byte_ppl"]))
    assert r["average"] is None


def test_missing_files_are_notes(tmp_path):
    pytest.importorskip("lm_eval")
    from neuraldb.evaluation.general_lm_eval import evaluate_general_lm_eval

    model, tok = _char_model()
    r = evaluate_general_lm_eval(model, tok, tmp_path, tasks=["piqa"], show_progress=False)
    assert r["tasks"] == {} and "piqa: skipped" in r["notes"][0]


def test_cli_lm_eval_requested_but_missing_is_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from neuraldb.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    facts = tmp_path / "facts.json"
    facts.write_text("[]")
    argv = ["eval", "--dataset", "counterfact", "--facts", str(facts), "--out", str(tmp_path / "out")]
    argv += ["--general-data", str(tmp_path), "--general-backend", "lm-eval"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'lm-eval==0.4.13'" in err, err


def test_run_eval_lm_eval_scores_the_patched_model(tmp_path, monkeypatch):
    """neuraldb eval's pipeline with the lm-eval backend: HFLM sees the edits (LAMBADA-style rows made of the edited
    prompts go from the unedited answers to the new targets), and its numbers equal the builtin scorer's."""
    pytest.importorskip("lm_eval")

    from _tiny_editing import EVAL_FACTS, facts_jsonl, word_llama
    from neuraldb import patch_model, templates, unpatch_model
    from neuraldb.database import NeuralKVDatabase
    from neuraldb.evaluation.general import evaluate_general
    from neuraldb.evaluation.pipeline import run_eval

    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = word_llama()
    facts = EVAL_FACTS[:4]
    path = facts_jsonl(tmp_path / "facts.jsonl", facts)
    d = tmp_path / "general_eval"
    d.mkdir()
    _write(d / "lambada_openai.jsonl.gz", [{"context": f.text, "continuation": f.target_new} for f in facts])
    run = run_eval(
        model_name="tiny",
        dataset="counterfact",
        facts_path=path,
        n_facts=None,
        save_db=tmp_path / "db",
        edit_kwargs={"layer": 2, "gamma": 0.9, "n_prefixes": 1, "prefix_len": 3, "steps": 5},
        general_dir=d,
        general_backend="lm-eval",
        show_progress=False,
        model_and_tok=(model, tok),
    )
    unpatch_model(model)
    pre, post = (run["general"][s]["tasks"]["lambada_openai"] for s in ("pre", "post"))
    assert run["general"]["post"]["backend"].startswith("lm-eval") and any("lm-eval" in n for n in run["notes"])
    assert post["ppl"] != pytest.approx(pre["ppl"], rel=1e-3)  # lm-eval scored the patched model, then the unpatched

    db = NeuralKVDatabase.load(tmp_path / "db")
    patch_model(model, db)
    try:
        pf = lambda s: templates.apply(db.template, s)
        ours = evaluate_general(model, tok, d, tasks=["lambada_openai"], show_progress=False, prompt_fn=pf)
    finally:
        unpatch_model(model)
    assert ours["tasks"]["lambada_openai"]["acc"] == post["acc"]
    assert ours["tasks"]["lambada_openai"]["ppl"] == pytest.approx(post["ppl"], rel=1e-4)
