"""``neuraldb.edit(model, tok, prompts=[...], target_new=[...], subject=[...])``: EasyEdit's call, the database and
per-fact rewrite success back, clear errors naming the argument before anything changes (issue 29)."""

from __future__ import annotations

import pytest
import torch
from _tiny_editing import FACTS
from neuraldb import templates
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import EditResult, edit
from neuraldb.editing.easyedit import facts_from_lists
from neuraldb.facts import Fact
from neuraldb.patching import patch_info, patch_model, unpatch_model

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("neuraldb_cache")

HP = {"layer": 2, "gamma": 0.5, "n_prefixes": 1, "prefix_len": 3, "progress": False}
# The random model's attention barely carries a residual from the subject to later positions: prompts that end with
# their subject can be edited (with a loose norm clamp), the last one (subject mid-prompt) is not. A mix of successes
# and failures, so the test tells the per-fact definition apart from "all" or "none".
STRONG = {"steps": 40, "lr": 1.0, "clamp_norm_factor": 20, "weight_decay": 0, "kl_factor": 0}
PROMPTS = ["The mother tongue of Danielle Darrieux", "I . Spike Hughes", "Because Toko Yasuda", FACTS[3].text]
TARGETS = ["English", "Philadelphia", "piano", "Google"]
SUBJECTS = ["Danielle Darrieux", "Spike Hughes", "Toko Yasuda", "Apple A5"]
EXPECTED_FACTS = [facts_from_lists(p, t, s)[0] for p, t, s in zip(PROMPTS, TARGETS, SUBJECTS)]


def _greedy_starts_with_target(model, tok, db, fact) -> bool:
    prompt = templates.encode(tok, db.template, fact.text)
    target = templates.encode_target(tok, fact.target_new)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=len(target), do_sample=False, pad_token_id=tok.pad_token_id
        )
    return out[0, len(prompt) :].tolist() == target


def test_keyword_lists_give_the_database_and_rewrite_success(tiny):
    model, tok = tiny
    result = edit(model, tok, prompts=PROMPTS, target_new=TARGETS, subject=SUBJECTS, **HP, **STRONG)
    assert isinstance(result, EditResult)
    db, ok = result
    assert isinstance(db, NeuralKVDatabase) and len(db) == 4
    assert [db.fact(i) for i in db.ids()] == EXPECTED_FACTS
    assert EXPECTED_FACTS[0] == Fact("Danielle Darrieux", "The mother tongue of {}", "English")
    assert patch_info(model) is None  # left as it was
    # the documented definition: the patched model's greedy continuation starts with the target's tokens
    patch_model(model, db)
    try:
        expected = [_greedy_starts_with_target(model, tok, db, f) for f in EXPECTED_FACTS]
    finally:
        unpatch_model(model)
    assert ok == expected == [True, True, True, False]
    # the unedited model continues with none of these targets, so success measures the edit
    assert not any(_greedy_starts_with_target(model, tok, db, f) for f in EXPECTED_FACTS)


def test_fact_api_unchanged(tiny):
    model, tok = tiny
    db = edit(model, tok, FACTS[:2], **HP)
    assert isinstance(db, NeuralKVDatabase) and len(db) == 2
    assert isinstance(edit(model, tok, FACTS[2], **HP), NeuralKVDatabase)


def test_lone_strings_and_ground_truth():
    (f,) = facts_from_lists("The mother tongue of Danielle Darrieux is", "English", "danielle darrieux", "French")
    # found ignoring case, and spelled as the prompt writes it (the key is read at the prompt's tokens)
    assert f == Fact("Danielle Darrieux", "The mother tongue of {} is", "English", target_true="French")
    (g,) = facts_from_lists(["{} plays the"], ["piano"], ["Toko Yasuda"])
    assert g.text == "Toko Yasuda plays the"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_new": TARGETS[:2]}, ValueError, r"same length.*prompts: 4, target_new: 2, subject: 4"),
        ({"subject": [*SUBJECTS[:1], "Nobody", *SUBJECTS[2:]]}, ValueError, r"subject\[1\] 'Nobody' does not occur in"),
        ({"target_new": ["English", "", "piano", "x"]}, ValueError, r"target_new\[1\] must be a non-empty string"),
        ({"prompts": [PROMPTS[0], 7, *PROMPTS[2:]]}, ValueError, r"prompts\[1\] must be a non-empty string, got 7"),
        ({"subject": None}, TypeError, r"missing: subject"),
        ({"prompts": 5}, TypeError, r"prompts must be a list of strings, got int"),
        ({"ground_truth": ["French"]}, ValueError, r"ground_truth: 1"),
    ],
)
def test_bad_lists_are_refused_before_anything_changes(tiny, kwargs, error, match):
    model, tok = tiny
    db = edit(model, tok, FACTS[3:4], **HP)
    args = {"prompts": PROMPTS, "target_new": TARGETS, "subject": SUBJECTS, **kwargs}
    with pytest.raises(error, match=match):
        edit(model, tok, **args, db=db, **HP)
    assert len(db) == 1 and patch_info(model) is None


def test_facts_and_lists_together_is_an_error(tiny):
    model, tok = tiny
    with pytest.raises(TypeError, match="not both"):
        edit(model, tok, FACTS[:1], prompts=PROMPTS[:1], **HP)
    with pytest.raises(TypeError, match="needs facts, or prompts="):
        edit(model, tok, **HP)


def test_previous_patch_is_restored(tiny):
    model, tok = tiny
    other = edit(model, tok, FACTS[3:5], **HP)
    patch_model(model, other, gamma=0.8)
    try:
        _, ok = edit(model, tok, prompts=PROMPTS[:1], target_new=TARGETS[:1], subject=SUBJECTS[:1], **HP)
        assert len(ok) == 1
        info = patch_info(model)
        assert info.db is other and info.gamma == pytest.approx(0.8) and info.layer == 2 and info.enabled
    finally:
        unpatch_model(model)
