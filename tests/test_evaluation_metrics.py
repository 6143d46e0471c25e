"""CounterFact, ZsRE, fluency and general-ability formulas pinned on hand-made cases with known answers."""

import math

import pytest
from _eval_stubs import BigramLM, StubTokenizer
from neuraldb.evaluation.counterfact import evaluate_counterfact, harmonic_mean
from neuraldb.evaluation.fluency import (
    TfidfVectorizer,
    fluency_score,
    ngram_entropy,
    tfidf_similarity,
    word_tokenize,
)
from neuraldb.evaluation.general import lambada, multiple_choice, wikitext_perplexity
from neuraldb.evaluation.zsre import evaluate_zsre, locality_unchanged
from neuraldb.facts import Fact


def _cf_world():
    """Rewrite prompt ends in " is", paraphrases in " city:" / " town:", neighborhood in " in" / " at"."""
    tok, m = StubTokenizer(), BigramLM()
    t = {p: tok.id(p) for p in (" is", " city:", " town:", " in", " at", " New", " York", " Boston")}
    # rewrite: P(New York) = .5 * .9 = .45 (mean log-prob -0.399), P(Boston) = .5 (-0.693):
    # new wins by per-token mean (ROME) but loses by the summed whole-target log-probability.
    m.set_next(t[" is"], {t[" New"]: 0.5, t[" Boston"]: 0.5 - 1e-9})
    m.set_next(t[" New"], {t[" York"]: 0.9})
    m.set_next(t[" city:"], {t[" New"]: 0.8, t[" Boston"]: 0.1})  # paraphrase 1: new wins either way
    m.set_next(t[" town:"], {t[" New"]: 0.01, t[" Boston"]: 0.6})  # paraphrase 2: true wins either way
    m.set_next(t[" in"], {t[" New"]: 0.01, t[" Boston"]: 0.7})  # neighborhood 1: true wins (success)
    m.set_next(t[" at"], {t[" New"]: 0.9, t[" Boston"]: 0.05})  # neighborhood 2: new wins (failure)
    fact = Fact(
        "Bob",
        "{} is",
        "New York",
        target_true="Boston",
        paraphrases=("Bob's city:", "Bob's town:"),
        neighborhood=("Ann lives in", "Ann works at"),
    )
    return m, tok, fact


def test_counterfact_success_rates_rome_mean_reduction():
    m, tok, fact = _cf_world()
    r = evaluate_counterfact(m, tok, [fact], show_progress=False)
    s = r["summary"]
    assert s["efficacy"] == 100.0
    assert s["generalization"] == 50.0
    assert s["specificity"] == 50.0
    assert s["score"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 50))
    # magnitude: exp(mean log p_new) - exp(mean log p_true) = sqrt(.45) - .5
    assert s["efficacy_magnitude"] == pytest.approx(100 * (math.sqrt(0.45) - 0.5), abs=1e-4)
    g1 = math.sqrt(0.8 * 0.9) - 0.1
    g2 = math.sqrt(0.01 * 0.9) - 0.6
    assert s["generalization_magnitude"] == pytest.approx(100 * (g1 + g2) / 2, abs=1e-4)
    n1 = 0.7 - math.sqrt(0.01 * 0.9)
    n2 = 0.05 - math.sqrt(0.9 * 0.9)
    assert s["specificity_magnitude"] == pytest.approx(100 * (n1 + n2) / 2, abs=1e-4)
    assert "consistency skipped" in " ".join(r["notes"])


def test_counterfact_sum_reduction_compares_whole_targets():
    m, tok, fact = _cf_world()
    s = evaluate_counterfact(m, tok, [fact], reduction="sum", show_progress=False)["summary"]
    assert s["efficacy"] == 0.0  # P(New York) = .45 < P(Boston) = .5
    assert s["efficacy_magnitude"] == pytest.approx(100 * (0.45 - 0.5), abs=1e-4)


def test_counterfact_averages_per_fact_then_over_facts():
    m, tok, fact = _cf_world()
    other = Fact("Eve", "{} city:", "New York", target_true="Boston", paraphrases=("Eve's town:",) * 3)
    s = evaluate_counterfact(m, tok, [fact, other], show_progress=False)["summary"]
    assert s["efficacy"] == 100.0
    assert s["generalization"] == pytest.approx((50.0 + 0.0) / 2)
    assert s["specificity"] == 50.0 and s["n_neighborhood_facts"] == 1


def test_harmonic_mean():
    assert harmonic_mean([50, 100, 100]) == pytest.approx(75.0)
    assert harmonic_mean([0, 100, 100]) == 0.0
    assert math.isnan(harmonic_mean([None, 1, 1]))


def test_zsre_token_accuracy_and_rome_specificity():
    tok, m = StubTokenizer(), BigramLM()
    t = {p: tok.id(p) for p in (" ?", " New", " York", " Jersey", " The", " String", " Band", " foo?")}
    m.set_next(t[" ?"], {t[" New"]: 0.6})
    m.set_next(t[" New"], {t[" Jersey"]: 0.6, t[" York"]: 0.3})  # 2nd target token is not top-1
    m.set_next(t[" foo?"], {t[" The"]: 0.6})
    m.set_next(t[" The"], {t[" String"]: 0.6})
    fact = Fact(
        "X",
        "Where is {} ?",
        "New York",
        paraphrases=("Where is X really ?",),
        neighborhood=("nq question: foo",),
        extras={"loc_ans": "The Band"},
    )
    r = evaluate_zsre(m, tok, [fact], show_progress=False)
    s = r["summary"]
    assert s["efficacy"] == 50.0 and s["generalization"] == 50.0
    # loc + "?" -> " foo?" predicts " The" (right), then " String" instead of " Band" (wrong)
    assert s["specificity"] == 50.0
    m2 = BigramLM()
    m2.table.data.copy_(m.table.data)
    m2.set_next(t[" The"], {t[" Band"]: 0.7})
    r2 = evaluate_zsre(m2, tok, [fact], show_progress=False)
    assert r2["summary"]["specificity"] == 100.0
    assert locality_unchanged(r, r2) == 50.0
    assert locality_unchanged(r, r) == 100.0


def test_ngram_entropy_and_rome_fluency_weights():
    toks = ["a", "b", "a", "b"]
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(toks, 2) == pytest.approx(h2)
    assert ngram_entropy(toks, 3) == pytest.approx(1.0)
    assert fluency_score("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert fluency_score("same same same same same") == 0.0
    assert ngram_entropy(["x"], 2) == 0.0


def test_word_tokenize_like_nltk():
    assert word_tokenize("Don't stop, it's 3.5 km.") == ["Do", "n't", "stop", ",", "it", "'s", "3.5", "km", "."]


def test_tfidf_similarity_smooth_idf():
    vec = TfidfVectorizer().fit(["cat dog", "cat"])
    idf_dog = math.log(3 / 2) + 1
    assert vec.idf["cat"] == pytest.approx(1.0)
    assert tfidf_similarity("cat", "cat dog", vec) == pytest.approx(1 / math.sqrt(1 + idf_dog**2))
    assert tfidf_similarity("Dog cat", "cat dog", vec) == pytest.approx(1.0)
    assert tfidf_similarity("bird", "cat dog", vec) == 0.0


def test_multiple_choice_acc_vs_length_normalised_acc_norm():
    tok, m = StubTokenizer(), BigramLM()
    t = {p: tok.id(p) for p in ("Answer:", " yes", " absolutely")}
    m.set_next(t["Answer:"], {t[" yes"]: 0.2, t[" absolutely"]: 0.1})
    # summed log-likelihood prefers " yes" (gold 0); per character: log .2 / 3 = -.536 < log .1 / 10 = -.230
    docs = [(["Q: ok? Answer:"] * 2, [" yes", " absolutely"], 0)]
    r = multiple_choice(m, tok, docs, show_progress=False)
    assert r["acc"] == 100.0 and r["acc_norm"] == 0.0


def test_wsc_partial_scoring_scores_shared_continuation_after_each_option():
    tok, m = StubTokenizer(), BigramLM()
    t = {p: tok.id(p) for p in (" councilmen", " demonstrators", " feared")}
    m.set_next(t[" councilmen"], {t[" feared"]: 0.5})
    m.set_next(t[" demonstrators"], {t[" feared"]: 0.1})
    docs = [(["the councilmen", "the demonstrators"], [" feared"] * 2, 0)]
    assert multiple_choice(m, tok, docs, show_progress=False)["acc"] == 100.0


def test_lambada_greedy_accuracy_and_perplexity():
    tok, m = StubTokenizer(), BigramLM()
    t = {p: tok.id(p) for p in (" about", " signs", " the")}
    m.set_next(t[" about"], {t[" signs"]: 0.5})
    m.set_next(t[" the"], {t[" signs"]: 0.25, t[" about"]: 0.5})
    rows = [{"context": "I care about", "continuation": "signs"}, {"context": "all the", "continuation": "signs"}]
    r = lambada(m, tok, rows, show_progress=False)
    assert r["acc"] == 50.0
    assert r["ppl"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.25)) / 2), rel=1e-5)


def test_wikitext_perplexity_of_uniform_model_is_vocab_size():
    tok, m = StubTokenizer(), BigramLM(vocab_size=50)
    text = " ".join(f"w{i % 7}" for i in range(40))
    r = wikitext_perplexity(m, tok, text, window=8, show_progress=False)
    assert r["token_ppl"] == pytest.approx(50.0, rel=1e-5)
    assert r["n_tokens"] == 40 - 5  # 5 windows, the first token of each is context only
