"""Per-row gate thresholds in the op: every path (each CPU backend and kernel, the pre-filtered op, the eager plan,
``retrieve_residuals``) against the specification, on the adversarial cases.

The rule (``neuraldb_kernels.reference``): the argmax is the scan's, over all rows; ``out`` keeps ``values[idx]`` only
where ``score > gamma`` and ``score > thresholds[idx]``. So with thresholds, ``idx`` and ``score`` are the plain
call's, and ``out`` is the plain call's with the rows that fail their own threshold zeroed -- never another row's
residual.
"""

from __future__ import annotations

import pytest
import torch
from retrieval_checks import adversarial_cases, assert_matches_reference
from test_op_backends import VARIANTS, _use

import neuraldb_kernels
from neuraldb_kernels.reference import apply_row_thresholds, gated_retrieval_reference

CASES = adversarial_cases(m=300, d1=64, d1_odd=33, d2=8, t=7)


def _thresholds(case, seed: int = 0) -> torch.Tensor:
    """Thresholds that split the case's open rows: each key's threshold is drawn around the scores its queries get."""
    g = torch.Generator().manual_seed(seed)
    m = case.keys.shape[0]
    t = torch.empty(m).uniform_(0.3, 1.0, generator=g)
    t[torch.rand(m, generator=g) < 0.3] = -1.0  # rows with no threshold of their own
    return t


def _expected(plain, thresholds):
    out, idx, score = plain
    if thresholds.numel() == 0:
        return out
    keep = (idx >= 0) & (score > thresholds[idx.clamp_min(0)])
    return torch.where(keep[..., None], out, torch.zeros((), dtype=out.dtype))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backends_apply_row_thresholds(variant, case, request):
    backend = _use(variant, request)
    thr = _thresholds(case)
    plain = neuraldb_kernels.gated_retrieval(case.queries, case.keys, case.values, case.gamma, backend=backend)
    got = neuraldb_kernels.gated_retrieval(
        case.queries, case.keys, case.values, case.gamma, backend=backend, thresholds=thr
    )
    assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2]), "thresholds must not move idx or score"
    assert torch.equal(got[0], _expected(plain, thr))
    if case.keys.shape[0] == 0:
        return
    # The plain call is checked against the specification elsewhere; here the gate against the thresholded spec.
    ref_out, ref_idx, ref_score = gated_retrieval_reference(
        case.queries.reshape(-1, case.queries.shape[-1]), case.keys, case.values, case.gamma, thr
    )
    far = (ref_score - thr[ref_idx.clamp_min(0)]).abs() > 1e-3
    far &= (ref_score - case.gamma).abs() > 1e-3
    got_open = got[0].reshape(-1, got[0].shape[-1]).ne(0).any(1)
    ref_open = ref_out.ne(0).any(1)
    assert torch.equal(got_open[far], ref_open[far])


def test_the_threshold_gates_the_best_row_only():
    # The best row fails its threshold: the second best, which would pass, is not taken instead.
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6]]), dim=1).half()
    values = torch.tensor([[1.0], [2.0]])
    q = torch.tensor([[1.0, 0.1]])
    out, idx, _ = neuraldb_kernels.gated_retrieval(q, keys, values, 0.5, thresholds=torch.tensor([0.999, -1.0]))
    assert idx.tolist() == [0] and out.tolist() == [[0.0]]
    out, _, _ = neuraldb_kernels.gated_retrieval(q, keys, values, 0.5, thresholds=torch.tensor([0.99, -1.0]))
    assert out.tolist() == [[1.0]]


def test_thresholds_at_or_below_gamma_change_nothing():
    case = CASES[0]
    plain = neuraldb_kernels.gated_retrieval(case.queries, case.keys, case.values, case.gamma)
    low = torch.full((case.keys.shape[0],), case.gamma)
    got = neuraldb_kernels.gated_retrieval(case.queries, case.keys, case.values, case.gamma, thresholds=low)
    assert torch.equal(got[0], plain[0])
    assert_matches_reference(got, case.queries, case.keys, case.values, case.gamma)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_prefiltered_op_applies_row_thresholds(backend):
    if backend not in neuraldb_kernels.available_backends("cpu"):
        pytest.skip(f"no {backend} backend here")
    g = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1).half()
    values = torch.randn(3000, 8, generator=g)
    q = keys[:40].float() + 0.04 * torch.randn(40, 64, generator=g)
    thr = torch.empty(3000).uniform_(0.9, 0.97, generator=g)
    sketch, signs = neuraldb_kernels.build_sketch(keys), neuraldb_kernels.build_signs(keys)
    plain = neuraldb_kernels.gated_retrieval(q, keys, values, 0.65, backend=backend)
    got = neuraldb_kernels.gated_retrieval_prefiltered(
        q, keys, values, 0.65, sketch, signs, backend=backend, thresholds=thr
    )
    expected = _expected(plain, thr)
    assert 0 < int(expected.ne(0).any(1).sum()) < 40, "the case must open some gates and shut others"
    assert torch.equal(got[0], expected)


def test_plan_and_retrieve_residuals_apply_row_thresholds():
    if "cpu" not in neuraldb_kernels.available_backends("cpu"):
        pytest.skip("the plan needs the compiled extension")
    g = torch.Generator().manual_seed(2)
    keys = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1).half()
    values = torch.randn(3000, 8, generator=g)
    q = keys[:12].float() + 0.04 * torch.randn(12, 64, generator=g)
    thr = torch.empty(3000).uniform_(0.9, 0.97, generator=g)
    expected = _expected(neuraldb_kernels.gated_retrieval(q, keys, values, 0.65, backend="cpu"), thr)
    sketch, signs = neuraldb_kernels.build_sketch(keys), neuraldb_kernels.build_signs(keys)
    for sk, sg in ((None, None), (sketch, signs)):
        plan = neuraldb_kernels.plan_retrieval(keys, values, 0.65, sketch=sk, signs=sg, thresholds=thr)
        for rows in (1, 4, 12):  # decode-sized calls take the sketch, larger ones the plain kernel
            got = plan.residuals(q[:rows].view(1, rows, 64))
            want = expected[:rows]
            if not want.any():
                assert got is None
            else:
                assert torch.equal(got.view(rows, 8), want)
        got = neuraldb_kernels.retrieve_residuals(q, keys, values, 0.65, "cpu", sketch=sk, signs=sg, thresholds=thr)
        assert torch.equal(got, expected)
    shut = torch.ones(3000)  # every gate shut by its row's threshold: the plan adds nothing
    assert neuraldb_kernels.plan_retrieval(keys, values, 0.65, thresholds=shut).residuals(q) is None


def test_apply_row_thresholds_on_an_empty_table():
    out = torch.zeros(3, 4)
    idx = torch.full((3,), -1)
    score = torch.full((3,), float("-inf"))
    assert torch.equal(apply_row_thresholds(out, idx, score, torch.empty(0)), out)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        (torch.zeros(5, dtype=torch.float64), "thresholds must have dtype float32"),
        (torch.zeros(4), r"thresholds must have shape \(5,\)"),
        (torch.tensor([0.0, 0.0, 1.5, 0.0, 0.0]), r"in \[-1, 1\]"),
        (torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0]), r"in \[-1, 1\]"),
        ([0.5] * 5, "thresholds must be a torch.Tensor"),
    ],
)
def test_bad_thresholds_are_refused(thresholds, message):
    keys = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).half()
    with pytest.raises((TypeError, ValueError), match=message):
        neuraldb_kernels.gated_retrieval(torch.randn(2, 8), keys, torch.randn(5, 3), 0.5, thresholds=thresholds)
