"""Gate-skip scoring (neuraldb.evaluation.gate) and the distractor-scaling helpers (neuraldb.evaluation.distractors)."""

from __future__ import annotations

import pytest
import torch
from neuraldb.evaluation.counterfact import counterfact_prompts, evaluate_counterfact
from neuraldb.evaluation.distractors import (
    distractor_facts,
    drop_duplicates,
    hit_counts,
    run_distractor_scaling,
    synthetic_residuals,
    with_distractors,
)
from neuraldb.evaluation.gate import merge_rescored, prompt_hits, retrieval_hits
from neuraldb.facts import Fact

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _tiny_editing import EVAL_FACTS

pytestmark = pytest.mark.usefixtures("neuraldb_cache")


@pytest.fixture(scope="module")
def edited(tiny):
    from neuraldb import edit

    model, tok = tiny
    return edit(model, tok, EVAL_FACTS[:3], layer=2, gamma=0.9, progress=False, n_prefixes=1, prefix_len=3, steps=5)


def test_gate_skip_scoring_equals_full_rescoring(tiny, edited):
    from neuraldb import patch_model, templates, unpatch_model

    model, tok = tiny
    facts = EVAL_FACTS[:3]

    def pf(s):
        return templates.apply(edited.template, s)

    _, ctxs, conts = counterfact_prompts(facts, prompt_fn=pf)
    [hits] = prompt_hits(model, tok, ctxs, conts, edited.layer, edited.keys, edited.gamma)
    fires = [bool(h) for h in hits]
    assert any(fires) and not all(fires)  # both paths are exercised
    pre = evaluate_counterfact(model, tok, facts, prompt_fn=pf, show_progress=False)
    patch_model(model, edited)
    try:
        full = evaluate_counterfact(model, tok, facts, prompt_fn=pf, show_progress=False)
        gated = evaluate_counterfact(model, tok, facts, prompt_fn=pf, show_progress=False, baseline=pre, rescore=fires)
    finally:
        unpatch_model(model)
    changed = 0
    for a, b, p in zip(full["per_fact"], gated["per_fact"], pre["per_fact"]):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            for x, y, z in zip(a[kind], b[kind], p[kind]):
                assert y["nll_new"] == pytest.approx(x["nll_new"], abs=1e-5)
                assert y["nll_true"] == pytest.approx(x["nll_true"], abs=1e-5)
                changed += abs(x["nll_new"] - z["nll_new"]) > 1e-3
    assert changed  # the patch moved some scores, so copying pre everywhere would fail
    for k in ("efficacy", "generalization", "specificity"):
        assert gated["summary"][k] == full["summary"][k]


def test_retrieval_hits_match_the_op_and_prefix_sizes(tiny, edited):
    from neuraldb import templates
    from neuraldb.editing import model_access

    from neuraldb_kernels.reference import best_keys

    model, tok = tiny
    seqs = [templates.encode(tok, edited.template, f.text) for f in EVAL_FACTS]
    gamma = 0.5
    keys = torch.cat([edited.keys, torch.nn.functional.normalize(torch.randn(4, edited.key_dim), dim=1).half()])
    focus = [len(s) - 2 for s in seqs]
    per_size, at_focus = retrieval_hits(
        model, edited.layer, seqs, keys, gamma, sizes=[1, 3, 7], margin=0.0, focus=focus, batch_size=2
    )
    h = model_access.handles(model, edited.layer)
    for n, hits, hits_at in zip([1, 3, 7], per_size, at_focus):
        for s, got, got_at, p in zip(seqs, hits, hits_at, focus):
            captured = []
            hd = h.down_proj.register_forward_hook(lambda mod, inp, out, c=captured: c.append(inp[0][0]))
            with torch.no_grad():
                model(input_ids=torch.tensor([s]))
            hd.remove()
            score, idx = best_keys(captured[0], keys[:n], dtype=torch.float32)  # retrieval_hits scores in fp32
            assert got == list(dict.fromkeys(idx[score > gamma].tolist()))
            assert got_at == ([int(idx[p])] if score[p] > gamma else [])
    assert per_size[0] != per_size[1]  # the larger table retrieves rows the smaller one lacks
    assert any(at_focus[-1]) and not all(at_focus[-1])


def test_merge_rescored():
    assert merge_rescored([1, 2, 3], [False, True, True], lambda idx: [10 * i for i in idx]) == [1, 10, 20]
    assert merge_rescored([1], [False], lambda idx: pytest.fail("nothing to re-score")) == [1]
    with pytest.raises(ValueError):
        merge_rescored([1, 2], [True], lambda idx: idx)


def test_synthetic_residual_norms_follow_the_given_norms():
    norms = torch.tensor([10.0, 20.0, 40.0, 80.0])
    r = synthetic_residuals(norms, 8000, 64, seed=3)
    got = r.norm(dim=1)
    nearest = (got[:, None] - norms[None]).abs().argmin(1)
    assert torch.allclose(got, norms[nearest], rtol=1e-4)  # every norm is one of the given ones ...
    share = torch.bincount(nearest, minlength=4).float() / len(r)
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.03)  # ... each drawn equally often
    unit = r / got[:, None]
    assert unit.mean(0).norm() < 0.05  # no preferred direction
    assert torch.equal(r, synthetic_residuals(norms, 8000, 64, seed=3))
    assert not torch.equal(r, synthetic_residuals(norms, 8000, 64, seed=4))


def test_duplicates_of_edited_facts_are_dropped():
    edited = [
        Fact("Danielle Darrieux", "The mother tongue of {} is", "English"),
        Fact("Spike Hughes", "{} originates from", "Philadelphia"),
    ]
    candidates = [
        Fact("Danielle Darrieux", "The mother tongue of {} is", "French"),  # same record, other target
        Fact("Danielle Darrieux", "{} was born in", "Paris"),  # same subject, other prompt
        Fact("Max Mosley", "{} originates from", "London"),  # same prompt, other subject
        Fact("Spike  Hughes", "{}  originates from", "London"),  # whitespace variant of an edit
        Fact("Apple A5", "{} was created by", "Google"),
    ]
    keep, dropped = drop_duplicates(edited, candidates)
    assert keep == [1, 2, 4] and dropped == 2
    order, dropped = distractor_facts(edited, candidates, seed=0)
    assert dropped == 2 and sorted(order, key=candidates.index) == [candidates[i] for i in keep]
    assert order == distractor_facts(edited, candidates, seed=0)[0]


def test_hit_counts():
    index = [(0, "rewrite", 0), (0, "neighborhood", 0), (1, "rewrite", 0), (1, "neighborhood", 0)]
    hits = [[0, 5], [], [0], [1, 2]]
    c = hit_counts(hits, index, own_row=[0, 1], n_edited=2)
    assert c["rewrite"] == {"prompts": 2, "own": 1, "other_edited": 1, "distractor": 1, "none": 0}
    assert c["neighborhood"] == {"prompts": 2, "own": 1, "other_edited": 0, "distractor": 1, "none": 1}


def test_run_distractor_scaling(tiny, edited):
    from neuraldb import patch_info

    model, tok = tiny
    # keys no prompt comes near (fact 0's negated, random ones in 64 dimensions): adding them changes nothing
    dkeys = torch.cat(
        [-edited.keys.float()[:1], torch.randn(3, edited.key_dim, generator=torch.Generator().manual_seed(0))]
    )
    before = edited.keys.clone()
    r = run_distractor_scaling(model, tok, edited, EVAL_FACTS[:3], dkeys, sizes=[3, 4, 7], eval_facts=2)
    assert len(edited) == 3 and torch.equal(edited.keys, before) and patch_info(model) is None
    assert [b["keys"] for b in r["by_size"]] == [3, 4, 7] and r["n_evaluated"] == 2
    assert len(r["evaluated_facts"]) == 2
    first, last = r["by_size"][0], r["by_size"][-1]
    assert first["hits"] == last["hits"] and first["summary"] == last["summary"]
    assert all(c["distractor"] == 0 for c in last["hits"].values())
    assert first["rescored"] > 0 and first["hits"]["rewrite"]["own"] > 0
    assert len(with_distractors(edited, dkeys, torch.zeros(4, edited.value_dim))) == 7 and len(edited) == 3


def test_pre_edit_scores_are_cached(tiny, edited, tmp_path):
    from neuraldb.evaluation.distractors import pre_edit_scores

    model, tok = tiny
    first = pre_edit_scores(model, tok, edited, EVAL_FACTS[:2], cache_dir=tmp_path)
    [path] = tmp_path.glob("pre-counterfact-2-*.json")
    second = pre_edit_scores(model, tok, edited, EVAL_FACTS[:2], cache_dir=tmp_path)
    assert second["summary"] == first["summary"] and second["per_fact"][0]["rewrite"] == first["per_fact"][0]["rewrite"]
    assert len(list(tmp_path.glob("pre-counterfact-*.json"))) == 1
    pre_edit_scores(model, tok, edited, EVAL_FACTS[1:3], cache_dir=tmp_path)  # other facts, another file
    assert len(list(tmp_path.glob("pre-counterfact-*.json"))) == 2 and path.is_file()


def test_distractor_keys_reproduce_the_databases_keys_and_are_cached(tiny, edited, tmp_path, monkeypatch):
    import neuraldb.editing
    from neuraldb.evaluation.distractors import distractor_keys

    model, tok = tiny
    k = distractor_keys(model, tok, edited, EVAL_FACTS[:3], cache_dir=tmp_path, chunk=2)
    cos = torch.nn.functional.cosine_similarity(k, edited.keys.float(), dim=1)
    assert cos.min() > 0.999  # same layer, template, prefixes and weighting as the edit
    monkeypatch.setattr(neuraldb.editing, "compute_keys", lambda *a, **kw: pytest.fail("keys were not cached"))
    assert torch.equal(distractor_keys(model, tok, edited, EVAL_FACTS[:3], cache_dir=tmp_path), k)


def test_limited_distractor_keys_are_resumed(tiny, edited, tmp_path, monkeypatch):
    import neuraldb.editing
    from neuraldb.evaluation.distractors import distractor_keys

    model, tok = tiny
    first = distractor_keys(model, tok, edited, EVAL_FACTS, cache_dir=tmp_path, chunk=2, limit=2)
    assert first.shape == (2, edited.key_dim)
    asked = []
    real = neuraldb.editing.compute_keys
    monkeypatch.setattr(
        neuraldb.editing,
        "compute_keys",
        lambda m, t, facts, *a, **kw: asked.append(len(facts)) or real(m, t, facts, *a, **kw),
    )
    full = distractor_keys(model, tok, edited, EVAL_FACTS, cache_dir=tmp_path, chunk=2)
    assert asked == [2, 1] and len(full) == len(EVAL_FACTS) and torch.equal(full[:2], first)
