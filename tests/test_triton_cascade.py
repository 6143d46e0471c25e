"""The Triton cascade of ``gated_retrieval_prefiltered`` (neuraldb_kernels.triton_cascade) under the Triton
interpreter: bitwise the plain Triton scan wherever its gate opens (same idx, score, residual; ``-1, -inf``, zeros
where it stays closed), and the reference pre-filter's idx and residual, on the shared adversarial cases, heavy-tailed
keys, ties across splits and tiles, a key exactly at its bound, and keys that the stages provably rule out.

As in test_triton_interpret.py, a normal run holds one test that re-runs this file in a subprocess with
``TRITON_INTERPRET=1`` (``triton.jit`` reads it at import), plus host-side checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from retrieval_checks import adversarial_cases, near_queries, run_under_interpreter, unit_keys

from neuraldb_kernels.prefilter import _gamma_n

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]


if not INTERPRETING:

    def test_cascade_under_the_interpreter():
        """Runs the interpreter tests below in a subprocess with TRITON_INTERPRET=1 (under a minute on 2 cores)."""
        run_under_interpreter(__file__)

    def test_rank_margin_covers_the_documented_terms():
        from neuraldb_kernels.triton_cascade import rank_margin

        for d1 in (5, 64, 1536, 14336, 65535):
            assert rank_margin(d1) >= 2.01 * _gamma_n(d1 + 1) + 2 * _gamma_n(d1) + 2.0**-16

    def test_policy_sends_cuda_decode_to_the_cascade_only_when_asked():
        from neuraldb_kernels import PrefilterPolicy

        on = PrefilterPolicy(gpu=True)
        for backend in ("triton", "cuda"):
            assert not PrefilterPolicy().wants_sketch(backend, 10_000, 1, 0.65)
            assert on.wants_sketch(backend, 10_000, 1, 0.65) and on.wants_sketch(backend, 10_000, 8, 0.65)
            assert not on.wants_sketch(backend, 500, 1, 0.65) and not on.wants_sketch(backend, 10_000, 9, 0.65)
        assert not on.wants_sketch("torch", 10_000, 1, 0.65)
        assert on.wants_sketch("cpu", 10_000, 1, 0.65) == PrefilterPolicy().wants_sketch("cpu", 10_000, 1, 0.65)

else:
    import neuraldb_kernels
    from neuraldb_kernels import config, extension
    from neuraldb_kernels.prefilter import build_signs, build_sketch, gated_retrieval_prefiltered_reference
    from neuraldb_kernels.reference import score_error_bound
    from neuraldb_kernels.triton_cascade import gated_retrieval_prefiltered_triton
    from neuraldb_kernels.triton_kernel import gated_retrieval_triton

    def _as_prefiltered(plain, gamma):
        """The plain op's output under the pre-filtered contract: closed rows report no key."""
        out, idx, score = plain
        open_ = (score > torch.tensor(gamma, dtype=torch.float32)) & (idx >= 0)
        return out, torch.where(open_, idx, -1), torch.where(open_, score, float("-inf"))

    def check(q, keys, values, gamma, *, signs=(False, True), vs_reference=True, **kw):
        """The cascade (without and with the sign stage) against the plain Triton scan with the same split and config
        (bitwise) and the reference pre-filter (idx and out exactly, score within the backends' bound; not where the
        best score is within that bound of gamma, where the float64 reference may gate otherwise)."""
        sketch = build_sketch(keys)
        want = _as_prefiltered(gated_retrieval_triton(q, keys, values, gamma, **kw), gamma)
        results = []
        for with_signs in signs:
            sg = build_signs(keys) if with_signs else None
            got = gated_retrieval_prefiltered_triton(q, keys, values, gamma, sketch, sg, **kw)
            for name, a, b in zip(("out", "idx", "score"), got, want):
                assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from the plain scan ({with_signs=})"
            results.append(got)
            if not vs_reference:
                continue
            ref = gated_retrieval_prefiltered_reference(q, keys, values, gamma, sketch, sg)
            assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]), (got[1], ref[1])
            both = got[1] >= 0
            assert ((got[2][both] - ref[2][both]).abs() <= score_error_bound(keys.shape[1])).all()
        return results[-1]

    NAMES = {
        "random-qtorch.float32-ktorch.float16",
        "random-qtorch.bfloat16-ktorch.bfloat16",
        "random-qtorch.float16-ktorch.bfloat16",
        "T=1",
        "values-bf16",
        "m=1",
        "m=0",
        "odd-d1",
        "all-below-gamma",
        "exact-ties",
        "all-keys-equal",
        "score-at-gamma-qtorch.bfloat16",
        "score-just-above-gamma",
        "zero-rows-gamma-neg",
        "non-finite-query-rows-qtorch.float32",
    }
    CASES = [c for c in adversarial_cases(m=333, d1=128, d1_odd=131, d2=12, t=5) if c.name in NAMES]

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_adversarial_case(case):
        check(case.queries, case.keys, case.values, case.gamma)

    def test_non_finite_key_rows():
        case = next(c for c in adversarial_cases(m=40, d1=64, d2=4, t=3) if c.name == "non-finite-key-rows")
        check(case.queries, case.keys, case.values, case.gamma, signs=(True,))

    @pytest.mark.parametrize("t", [1, 3, 16])
    @pytest.mark.parametrize("qdtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_heavy_tailed_keys(t, qdtype):
        # Like SmolLM2's down_proj inputs: a few coordinates per key far above the rest (the outliers the sign rows
        # store apart), an odd d1 (tails in d) and an m that is no multiple of the tile.
        g = torch.Generator().manual_seed(t)
        k = torch.randn(517, 200, generator=g)
        k *= torch.where(torch.rand(517, 200, generator=g) < 0.03, 12.0, 1.0)
        keys = torch.nn.functional.normalize(k, dim=1).half()
        q = near_queries(keys, t, 0.6, qdtype, generator=g)
        q[t // 2] = torch.randn(200, generator=g).to(qdtype)  # a row whose gate stays closed
        _, idx, _ = check(q, keys, torch.randn(517, 6, generator=g).half(), 0.65)
        assert (idx >= 0).sum() >= t - 1 and idx[t // 2] == -1

    @pytest.mark.parametrize(
        "kw",
        [
            {"config": {"BLOCK_T": 1, "BLOCK_N": 16, "BLOCK_D": 64}, "num_splits": 5},
            {"config": {"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_D": 64}, "num_splits": 3},
            {"num_splits": 30},
        ],
        ids=["fma-rows", "decode-block", "many-splits"],
    )
    def test_ties_across_splits_and_tiles(kw):
        g = torch.Generator().manual_seed(4)
        keys = unit_keys(350, 64, generator=g)
        for j in (330, 151, 149, 3):
            keys[j] = keys[150]
        q = keys[150].float().repeat(3, 1) * torch.tensor([[1.0], [0.1], [7.0]])
        _, idx, _ = check(q, keys, torch.randn(350, 8, generator=g).half(), 0.5, **kw)
        assert idx.tolist() == [3, 3, 3]

    def test_every_key_a_candidate_at_gamma_minus_one():
        g = torch.Generator().manual_seed(6)
        keys = unit_keys(300, 96, generator=g)
        q = torch.cat([torch.randn(2, 96, generator=g), -keys[:1].float()])
        _, idx, _ = check(q, keys, torch.randn(300, 4, generator=g), -1.0)
        assert (idx >= 0).all()

    def test_key_at_its_bound_is_kept_and_lost_when_r_is_understated():
        from test_prefilter_signs import _tight_case

        keys, q = _tight_case(0)
        values = torch.randn(keys.shape[0], 8)
        score = gated_retrieval_triton(q, keys, values, -1.0)[2][0]
        gamma = float(torch.nextafter(score, torch.tensor(-1.0)))  # one fp32 step below key 0's score
        _, idx, _ = check(q, keys, values, gamma, vs_reference=False)
        assert idx.tolist() == [0]
        _, idx, _ = check(
            q, keys, values, float(score), vs_reference=False
        )  # exactly at gamma: closed (the gate is strict)
        assert idx.tolist() == [-1]
        # r stored 10% low: the sign stage now rules key 0 out, although its score passes.
        signs = build_signs(keys)
        r = signs[:1, 4:8].contiguous().view(torch.float32)
        signs[:1, 4:8] = (r * 0.9).view(torch.uint8)
        res = gated_retrieval_prefiltered_triton(q, keys, values, gamma, build_sketch(keys), signs)
        assert res[1].tolist() == [-1]

    @pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
    def test_key_whose_rows_are_exact(qdtype):
        # Key 7 is +-1/16 in all 256 coordinates: its int4 sketch and its signs (a = 1/16, r = 0) are exact, and so is
        # the int8 query along it, so both bounds sit within their slack (~1e-4) of its score, exactly 1. One fp32
        # step below 1 it must pass both stages; at 1 the gate is closed.
        g = torch.Generator().manual_seed(9)
        keys = unit_keys(300, 256, generator=g)
        keys[7] = torch.where(torch.rand(256, generator=g) < 0.5, 1.0, -1.0) / 16
        q, values = (keys[7:8].float() * 3).to(qdtype), torch.randn(300, 4, generator=g).half()
        below_one = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
        _, idx, score = check(q, keys, values, below_one)
        assert idx.tolist() == [7] and score.tolist() == [1.0]
        assert check(q, keys, values, 1.0)[1].tolist() == [-1]

    def test_each_stage_rules_keys_out():
        # Key 5 is swapped for the query after the rows were built: the plain scan finds it; the cascade must not,
        # since the rows still describe a random key. Then only the int4 stage is stale, then only the sign stage.
        g = torch.Generator().manual_seed(7)
        built = unit_keys(400, 128, generator=g)
        keys = built.clone()
        keys[5] = torch.nn.functional.normalize(torch.randn(128, generator=g), dim=0).half()
        q, values = keys[5:6].float(), torch.randn(400, 4, generator=g).half()
        assert gated_retrieval_triton(q, keys, values, 0.6)[1].tolist() == [5]
        stale_sketch, stale_signs = build_sketch(built), build_signs(built)
        for sketch, signs in (
            (stale_sketch, None),
            (stale_sketch, build_signs(keys)),
            (build_sketch(keys), stale_signs),
        ):
            assert gated_retrieval_prefiltered_triton(q, keys, values, 0.6, sketch, signs)[1].tolist() == [-1]
        assert gated_retrieval_prefiltered_triton(q, keys, values, 0.6, build_sketch(keys))[1].tolist() == [5]

    def test_fp32_keys_and_empty_shapes():
        g = torch.Generator().manual_seed(8)
        keys = unit_keys(250, 80, torch.float32, generator=g)
        check(near_queries(keys, 4, 0.5, torch.float32, generator=g), keys, torch.randn(250, 4, generator=g), 0.6)
        out, idx, score = gated_retrieval_prefiltered_triton(
            torch.randn(0, 80), keys, torch.randn(250, 4), 0.6, build_sketch(keys)
        )
        assert out.shape == (0, 4) and idx.shape == (0,) and score.shape == (0,)

    def test_through_the_op_and_the_cpu_cascade():
        case = next(c for c in CASES if c.name == "random-qtorch.float32-ktorch.float16")
        sketch, signs = build_sketch(case.keys), build_signs(case.keys)
        args = (case.queries, case.keys, case.values, case.gamma, sketch, signs)
        want = gated_retrieval_prefiltered_triton(*args)
        got = neuraldb_kernels.gated_retrieval_prefiltered(*args, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        with config.override(backend="triton"):  # the dispatcher's CPU kernel serves Triton only when forced
            got = torch.ops.neuraldb.gated_retrieval_prefiltered(*args)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        if extension.load() is not None:
            cpu = neuraldb_kernels.gated_retrieval_prefiltered(*args, backend="cpu")
            assert torch.equal(cpu[1], want[1]) and torch.equal(cpu[0], want[0])
            assert ((cpu[2] - want[2]).abs()[want[1] >= 0] <= score_error_bound(case.keys.shape[1])).all()

    def test_database_routes_decode_to_the_cascade(monkeypatch):
        from neuraldb import NeuralKVDatabase

        from neuraldb_kernels import PrefilterPolicy, backends

        calls = []
        real = backends.prefiltered_triton_kernel()
        monkeypatch.setattr(backends, "prefiltered_triton_kernel", lambda: lambda *a: calls.append(1) or real(*a))
        g = torch.Generator().manual_seed(10)
        db = NeuralKVDatabase(64, 4)
        db.add(torch.randn(300, 64, generator=g), torch.randn(300, 4, generator=g))
        q = torch.cat([db.keys[[5, 200]].float() * 2, torch.randn(1, 64, generator=g)])
        want = db.retrieve_residuals(q, 0.6, backend="triton")  # the default policy: the plain scan
        assert db.sketch is None and not calls
        db.prefilter_policy = PrefilterPolicy(min_keys=100, gpu=True)
        got = db.retrieve_residuals(q, 0.6, backend="triton")
        assert calls and db.sketch is not None and torch.equal(got, want) and got[:2].any(dim=1).all()
