"""Evaluation on the real SmolLM2-135M and the real data files (slow; skipped when either is absent)."""

from __future__ import annotations

import pytest
from _data import data_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from neuraldb.models import ModelNotFoundError, load_model

    try:
        return load_model("smollm2")
    except ModelNotFoundError as e:
        pytest.skip(str(e))


def test_real_tokenizer_splits_targets_at_the_leading_space(smollm2):
    from neuraldb.evaluation.scoring import encode_pair

    _, tok = smollm2
    ctx, cont = encode_pair(tok, "The capital of France is", " Paris")
    assert tok.decode(ctx) == "The capital of France is" and tok.decode(cont) == " Paris"


def test_counterfact_zsre_general_on_realdata_file(smollm2):
    from neuraldb import facts as F
    from neuraldb import templates
    from neuraldb.evaluation import evaluate_counterfact, evaluate_general, evaluate_zsre
    from neuraldb.evaluation.pipeline import select_facts
    from neuraldb.evaluation.scoring import score_continuations, score_grouped

    model, tok = smollm2
    tpl = templates.default_template(tok)
    pf = lambda s: templates.apply(tpl, s)
    cf = F.load(data_file("knowledge_editing/counterfact_rome_format_1031.json.gz"), limit=2)
    r = evaluate_counterfact(model, tok, cf, prompt_fn=pf, fluency=True, fluency_max_facts=1, show_progress=False)
    s = r["summary"]
    for k in ("efficacy", "generalization", "specificity"):
        assert 0 <= s[k] <= 100
    assert s["n_neighborhood_facts"] == 2 and len(r["per_fact"][0]["neighborhood"]) == 10
    assert 300 < s["fluency"] < 700 and len(r["per_fact"][0]["generations"]) == 10
    # the shared-context path gives the numbers of the plain path on real weights
    f = cf[0]
    (g,) = score_grouped(model, tok, [pf(f.text)], [[" " + f.target_new, " " + f.target_true]], show_progress=False)
    flat = score_continuations(
        model, tok, [pf(f.text)] * 2, [" " + f.target_new, " " + f.target_true], show_progress=False
    )
    for a, b in zip(g, flat):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)

    zs = select_facts(
        F.load(data_file("knowledge_editing/zsre_mend_eval_portability_1037.json.gz"), limit=3), "zsre", n_facts=3
    )
    z = evaluate_zsre(model, tok, zs, prompt_fn=pf, show_progress=False)["summary"]
    assert z["n_neighborhood_facts"] == 3 and 0 <= z["specificity"] <= 100

    gen = evaluate_general(
        model, tok, data_file("general_eval"), limit=3, wikitext_max_tokens=600, prompt_fn=pf, show_progress=False
    )
    assert set(gen["tasks"]) == {
        "lambada_openai",
        "wikitext2",
        "arc_easy",
        "arc_challenge",
        "wsc273",
        "commonsense_qa",
        "piqa",
        "mmlu",
    }
    assert 5 < gen["tasks"]["wikitext2"]["token_ppl"] < 200
