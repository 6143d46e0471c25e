"""Warm starts (``neuraldb.editing.warm``): a residual that starts from the database's residuals of facts with the
same target takes ``warm_steps`` steps; a fact without one is edited exactly as before."""

from __future__ import annotations

import pytest
import torch
from _tiny_editing import FACTS, word_llama
from neuraldb import NeuralKVDatabase
from neuraldb.editing import compute_residuals, edit
from neuraldb.editing.warm import ResidualBank
from neuraldb.facts import Fact

pytestmark = pytest.mark.usefixtures("neuraldb_cache")

KW = {"n_prefixes": 1, "prefix_len": 3, "lr": 0.1, "steps": 4, "kl_factor": 0.0}


@pytest.fixture(scope="module")
def tiny():
    return word_llama()


def test_the_bank_prefers_prompt_and_target_then_target_and_skips_rows_without_a_fact():
    a = Fact("Danielle Darrieux", "The mother tongue of {} is", "English")
    b = Fact("Toko Yasuda", "The mother tongue of {} is", "English")
    c = Fact("Spike Hughes", "{} speaks", "English")
    db = NeuralKVDatabase(2, 3, dtype=torch.float32)
    db.add(torch.randn(4, 2), torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 5.0, 0], [9.0, 9, 9]]), facts=[a, b, c, None])
    bank = ResidualBank.from_database(db)
    got = bank.starts([Fact("Apple A5", "The mother tongue of {} is", "English"), Fact("X Y", "{} likes", "English"),
                       Fact("X Y", "{} likes", "piano")])  # fmt: skip
    assert torch.equal(got[0], torch.tensor([2.0, 0, 0]))  # the two rows with the same prompt and target
    assert torch.allclose(got[1], torch.tensor([4.0, 5.0, 0]) / 3)  # every row with that target (not the None row)
    assert torch.isnan(got[2]).all()
    with pytest.raises(ValueError, match="residuals must be"):
        bank.add([a], torch.zeros(2, 3))


def test_a_fact_without_a_start_is_optimised_exactly_as_without_init(tiny):
    model, tok = tiny
    plain = compute_residuals(model, tok, FACTS[:3], 2, **KW)
    init = torch.full((3, plain.shape[1]), float("nan"))
    init[1] = plain[1]
    stats: dict = {}
    from neuraldb.editing import compute_keys_and_residuals

    _, warm = compute_keys_and_residuals(model, tok, FACTS[:3], 2, init=init, warm_steps=1, stats=stats, **KW)
    # equal up to rounding: fact 1 leaving the batch early changes the shapes of the others' matrix products
    torch.testing.assert_close(warm[[0, 2]], plain[[0, 2]], atol=1e-7, rtol=1e-6)
    assert stats["steps"] == [4, 1, 4]  # the started fact takes warm_steps
    with pytest.raises(ValueError, match="init must be"):
        compute_keys_and_residuals(model, tok, FACTS[:3], 2, init=init[:2], **KW)


def test_edit_warm_starts_from_the_database_it_appends_to(tiny):
    model, tok = tiny
    first, again = FACTS[0], Fact("Toko Yasuda", FACTS[0].prompt, FACTS[0].target_new)
    db = edit(model, tok, [first], layer=2, progress=False, warm_start=True, warm_steps=1, **KW)
    cold: dict = {}
    edit(model, tok, [again], layer=2, progress=False, stats=cold, **KW)
    warm: dict = {}
    edit(model, tok, [again, FACTS[1]], db=db, progress=False, stats=warm)
    assert db.config["warm_start"] is True and cold["steps"] == [4]
    assert warm["steps"] == [1, 4]  # the fact with a start in db takes warm_steps; the other the full budget
    off = edit(model, tok, [first], layer=2, progress=False, warm_start=False, **KW)
    stats: dict = {}
    edit(model, tok, [again], db=off, progress=False, stats=stats)
    assert stats["steps"] == [4]
    assert torch.equal(off.values[-1], edit(model, tok, [again], layer=2, progress=False, **KW).values[0])
