"""The subject gate: previous-token keys computed as a plain forward gives them, one-token subjects left unchecked,
the gate's setting kept through files, and a row shut where its subject's last token follows another word."""

from __future__ import annotations

import pytest
import torch
from _tiny_editing import FACTS
from neuraldb import NeuralKVDatabase, edit, templates
from neuraldb.editing import model_access
from neuraldb.editing.contexts import _subject_last, context_texts, generate_prefixes
from neuraldb.editing.previous_keys import previous_token_keys
from neuraldb.facts import Fact
from neuraldb.relation_gate import check_relation_gate
from neuraldb.subject_gate import enable_subject_gate

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("neuraldb_cache")

KW = {"n_prefixes": 2, "prefix_len": 3, "steps": 2, "kl_factor": 0.0}
ONE_WORD = Fact("Paris", "{} is the capital of", "Italy", target_true="France")


def _state_before_last(model, tok, template, text, subj_end, layer):
    ids, s = _subject_last(tok, template, text, subj_end)
    h = model_access.handles(model, layer)
    q, _ = model_access.down_proj_inputs(h, [ids], 0)
    return torch.nn.functional.normalize(q[0, s - 1], dim=0)


def test_previous_token_keys_are_the_weighted_context_mean_of_a_plain_forward(tiny):
    model, tok = tiny
    template = templates.default_template(tok)
    db = edit(model, tok, [*FACTS[:2], ONE_WORD], layer=2, key_bare_weight=0.4, key_unit_mean=True, **KW)
    from neuraldb.editing.defaults import resolve

    cfg = resolve(model, layer=2, key_bare_weight=0.4, key_unit_mean=True, **KW)
    got = previous_token_keys(model, tok, [*FACTS[:2], ONE_WORD], 2, template=template, config=cfg)
    contexts = context_texts(generate_prefixes(model, tok, n=2, length=3, template=template))
    for j, f in enumerate(FACTS[:2]):
        pre = f.prompt.partition("{}")[0]
        states = [
            _state_before_last(model, tok, template, c + f.text, len(c) + len(pre) + len(f.subject), 2)
            for c in contexts
        ]
        want = 0.4 * states[0] + 0.3 * states[1] + 0.3 * states[2]
        torch.testing.assert_close(got[j], torch.nn.functional.normalize(want, dim=0), atol=1e-5, rtol=1e-4)
    assert not got[2].any(), "a one-token subject gets no key"
    assert db.relation_gate is None


def test_enable_subject_gate_sets_keys_and_the_gate_and_files_keep_them(tiny, tmp_path):
    model, tok = tiny
    db = edit(model, tok, [*FACTS[:3], ONE_WORD], layer=2, **KW)
    assert enable_subject_gate(model, tok, db, rho=0.25) == 3
    assert db.relation_gate == {"rho": 0.25, "window": 0, "offset": -1}
    norms = db.relation_keys.float().norm(dim=-1)
    assert torch.allclose(norms[:3], torch.ones(3), atol=1e-2) and norms[3] == 0
    db.save(tmp_path / "db.safetensors")
    back = NeuralKVDatabase.load(tmp_path / "db.safetensors")
    assert back.relation_gate == db.relation_gate and torch.equal(back.relation_keys, db.relation_keys)
    with pytest.raises(ValueError, match=r"rho'\] must be a number"):
        enable_subject_gate(model, tok, db, rho=1.5)
    assert db.relation_gate == {"rho": 0.25, "window": 0, "offset": -1}


def test_offset_zero_is_not_written_and_the_gate_shuts_a_row_after_another_word():
    assert check_relation_gate({"rho": 0.5, "window": 0, "offset": 0}) == {"rho": 0.5, "window": 0}
    e = torch.eye(4)
    db = NeuralKVDatabase(4, 1, dtype=torch.float32)
    db.add(e[:1], torch.ones(1, 1), relation_keys=e[1:2])  # key e0, previous-token key e1
    db.relation_gate = {"rho": 0.5, "window": 0, "offset": -1}
    seq = torch.stack([e[1], e[0], e[2], e[0]])[None]  # the subject after its own previous token, then after another
    assert db.retrieve_residuals(seq, 0.5).flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    # the first position of a forward (a decode step) has no previous token there: not checked
    assert db.retrieve_residuals(e[:1][None], 0.5).flatten().tolist() == [1.0]


def test_text_openings_count_only_what_passes_the_gate(tiny):
    from neuraldb.calibration import text_openings

    model, tok = tiny
    db = edit(model, tok, FACTS, layer=2, gamma=0.0, **KW)
    text = [" ".join(f.text for f in FACTS * 4)]
    plain = text_openings(model, tok, db, text, tokens=512)
    enable_subject_gate(model, tok, db, rho=-1.0)  # every previous token passes
    assert text_openings(model, tok, db, text, tokens=512)["open"] == plain["open"] > 0
    db.relation_gate = {"rho": 1.0, "window": 0, "offset": -1}  # none passes: only unchecked positions stay open
    shut = text_openings(model, tok, db, text, tokens=512)["open"]
    assert shut < plain["open"]


def test_decode_steps_keep_the_plan_and_longer_forwards_are_checked():
    e = torch.eye(4)
    db = NeuralKVDatabase(4, 1, dtype=torch.float32)
    db.add(e[:1], torch.ones(1, 1), relation_keys=e[1:2])
    db.relation_gate = {"rho": 0.5, "window": 2}  # looks ahead: every call takes the checked path
    with db.lock:
        assert db.eager_plan(0.5, 1) is None
    db.relation_gate = {"rho": 0.5, "window": 0, "offset": -1}
    with db.lock:
        _, plan = db.eager_plan(0.5, 2)
    one = plan.residuals(e[:1][None])  # (1, 1, d1): a decode step, nothing before it to check
    assert one is not None and one.flatten().tolist() == [1.0]
    got = plan.residuals(torch.stack([e[2], e[0], e[1], e[0]])[None])
    assert got.flatten().tolist() == [0.0, 0.0, 0.0, 1.0]


def test_facts_appended_to_a_gated_database_get_their_keys(tiny):
    model, tok = tiny
    db = edit(model, tok, FACTS[:2], layer=2, **KW)
    enable_subject_gate(model, tok, db)
    edit(model, tok, [FACTS[2], ONE_WORD], db=db, **KW)
    keys = dict(zip(db.ids(), db.relation_keys))
    from neuraldb.editing.defaults import resolve

    cfg = resolve(model, layer=2, **KW)
    want = previous_token_keys(model, tok, [FACTS[2]], 2, template=db.template, config=cfg)[0]
    torch.testing.assert_close(keys[db.ids()[2]].float(), want, atol=1e-3, rtol=1e-3)
    assert not keys[db.ids()[3]].any()
