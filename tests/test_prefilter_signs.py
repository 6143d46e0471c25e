"""The 1-bit first stage of the pre-filter (neuraldb_kernels.prefilter.build_signs / sign_bounds): its bound is never
below the score the exact kernel computes, on keys built to make it tight or loose, and the cascade loses a key as
soon as a stored bound is understated (so these tests can fail). The cascade's output against the plain op on the
shared adversarial cases runs in test_prefilter.py (its ``check`` runs both variants)."""

from __future__ import annotations

import re

import pytest
import torch
from retrieval_checks import near_queries, unit_keys, use_config

import neuraldb_kernels
from neuraldb_kernels import prefilter
from neuraldb_kernels.reference import normalize_queries

BACKENDS = [b for b in neuraldb_kernels.available_backends("cpu") if b != "triton"]


def _exact_scores(q, keys):
    """What the exact path computes (fp32 dot of the normalised query), and the true float64 cosine."""
    qn = normalize_queries(q)
    return qn @ keys.float().T, qn.double() @ keys.double().T


def _adversarial_keys(d1: int, g: torch.Generator) -> torch.Tensor:
    m = 64
    k = torch.randn(m, d1, generator=g)
    k[0] = 0
    k[0, d1 // 2] = 1  # one huge coordinate (all of the key)
    k[1] = 1e-3 * torch.randn(d1, generator=g)
    k[1, :3] = torch.tensor([50.0, -40.0, 30.0])  # a few dominant coordinates over a small dense rest
    k[2, ::7] *= 80  # more outliers than the sketch stores apart
    k[3] = torch.sign(torch.randn(d1, generator=g))  # all |k_j| equal: the signs alone are exact
    k[4] = k[3] * torch.rand(d1, generator=g)  # the signs right, the magnitudes random
    k[5:20] *= torch.distributions.StudentT(1.5).sample((15, d1)).abs().clamp(0.01, 100)  # heavy tails
    return torch.nn.functional.normalize(k, dim=1)


@pytest.mark.parametrize("d1", [5, 24, 64, 131, 1536])
@pytest.mark.parametrize("kdtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bound_never_below_the_exact_score(d1, kdtype):
    g = torch.Generator().manual_seed(d1)
    keys = _adversarial_keys(d1, g).to(kdtype)
    signs = prefilter.build_signs(keys)
    # Queries along each key (a cosine near 1, where the gate opens), noisy ones, one along the outliers, random.
    q = torch.cat([keys.float() * 3, near_queries(keys, 16, 0.5, torch.float32, generator=g), torch.randn(4, d1)])
    ub = prefilter.sign_bounds(q, signs, d1)
    fp32, exact = _exact_scores(q, keys)
    assert (ub >= fp32.double()).all() and (ub >= exact).all()
    # Keys aligned with their query pass at any gamma below their score.
    assert (ub.diagonal() >= fp32.diagonal().double()).all() and (fp32.diagonal() > 0.99).all()


def _tight_case(seed: int, d1: int = 256):
    """A query along key 0's residual k - a s - v_J: then q . s = 0 (a is the mean |k_j| off the outliers) and
    q . v_J = 0, so q . k = ||q|| r and only r's rounding and the slack separate the bound from the score. The
    other keys are pushed to -0.5."""
    g = torch.Generator().manual_seed(seed)
    keys = unit_keys(48, d1, generator=g).double()
    s, v, a, _, _ = prefilter._decode_signs(prefilter.build_signs(keys[:1].half()), d1)
    k0 = keys[0].half().double()
    q = k0 - a[0] * s[0] - v[0]
    q = q / q.norm()
    keys[1:] -= (keys[1:] @ q)[:, None] * q
    keys[1:] = torch.nn.functional.normalize(keys[1:], dim=1) * 0.75**0.5 - 0.5 * q
    keys[0] = k0
    return keys.half(), q.float()[None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_at_its_bound_is_kept_and_lost_when_r_is_understated(backend):
    keys, q = _tight_case(0)
    fp32, _ = _exact_scores(q, keys)
    assert int(fp32.argmax()) == 0 and fp32[0, 1:].max() < -0.49
    values = torch.randn(48, 8)
    # One fp32 step below key 0's score as this backend's plain op computes it (the reference's rescoring matmul
    # may be an ulp or two off its plain matmul: 1e-6 there).
    plain = neuraldb_kernels.gated_retrieval(q, keys, values, -1.0, backend=backend)[2][0]
    gamma = float(plain) - 1e-6 if backend == "torch" else float(torch.nextafter(plain, torch.tensor(-1.0)))
    sketch, signs = prefilter.build_sketch(keys), prefilter.build_signs(keys)
    ub = prefilter.sign_bounds(q, signs, keys.shape[1])[0, 0].item()
    assert gamma < ub < gamma + 0.05, "the bound is tight here (up to the int8 query's l1 term)"
    out, idx, _ = neuraldb_kernels.gated_retrieval_prefiltered(q, keys, values, gamma, sketch, signs, backend=backend)
    assert idx.tolist() == [0] and torch.equal(out[0], values[0])
    # r stored 10% low: the first stage now rules key 0 out and the gate stays closed, although its score passes.
    wrong = signs.clone()
    r = wrong[:1, 4:8].contiguous().view(torch.float32)
    wrong[:1, 4:8] = (r * 0.9).view(torch.uint8)
    _, idx_wrong, _ = neuraldb_kernels.gated_retrieval_prefiltered(
        q, keys, values, gamma, sketch, wrong, backend=backend
    )
    assert idx_wrong.tolist() == [-1]


def test_slack_terms_matter_at_the_boundary():
    # Without the l1 term of the int8 query, the bound computed from the quantised query alone misses key 0 in
    # some tight cases: the term is not decoration.
    missed = 0
    for seed in range(20):
        keys, q = _tight_case(seed)
        d1 = keys.shape[1]
        fp32, _ = _exact_scores(q, keys)
        s, v, a, r, _ = prefilter._decode_signs(prefilter.build_signs(keys[:1]), d1)
        qn = normalize_queries(q).double()
        c = (qn.abs().max().float() / 127).double()
        no_l1 = a[0] * c * ((qn / c).round() @ s[0]) + qn @ v[0] + qn.norm() * r[0]
        missed += bool(no_l1 < fp32[0, 0].double())
        assert prefilter.sign_bounds(q, prefilter.build_signs(keys), d1)[0, 0] >= fp32[0, 0].double()
    assert missed > 0


def test_layout_and_errors():
    g = torch.Generator().manual_seed(3)
    keys = _adversarial_keys(131, g).half()
    signs = prefilter.build_signs(keys)
    assert signs.shape == (64, prefilter.sign_row_bytes(131)) and prefilter.sign_row_bytes(1536) == 300
    s, v, a, r, n = prefilter._decode_signs(signs, 131)
    k = keys.double()
    assert torch.equal(s, torch.where(k >= 0, 1.0, -1.0).double())
    top = k.abs().topk(prefilter.SIGN_OUTLIERS, dim=1).indices
    assert torch.equal((v != 0).sum(1) <= prefilter.SIGN_OUTLIERS, torch.ones(64, dtype=torch.bool))
    assert torch.equal(v.gather(1, top), (k.gather(1, top) - a[:, None] * s.gather(1, top)).half().double())
    true_r = (k - a[:, None] * s - v).norm(dim=1)
    assert (r >= true_r).all() and (r <= true_r * (1 + 1e-6) + 1e-30).all()
    assert (n >= k.norm(dim=1)).all() and (n >= v.norm(dim=1)).all()
    # Fewer coordinates than outliers: every coordinate is stored apart (in fp16) and the bound is nearly the score.
    small = unit_keys(10, 5, generator=g)
    ub = prefilter.sign_bounds(small.float(), prefilter.build_signs(small), 5)
    assert (ub.diagonal() - 1).abs().max() < 1e-3
    q = torch.randn(1, 131)
    with pytest.raises(ValueError, match="signs"):
        neuraldb_kernels.gated_retrieval_prefiltered(
            q, keys, torch.randn(64, 4), 0.5, prefilter.build_sketch(keys), signs[:-1]
        )
    with pytest.raises(TypeError, match="signs"):
        neuraldb_kernels.gated_retrieval_prefiltered(
            q, keys, torch.randn(64, 4), 0.5, prefilter.build_sketch(keys), keys
        )
    with pytest.raises(ValueError, match="columns"):
        prefilter.build_signs(torch.zeros(1, 65536))
    # Rows of the right size for a wider key cannot come from build_signs: refused before any scan, in Python and
    # in the C++ op (its integer dots are exact in fp32 only up to 65535 columns).
    wide = torch.nn.functional.normalize(torch.randn(2, 65536), dim=1).half()
    forged = torch.zeros(2, prefilter.sign_row_bytes(65536), dtype=torch.uint8)
    args = (torch.randn(1, 65536), wide, torch.randn(2, 4), 0.5, prefilter.build_sketch(wide), forged)
    with pytest.raises(ValueError, match="signs need keys of at most 65535 columns"):
        neuraldb_kernels.gated_retrieval_prefiltered(*args)
    if "cpu" in BACKENDS:
        from neuraldb_kernels import extension

        with pytest.raises(RuntimeError, match="signs need keys of at most 65535 columns"):
            extension.load().gated_retrieval_prefiltered_cpu(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_keys_and_queries(backend):
    g = torch.Generator().manual_seed(6)
    keys = unit_keys(200, 96, generator=g)
    keys[7, 3] = float("nan")
    keys[9, 0] = float("inf")
    values = torch.randn(200, 4, generator=g)
    q = near_queries(keys, 4, 0.3, torch.float32, generator=g)
    q[0, 1] = float("nan")
    q[3] = keys[7].float()
    sketch, signs = prefilter.build_sketch(keys), prefilter.build_signs(keys)
    ub = prefilter.sign_bounds(q, signs, 96)
    assert ub[0].isnan().all() and ub[:, 7].isnan().all(), "NaN bounds keep their keys"
    plain = neuraldb_kernels.gated_retrieval(q, keys, values, 0.5, backend=backend)
    out, idx, _ = neuraldb_kernels.gated_retrieval_prefiltered(q, keys, values, 0.5, sketch, signs, backend=backend)
    assert torch.equal(out, plain[0])
    opened = plain[2] > 0.5
    assert torch.equal(idx[opened], plain[1][opened])


# "auto" takes AVX512-VNNI for the sign scan where the CPU has it; a forced "avx512" leaves VNNI out.
CASCADE_ISAS = ["auto", "avx512", "avx2", "scalar"] if "cpu" in BACKENDS else []


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ CPU kernel")
@pytest.mark.parametrize("isa", CASCADE_ISAS)
def test_cpu_first_stage_passes_exactly_the_reference_bounds_keys(request, capfd, isa):
    # The C++ first stage against prefilter.sign_bounds, key for key in number: a scan that dropped keys would
    # show here even where the answer survives, and one that let extra keys through (only slower) as well. m and
    # the widths leave partial blocks of keys and of 64-bit groups; T = 3 queries share each key's row.
    from neuraldb_kernels import extension

    if isa != "auto" and isa not in extension.load().cpu_isas():
        pytest.skip(f"{isa} not supported here")
    use_config(request, cpu_isa=isa, cpu_debug=True)
    g = torch.Generator().manual_seed(11)
    for m, d1 in ((61, 200), (5, 131), (203, 1536)):
        k = torch.randn(m, d1, generator=g)
        k[:, ::13] *= 30
        keys = torch.nn.functional.normalize(k, dim=1).half()
        q = near_queries(keys, 3, 2.0, torch.float32, generator=g)
        sketch, signs = prefilter.build_sketch(keys), prefilter.build_signs(keys)
        ub = prefilter.sign_bounds(q, signs, d1)
        if m == 61:  # rows strided by a byte count that is not a multiple of 4 (a slice of a wider buffer)
            wide = torch.zeros(m, signs.shape[1] + 3, dtype=torch.uint8)
            wide[:, : signs.shape[1]] = signs
            signs = wide[:, : signs.shape[1]]
        # Halfway between the middle two bounds: half the (query, key) pairs pass.
        mid = ub.flatten().sort().values[ub.numel() // 2 - 1 : ub.numel() // 2 + 1]
        gamma = float(mid.mean())
        assert not ((ub - gamma).abs() < 1e-6).any(), "no bound this close to gamma: rounding cannot decide"
        capfd.readouterr()
        neuraldb_kernels.gated_retrieval_prefiltered(q, keys, torch.randn(m, 4), gamma, sketch, signs, backend="cpu")
        passed = float(re.search(r"passed signs/query=([0-9.]+)", capfd.readouterr().err).group(1))
        expected = int((ub >= gamma).sum())
        assert 0 < expected < 3 * m and passed * 3 == pytest.approx(expected, abs=0.02), (m, d1)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ CPU kernel")
@pytest.mark.parametrize("isa", CASCADE_ISAS)
def test_cpu_cascade_equals_reference_candidates(request, isa):
    # On heavy-tailed keys (where the first stage passes many) every ISA's cascade returns the plain op's answer.
    from neuraldb_kernels import extension

    if isa != "auto" and isa not in extension.load().cpu_isas():
        pytest.skip(f"{isa} not supported here")
    use_config(request, cpu_isa=isa)
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1500, 200, generator=g)
    k[:, ::23] *= 40
    keys = torch.nn.functional.normalize(k, dim=1).half()
    values = torch.randn(1500, 8, generator=g)
    q = near_queries(keys, 5, 1.5, torch.float32, generator=g)
    sketch, signs = prefilter.build_sketch(keys), prefilter.build_signs(keys)
    for gamma in (0.3, 0.6, 0.9):
        plain = neuraldb_kernels.gated_retrieval(q, keys, values, gamma, backend="cpu")
        out, idx, score = neuraldb_kernels.gated_retrieval_prefiltered(
            q, keys, values, gamma, sketch, signs, backend="cpu"
        )
        assert torch.equal(out, plain[0])
        opened = plain[2] > gamma
        assert torch.equal(idx[opened], plain[1][opened]) and torch.equal(score[opened], plain[2][opened])
