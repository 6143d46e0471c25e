"""neuraldb.baselines: MEMIT's and AlphaEdit's closed forms against direct least squares, the null-space guarantee,
bitwise restore, input errors, and C0 from a tiny model (issue 25)."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import PATCH_LAYER, assert_bitwise, tiny_model
from neuraldb import baselines
from neuraldb.architectures import down_proj_module

D1, D2, N, N0 = 12, 7, 5, 8


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, D1, generator=g, dtype=torch.float64)
    resid = torch.randn(N, D2, generator=g, dtype=torch.float64)
    k0 = torch.randn(N0, D1, generator=g, dtype=torch.float64)  # N0 < D1: C0 has a null space
    return keys, resid, k0, k0.T @ k0 / N0


def _lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def test_memit_equals_stacked_least_squares():
    keys, resid, k0, c0 = _data()
    lam = 3.0
    # min ||D K - R||^2 + lam ||D K0||^2 / N0, stacked: D^T solves [K^T; sqrt(lam/N0) K0^T] D^T = [R^T; 0]
    a = torch.cat([keys, (lam / N0) ** 0.5 * k0])
    b = torch.cat([resid, torch.zeros(N0, D2, dtype=torch.float64)])
    expected = _lstsq(a, b).T
    got = baselines.memit_delta(keys, resid, c0, lam=lam)
    assert got.dtype == torch.float32 and got.shape == (D2, D1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_previous", [False, True])
def test_alphaedit_equals_stacked_least_squares(with_previous):
    keys, resid, _, c0 = _data()
    l2 = 0.7
    p = baselines.null_space_projector(c0, threshold=1e-8)
    assert round(torch.trace(p).item()) == D1 - N0
    kp = torch.randn(3, D1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) if with_previous else None
    # min over d of ||d P K - R||^2 + l2 ||d P||^2 + ||d P Kp||^2, then Delta = d P (unique although d is not)
    rows = [keys @ p, l2**0.5 * p] + ([kp @ p] if with_previous else [])
    a = torch.cat(rows)
    b = torch.cat([resid, torch.zeros(a.shape[0] - N, D2, dtype=torch.float64)])
    expected = (_lstsq(a, b).T) @ p
    got = baselines.alphaedit_delta(keys, resid, p, l2=l2, previous_kkt=None if kp is None else kp.T @ kp)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_null_space_leaves_preserved_keys_unchanged():
    keys, resid, k0, c0 = _data()
    keys, resid = keys[:3], resid[:3]  # 3 facts fit in the 4-dim null space
    p = baselines.null_space_projector(c0, threshold=1e-8)
    delta = baselines.alphaedit_delta(keys, resid, p, l2=1e-3).double()
    assert delta.abs().max() > 1e-2  # a real update ...
    assert (k0 @ delta.T).abs().max() < 1e-10 * delta.abs().max() * k0.abs().max() * D1 + 1e-6  # ... invisible to K0
    # and in the one-batch limit of small l2 it writes the new keys' residuals (they have a null-space component)
    torch.testing.assert_close((keys @ delta.T), resid, rtol=0, atol=5e-3)


def test_sequential_and_one_batch_updates_both_write_the_residuals():
    keys, resid, _, c0 = _data()
    keys, resid = keys[:3], resid[:3]  # 3 facts fit in the 4-dim null space
    one = baselines.baseline_delta("alphaedit", keys[:2], resid[:2], c0, threshold=1e-8, l2=1e-4)
    seq = baselines.baseline_delta("alphaedit", keys, resid, c0, threshold=1e-8, l2=1e-4, batch=2)
    first = baselines.baseline_delta("alphaedit", keys, resid, c0, threshold=1e-8, l2=1e-4, batch=3)
    assert seq.shape == one.shape == first.shape == (D2, D1)
    torch.testing.assert_close((keys[:2].double() @ one.double().T), resid[:2], rtol=0, atol=1e-2)
    torch.testing.assert_close((keys.double() @ first.double().T), resid, rtol=0, atol=1e-2)
    torch.testing.assert_close((keys.double() @ seq.double().T), resid, rtol=0, atol=1e-2)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda k, r, c: baselines.memit_delta(k[:, :-1], r, c), "c0"),
        (lambda k, r, c: baselines.memit_delta(k, r[:-1], c), "residuals"),
        (lambda k, r, c: baselines.memit_delta(k[:0], r[:0], c), "keys is empty"),
        (lambda k, r, c: baselines.memit_delta(k[0], r, c), "keys must be 2-D"),
        (lambda k, r, c: baselines.alphaedit_delta(k, r, c[:-1]), "projector"),
        (lambda k, r, c: baselines.alphaedit_delta(k, r, c, previous_kkt=c[:3]), "previous_kkt"),
        (lambda k, r, c: baselines.baseline_delta("rome", k, r, c), "method"),
        (lambda k, r, c: baselines.null_space_projector(c[:3]), "c0 must be square"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    keys, resid, _, c0 = _data()
    with pytest.raises(ValueError, match=name):
        call(keys, resid, c0)


def test_weights_edited_changes_then_restores_bitwise():
    model = tiny_model("llama")
    _, module = down_proj_module(model, PATCH_LAYER)
    before = module.weight.detach().clone()
    delta = torch.randn(module.weight.shape) * 1e-3
    with baselines.weights_edited(model, PATCH_LAYER, delta):
        assert not torch.equal(module.weight, before)
        torch.testing.assert_close(module.weight.detach(), before + delta)
    assert_bitwise(module.weight.detach(), before)
    with pytest.raises(RuntimeError, match="boom"), baselines.weights_edited(model, PATCH_LAYER, delta):
        raise RuntimeError("boom")
    assert_bitwise(module.weight.detach(), before)
    with pytest.raises(ValueError, match="delta must be"), baselines.weights_edited(model, PATCH_LAYER, delta.T):
        pass


def test_key_second_moment_on_a_tiny_model_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")

    class Tok:
        pad_token_id = 0

    ids = [int(i) for i in torch.randint(3, 100, (50,), generator=torch.Generator().manual_seed(0))]
    c0 = baselines.key_second_moment(model, Tok(), PATCH_LAYER, ids, window=16)
    _, module = down_proj_module(model, PATCH_LAYER)
    d1 = module.weight.shape[1]
    assert c0.shape == (d1, d1)
    torch.testing.assert_close(c0, c0.T)
    assert torch.linalg.eigvalsh(c0.double()).min() > -1e-6
    assert len(list((tmp_path / "baselines").glob("c0-*.safetensors"))) == 1
    again = baselines.key_second_moment(model, Tok(), PATCH_LAYER, ids, window=16)
    assert_bitwise(again, c0)
