"""KnowEdit's same-subject locality and portability in the zsRE evaluation (EasyEdit's token-level definitions)."""

from __future__ import annotations

import json

import pytest
import torch
from _eval_stubs import BigramLM, StubTokenizer
from neuraldb import facts
from neuraldb.evaluation.zsre import (
    evaluate_zsre,
    portability_prompts,
    same_subject_locality,
    same_subject_prompts,
)
from neuraldb.facts import Fact

RECORD = {
    "subject": "Epaspidoceras",
    "target_new": "Noctuidae",
    "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["small genus"]},
            {"prompt": "Epaspidoceras taxon rank", "ground_truth": ["genus"]},
        ]
    },
    "portability": {
        "Reasoning": [
            {
                "prompt": "What is the common name for the family Epaspidoceras belongs to?",
                "ground_truth": "Owlet moths",
            }
        ]
    },
}


def test_knowedit_fields_are_kept_on_the_fact():
    [f] = facts.parse([RECORD])
    assert f.extras["locality"] == RECORD["locality"] and f.extras["portability"] == RECORD["portability"]
    assert same_subject_prompts(f) == [("The taxon rank of Epaspidoceras is", "small genus"),
                                       ("Epaspidoceras taxon rank", "genus")]  # fmt: skip
    assert portability_prompts(f) == [
        ("Reasoning", "What is the common name for the family Epaspidoceras belongs to?", "Owlet moths")
    ]
    # MEND's zsRE portability layout (written for its alt target) is not read
    mend = Fact("X", "{} ?", "Y", extras={"portability": {"New Question": "q?", "New Answer": "a"}})
    assert portability_prompts(mend) == [] and same_subject_prompts(mend) == []


def _world():
    """Bigram stand-in: " is" -> " small" -> " genus" (prompt 1, two answer tokens), " rank" -> " genus" (prompt 2),
    " to?" -> " Owlet" -> " moths" (portability)."""
    tok, m = StubTokenizer(), BigramLM()
    t = {p: tok.id(p) for p in (" is", " small", " genus", " rank", " family", " to?", " Owlet", " moths", " mice")}
    m.set_next(t[" is"], {t[" small"]: 0.6})
    m.set_next(t[" small"], {t[" genus"]: 0.6})
    m.set_next(t[" rank"], {t[" genus"]: 0.6})
    m.set_next(t[" to?"], {t[" Owlet"]: 0.6})
    m.set_next(t[" Owlet"], {t[" mice"]: 0.5, t[" moths"]: 0.3})  # second portability token wrong pre-edit
    [f] = facts.parse([RECORD])
    return tok, m, t, f


def test_same_subject_locality_per_prompt_then_per_fact():
    tok, pre_model, t, f = _world()
    bare = Fact("Bob", "{} lives in", "Paris")  # no KnowEdit fields: no such prompts, does not count
    pre = evaluate_zsre(pre_model, tok, [f, bare], show_progress=False)
    s = pre["summary"]
    assert s["same_subject_accuracy"] == 100.0 and s["n_same_subject_facts"] == 1
    assert s["portability_reasoning"] == 50.0 and s["n_portability_reasoning_facts"] == 1
    assert s["portability_subject_aliasing"] is None and s["portability_logical_generalization"] is None
    assert same_subject_locality(pre, pre) == 100.0

    post_model = BigramLM()
    post_model.table.data.copy_(pre_model.table.data)
    post_model.set_next(t[" small"], {t[" family"]: 0.7})  # prompt 1: first token kept, second changed
    post_model.set_next(t[" Owlet"], {t[" moths"]: 0.7})  # portability now fully right
    post = evaluate_zsre(post_model, tok, [f, bare], show_progress=False)
    # prompt 1 agrees on 1 of 2 tokens, prompt 2 on 1 of 1: (0.5 + 1) / 2 per fact (pooled tokens would give 2/3)
    assert same_subject_locality(pre, post) == 75.0
    assert post["summary"]["same_subject_accuracy"] == 75.0
    assert post["summary"]["portability_reasoning"] == 100.0
    assert "same_subject_locality" in post["definitions"]


def test_records_without_the_fields_give_none():
    tok, m, _, _ = _world()
    bare = [Fact("Bob", "{} lives in", "Paris", neighborhood=("nq question: foo",), extras={"loc_ans": "The Band"})]
    r = evaluate_zsre(m, tok, bare, show_progress=False)
    s = r["summary"]
    assert same_subject_locality(r, r) is None
    assert s["same_subject_accuracy"] is None and s["n_same_subject_facts"] == 0
    assert s["portability_reasoning"] is None and s["n_portability_reasoning_facts"] == 0
    assert s["specificity"] is not None  # the MEND loc prompt is still scored
    assert "same_subject_locality" not in r["definitions"]


# --- a real database on a tiny Llama, through run_eval -----------------------------------------------------------

LAYER = 2


def _tiny_record(subject="Danielle Darrieux"):
    return {
        "subject": subject,
        "prompt": f"The mother tongue of {subject} is",
        "target_new": "English",
        "ground_truth": ["French"],
        "rephrase_prompt": f"Because the mother tongue of {subject} is",
        "locality": {"Relation_Specificity": [{"prompt": f"{subject} plays the", "ground_truth": ["guitar"]}]},
        "portability": {"Reasoning": [{"prompt": f"I . The mother tongue of {subject} is", "ground_truth": "English"}]},
    }


def _query(model, tok, text: str) -> torch.Tensor:
    """The patched layer's down-projection input at the last token of ``text`` (as the scoring tokenises it)."""
    from neuraldb.architectures import down_proj_module
    from neuraldb.evaluation.scoring import encode_pair

    ids, _ = encode_pair(tok, text, " x")
    got = {}

    def grab(module, inputs, output):
        got["q"] = inputs[0]

    handle = down_proj_module(model, LAYER)[1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return got["q"][0, -1].float()


def _db(model, tok, key: torch.Tensor, residual: torch.Tensor, path):
    from neuraldb.database import NeuralKVDatabase

    db = NeuralKVDatabase.for_model(model, LAYER, dtype=torch.float32)
    db.gamma = 0.9
    db.add(key / key.norm(), residual)
    db.save(path)
    return path


def _run(tmp_path, model, tok, db_path, name):
    from neuraldb import unpatch_model
    from neuraldb.evaluation.pipeline import run_eval

    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(_tiny_record()) + "\n", encoding="utf-8")
    try:
        return run_eval(
            model_name="tiny",
            dataset="zsre",
            facts_path=path,
            n_facts=None,
            db_path=db_path,
            show_progress=False,
            model_and_tok=(model, tok),
        )
    finally:
        unpatch_model(model)


def test_run_eval_same_subject_locality_drops_where_the_gate_opens(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from _tiny_editing import word_llama
    from neuraldb.evaluation.gate import gate_fires
    from neuraldb.evaluation.report import markdown_report
    from neuraldb.evaluation.scoring import encode_pair

    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model, tok = word_llama()
    loc_prompt = "Danielle Darrieux plays the"
    q = _query(model, tok, loc_prompt)
    # A row keyed on the locality prompt's last token whose residual pushes the next token toward "piano".
    push = 100 * model.lm_head.weight[tok.convert_tokens_to_ids("piano")].detach().float()
    opens = _db(model, tok, q, push, tmp_path / "opens.safetensors")
    ctx, cont = encode_pair(tok, loc_prompt, " guitar")
    assert gate_fires(model, LAYER, [ctx + cont], q[None] / q.norm(), 0.9) == [True]
    run = _run(tmp_path, model, tok, opens, "opens")
    assert run["same_subject_locality"] < 100.0
    assert run["post"]["summary"]["portability_reasoning"] is not None
    md = markdown_report([run])
    assert "Same-subject loc." in md and "Portability: reasoning" in md
    assert "target_new as given" in " ".join(run["notes"])

    # The same row keyed away from every query never opens the gate: the edit changes nothing.
    closed = _db(model, tok, -q, push, tmp_path / "closed.safetensors")
    assert gate_fires(model, LAYER, [ctx + cont], -q[None] / q.norm(), 0.9) == [False]
    run = _run(tmp_path, model, tok, closed, "closed")
    assert run["same_subject_locality"] == 100.0
    assert run["post"]["summary"] == run["pre"]["summary"]
