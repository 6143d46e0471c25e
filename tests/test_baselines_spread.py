"""neuraldb.baselines_spread: MEMIT's spread over layers on a tiny word-level Llama. One layer is the single-layer
update bitwise; the spread writes the target of the database layer's output; the weights come back bitwise; bad
layers are refused before any weight changes (issue 25)."""

from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")

import torch
from _tiny_editing import FACTS, word_llama
from _tiny_models import assert_bitwise
from neuraldb import baselines, baselines_spread
from neuraldb.architectures import down_proj_module
from neuraldb.editing import compute_keys, contexts

DB_LAYER = 2
BARE = {"n_prefixes": 0}  # keys from the bare prompt only: the states the spread's target is read at


@pytest.fixture(scope="module")
def tiny():
    model, tok = word_llama()
    d1 = down_proj_module(model, 0)[1].weight.shape[1]
    g = torch.Generator().manual_seed(0)
    resid = torch.randn(len(FACTS), model.config.hidden_size, generator=g)
    k0 = torch.randn(d1 // 2, d1, generator=g)  # rank d1/2: AlphaEdit's projector has a null space
    c0 = {lay: k0.T @ k0 / k0.shape[0] + (lay + 1) * 1e-3 * torch.eye(d1) for lay in range(4)}
    return model, tok, resid, c0


@pytest.fixture
def no_work(monkeypatch):
    """Any key pass or weight edit fails the test: bad input must be refused before either."""
    import neuraldb.editing

    def fail(*args, **kwargs):
        raise AssertionError("computed keys or edited weights before refusing bad input")

    monkeypatch.setattr(neuraldb.editing, "compute_keys", fail)
    monkeypatch.setattr(baselines, "weights_edited", fail)
    monkeypatch.setattr(baselines_spread, "subject_states", fail)


def _weights(model):
    return {lay: down_proj_module(model, lay)[1].weight.detach().clone() for lay in range(4)}


@pytest.mark.parametrize(("method", "hp"), [("memit", {"lam": 0.5}), ("alphaedit", {"threshold": 1e-2, "l2": 0.3})])
def test_one_layer_is_the_single_layer_update_bitwise(tiny, neuraldb_cache, method, hp):
    model, tok, resid, c0 = tiny
    keys = compute_keys(model, tok, FACTS, DB_LAYER, key_unit_mean=False, n_prefixes=1, prefix_len=2)
    single = baselines.baseline_delta(method, keys, resid, c0[DB_LAYER], **hp)
    got = baselines_spread.multi_layer_deltas(
        model,
        tok,
        FACTS,
        [DB_LAYER],
        resid,
        layer=DB_LAYER,
        method=method,
        c0=c0,
        key_settings={"n_prefixes": 1, "prefix_len": 2},
        **hp,
    )
    assert list(got) == [DB_LAYER]
    assert_bitwise(got[DB_LAYER], single)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("layers", [[1, 2], [0, 1, 2]])
def test_spread_writes_the_target_of_the_database_layer(tiny, method, layers):
    model, tok, resid, c0 = tiny
    before = _weights(model)
    eye = {lay: torch.eye(c.shape[0]) for lay, c in c0.items()}  # full rank: lam -> 0 writes every residual exactly
    hp = {"lam": 1e-8} if method == "memit" else {"threshold": 2.0, "l2": 1e-8}  # the projector is I: all null space
    h0 = baselines_spread.subject_states(model, tok, FACTS, DB_LAYER)
    deltas = baselines_spread.multi_layer_deltas(
        model, tok, FACTS, layers, resid, layer=DB_LAYER, method=method, c0=eye, key_settings=BARE, **hp
    )
    for lay, w in before.items():  # computing the spread leaves the weights as they were
        assert_bitwise(down_proj_module(model, lay)[1].weight.detach(), w)
    assert list(deltas) == layers
    assert all(d.norm() > 1 for d in deltas.values())  # every layer takes a share
    with baselines.weights_edited(model, deltas):
        h1 = baselines_spread.subject_states(model, tok, FACTS, DB_LAYER)
    torch.testing.assert_close(h1, h0 + resid, rtol=0, atol=1e-3)
    # the first layer alone writes only its share: the later layers' updates are needed to reach the target
    with baselines.weights_edited(model, {layers[0]: deltas[layers[0]]}):
        first_only = baselines_spread.subject_states(model, tok, FACTS, DB_LAYER)
    assert (first_only - (h0 + resid)).norm() > 0.2 * resid.norm()
    fit = baselines_spread.target_fit(model, tok, FACTS, DB_LAYER, resid, deltas)
    assert fit["mean_cosine"] > 0.999 and abs(fit["mean_norm_ratio"] - 1) < 1e-3


def test_contexts_are_the_unedited_models_across_layers(tiny, tmp_path, monkeypatch):
    model, tok, resid, c0 = tiny
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(contexts, "_MEMORY", {})
    baselines_spread.multi_layer_deltas(
        model,
        tok,
        FACTS,
        [0, 1, 2],
        resid,
        layer=DB_LAYER,
        method="memit",
        c0=c0,
        key_settings={"n_prefixes": 2, "prefix_len": 2, "seed": 123},
        lam=0.5,
    )
    assert len(list((tmp_path / "prefixes").glob("*.json"))) == 1  # not sampled again from the edited weights


def test_several_layers_change_then_restore_bitwise(tiny):
    model, _, _, _ = tiny
    before = _weights(model)
    g = torch.Generator().manual_seed(1)
    deltas = {lay: torch.randn(before[lay].shape, generator=g) * 1e-2 for lay in (0, 2, 3)}
    with baselines.weights_edited(model, deltas):
        for lay, w in before.items():
            now = down_proj_module(model, lay)[1].weight.detach()
            if lay in deltas:
                torch.testing.assert_close(now, w + deltas[lay])
            else:
                assert_bitwise(now, w)
    for lay, w in before.items():
        assert_bitwise(down_proj_module(model, lay)[1].weight.detach(), w)
    with pytest.raises(RuntimeError, match="boom"), baselines.weights_edited(model, deltas):
        raise RuntimeError("boom")
    bad = {0: deltas[0], 2: deltas[2].T}  # the second is wrong: the first is not left applied either
    with pytest.raises(ValueError, match="delta must be"), baselines.weights_edited(model, bad):
        pass
    with pytest.raises(ValueError, match="not both"), baselines.weights_edited(model, deltas, deltas[0]):
        pass
    for lay, w in before.items():
        assert_bitwise(down_proj_module(model, lay)[1].weight.detach(), w)


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([], "layers must be a non-empty"),
        ("12", "layers must be a non-empty"),
        (2, "layers must be a non-empty"),
        ([1.0, 2], "layers must hold ints"),
        ([True, 2], "layers must hold ints"),
        ([0, 1], "layers must end at the database layer 2"),
        ([1, 0, 2], "layers must be strictly increasing"),
        ([2, 2], "layers must be strictly increasing"),
        ([-1, 2], "layers .* out of range"),
        ([0, 2, 4], "layers .* out of range"),
    ],
)
def test_bad_layers_are_refused_before_any_weight_changes(tiny, no_work, layers, match):
    model, tok, resid, c0 = tiny
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        baselines_spread.multi_layer_deltas(
            model, tok, FACTS, layers, resid, layer=DB_LAYER, method="memit", c0=c0, key_settings=BARE
        )
    for lay, w in before.items():
        assert_bitwise(down_proj_module(model, lay)[1].weight.detach(), w)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "rome"}, "method"),
        ({"residuals": torch.zeros(2, 32)}, "residuals"),
        ({"c0": {1: torch.eye(64), 2: torch.eye(63)}}, "c0 for layer 2"),
    ],
)
def test_bad_arguments_name_themselves(tiny, no_work, kwargs, match):
    model, tok, resid, c0 = tiny
    call = {"residuals": resid, "method": "memit", "c0": c0} | kwargs
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        baselines_spread.multi_layer_deltas(
            model, tok, FACTS, [1, 2], call.pop("residuals"), layer=DB_LAYER, key_settings=BARE, **call
        )
    for lay, w in before.items():
        assert_bitwise(down_proj_module(model, lay)[1].weight.detach(), w)
