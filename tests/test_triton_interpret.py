"""The Triton kernel on the CPU under the Triton interpreter, against the reference, with the adversarial cases.

``triton.jit`` decides at import time whether it interprets (``TRITON_INTERPRET=1``), and that setting would leak
into every other test of a pytest run. So in a normal run this file holds one test that re-runs this same file in
a subprocess with ``TRITON_INTERPRET=1``; there (or when you run it that way yourself:
``TRITON_INTERPRET=1 pytest tests/test_triton_interpret.py``) it holds the real tests. The host-side logic (split
plan, buckets, config pruning) and the comparison helper's own checks run in the normal process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from retrieval_checks import adversarial_cases, assert_matches_reference, run_under_interpreter

from neuraldb_kernels.reference import gated_retrieval_reference

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]


if not INTERPRETING:

    def test_triton_kernel_under_the_interpreter():
        """Runs the interpreter tests below in a subprocess with TRITON_INTERPRET=1 (about a minute on 2 cores)."""
        run_under_interpreter(__file__)

    # ---- host-side logic, no interpreter needed ----------------------------------------------------------------

    def test_plan_splits_fills_the_gpu_and_covers_the_keys():
        from neuraldb_kernels.triton_kernel import plan_splits

        for t, m, sms in [
            (1, 100_000, 132),
            (16, 100_000, 132),
            (2048, 100_000, 132),
            (1, 10, 132),
            (3, 1, 4),
            (1, 1_000_000, 132),
            (128, 10_000, 132),
            (5, 1037, 4),
        ]:
            for key_bytes in (2, 128, 8192, 28672):
                splits, per = plan_splits(t, m, sms, key_bytes)
                assert splits >= 1 and per >= 1
                assert (splits - 1) * per < m <= splits * per, (t, m, sms, splits, per)  # no empty split
                assert per % 16 == 0 or splits == 1 or per >= m
        wide = 14336 * 2  # Llama-3-8B's d1 in fp16
        assert plan_splits(1, 100_000, 132, wide)[0] >= 132 * 2  # decode: several programs per SM from the keys alone
        assert 16 * plan_splits(2048, 100_000, 132, wide)[0] >= 132  # prefill: row blocks x splits cover every SM
        # Wide rows split finer: 10k such keys in 64-key splits were 157 programs for 132 SMs (1.7x the read floor on
        # an H200); 2k were 32. Narrow rows keep 64-key splits, so the interpreter's tests still cross splits.
        assert plan_splits(1, 10_000, 132, wide) == (313, 32)
        assert plan_splits(1, 2_000, 132, wide) == (125, 16)
        assert plan_splits(1, 10_000, 132, 128) == (157, 64)
        assert plan_splits(1, 10_000, 132, 3072) == (209, 48)  # d1 = 1536: 128 KiB

    def test_t_bucket():
        from neuraldb_kernels.triton_kernel import t_bucket

        assert [t_bucket(t) for t in (1, 2, 16, 17, 64, 65, 256, 1000, 1024, 1025, 4096, 10**6)] == [
            1,
            16,
            16,
            64,
            64,
            256,
            256,
            1024,
            1024,
            4096,
            4096,
            4096,
        ]

    def test_config_pruning_keeps_a_config_for_every_path():
        from neuraldb_kernels import triton_kernel as tk

        for configs, buckets in (
            (tk._CONFIGS_ROW, (1,)),
            (tk._CONFIGS_DECODE, (16,)),
            (tk._CONFIGS_PREFILL, (64, 256, 1024, 4096)),
        ):
            for bucket in buckets:
                for split in (False, True):
                    for ieee in (False, True):
                        kept = tk._prune(configs, {}, T_BUCKET=bucket, SPLIT_Q=split, IEEE=ieee)
                        assert kept, (bucket, split, ieee)
                        for c in kept:
                            assert c.kwargs["BLOCK_T"] <= max(64, bucket)

    def test_auto_on_cuda_resolves_without_a_gpu():
        from neuraldb_kernels import backends, config, extension

        cuda = torch.device("cuda", 0)
        assert backends.resolve(None, cuda) == "triton"  # triton is installed (importorskip above)
        ext = extension.load()
        with config.override(backend="cuda"):
            if ext is not None and hasattr(ext, "gated_retrieval_cuda"):
                assert backends.resolve(None, cuda) == "cuda"
            else:
                with pytest.raises(RuntimeError, match="cuda"):
                    backends.resolve(None, cuda)

    def test_cuda_graph_traces_with_fake_tensors():
        # What torch.compile sees on a GPU, traced here without one: fake CUDA inputs, the op resolved to the
        # Triton backend and kept as one opaque node, output metadata from the fake implementation.
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx

        import neuraldb_kernels

        with FakeTensorMode():
            q = torch.empty(2, 5, 64, device="cuda", dtype=torch.bfloat16)
            k = torch.empty(1000, 64, device="cuda", dtype=torch.float16)
            v = torch.empty(1000, 32, device="cuda", dtype=torch.float16)

        def f(q, k, v):
            out, idx, score = neuraldb_kernels.gated_retrieval(q, k, v, 0.5)
            return out * 2, idx, score

        gm = make_fx(f, tracing_mode="fake")(q, k, v)
        calls = [n for n in gm.graph.nodes if n.target is torch.ops.neuraldb.gated_retrieval.default]
        # One opaque node and no backend in its arguments: the device picks the kernel when the graph runs.
        assert len(calls) == 1 and len(calls[0].args) == 4
        out, idx, score = (n.meta["val"] for n in gm.graph.find_nodes(op="output")[0].args[0])
        assert out.shape == (2, 5, 32) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
        assert idx.shape == (2, 5) and idx.dtype == torch.int64 and score.dtype == torch.float32

    def test_comparison_helper_catches_wrong_answers():
        g = torch.Generator().manual_seed(1)
        keys = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1).half()
        values = torch.randn(50, 4, generator=g).half()
        q = keys[[3, 9, 20]].float() * 2 + 0.01 * torch.randn(3, 16, generator=g)
        out, idx, score = gated_retrieval_reference(q, keys, values, 0.5)
        assert_matches_reference((out, idx, score), q, keys, values, 0.5)
        bad_idx = idx.clone()
        bad_idx[1] = 0
        with pytest.raises(AssertionError, match="idx differs"):
            assert_matches_reference((values[bad_idx].float(), bad_idx, score), q, keys, values, 0.5)
        with pytest.raises(AssertionError, match="gate"):
            assert_matches_reference((torch.zeros_like(out), idx, score), q, keys, values, 0.5)
        with pytest.raises(AssertionError, match="score differs"):
            assert_matches_reference((out, idx, score - 1e-3), q, keys, values, 0.5)
        with pytest.raises(AssertionError):
            assert_matches_reference((out.half(), idx, score), q, keys, values, 0.5)

else:
    # ---- under TRITON_INTERPRET=1 ---------------------------------------------------------------------------------
    import neuraldb_kernels
    from neuraldb_kernels import triton_kernel as tk
    from neuraldb_kernels.triton_kernel import gated_retrieval_triton

    CASES = adversarial_cases(m=1037, d1=192, d1_odd=131, d2=24, t=5)
    # The four scan paths: plan's choice, fp32 multiply-adds (BLOCK_T = 1), the 16-row decode block, and a
    # prefill-style block (BLOCK_T = 32 in the interpreter), each with the default and with forced splits.
    PATHS = {
        "plan": {},
        "fma-rows": {"config": {"BLOCK_T": 1, "BLOCK_N": 128, "BLOCK_D": 256}},
        "decode-block": {"config": {"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_D": 64}},
        "prefill-block": {"config": {"BLOCK_T": 32, "BLOCK_N": 128, "BLOCK_D": 256}, "num_splits": 3},
        "many-splits": {"num_splits": 7},
    }

    def test_module_was_built_for_the_interpreter():
        assert tk._BUILT_FOR_INTERPRETER

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_adversarial_case(case):
        res = gated_retrieval_triton(case.queries, case.keys, case.values, case.gamma)
        assert_matches_reference(res, case.queries, case.keys, case.values, case.gamma, tol=case.tol)

    @pytest.mark.parametrize("path", [p for p in PATHS if p != "plan"])
    @pytest.mark.parametrize(
        "case",
        [
            c
            for c in CASES
            if c.name
            in {
                "random-qtorch.float32-ktorch.float16",
                "random-qtorch.bfloat16-ktorch.bfloat16",
                "random-qtorch.float16-ktorch.bfloat16",
                "odd-d1",
                "exact-ties",
                "score-at-gamma-qtorch.bfloat16",
                "zero-rows-gamma-neg",
                "T=1",
            }
        ],
        ids=lambda c: c.name,
    )
    def test_every_scan_path(case, path):
        res = gated_retrieval_triton(case.queries, case.keys, case.values, case.gamma, **PATHS[path])
        assert_matches_reference(res, case.queries, case.keys, case.values, case.gamma, tol=case.tol)

    @pytest.mark.parametrize("qdtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_fp32_keys(qdtype):
        g = torch.Generator().manual_seed(3)
        keys = torch.nn.functional.normalize(torch.randn(700, 96, generator=g), dim=1)
        q = (keys[[5, 100, 699]] * 2 + 0.05 * torch.randn(3, 96, generator=g)).to(qdtype)
        values = torch.randn(700, 8, generator=g)
        for kw in ({}, {"config": {"BLOCK_T": 16, "BLOCK_N": 64, "BLOCK_D": 64}}):
            res = gated_retrieval_triton(q, keys, values, 0.5, **kw)
            assert_matches_reference(res, q, keys, values, 0.5)

    @pytest.mark.parametrize("t", [1, 2, 8, 17, 40])
    def test_query_counts(t):
        g = torch.Generator().manual_seed(t)
        keys = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=1).half()
        q = keys[torch.randint(0, 300, (t,), generator=g)].float() + 0.1 * torch.randn(t, 64, generator=g)
        values = torch.randn(300, 12, generator=g).half()
        res = gated_retrieval_triton(q.half(), keys, values, 0.6)
        assert_matches_reference(res, q.half(), keys, values, 0.6)

    def test_ties_across_splits_and_tiles():
        # Duplicates of key 700 at 3 (first split), 699/701 (tile neighbours) and 1030 (last split).
        g = torch.Generator().manual_seed(4)
        keys = torch.nn.functional.normalize(torch.randn(1037, 64, generator=g), dim=1).half()
        for j in (1030, 701, 699, 3):
            keys[j] = keys[700]
        q = keys[700].float().repeat(3, 1) * torch.tensor([[1.0], [0.1], [7.0]])
        values = torch.randn(1037, 8, generator=g).half()
        for kw in (
            {"num_splits": 1},
            {"num_splits": 2},
            {"num_splits": 9},
            {"num_splits": 60},
            {"config": {"BLOCK_T": 1, "BLOCK_N": 16, "BLOCK_D": 64}, "num_splits": 5},
        ):
            out, idx, score = gated_retrieval_triton(q, keys, values, 0.5, **kw)
            assert idx.tolist() == [3, 3, 3], kw
            assert_matches_reference((out, idx, score), q, keys, values, 0.5, tol=None)

    def test_strided_rows_and_empty_shapes():
        g = torch.Generator().manual_seed(5)
        wide = torch.nn.functional.normalize(torch.randn(400, 80, generator=g), dim=1).half()
        keys = wide[:, :72]  # row stride 80
        values = torch.randn(400, 20, generator=g).half()[:, 3:15]  # row stride 20
        q = torch.randn(6, 100, generator=g)[:, 10:82]  # row stride 100
        assert keys.stride(0) == 80 and values.stride(0) == 20 and q.stride(0) == 100
        res = gated_retrieval_triton(q, keys, values, 0.1)
        assert_matches_reference(res, q, keys, values, 0.1)
        out, idx, score = gated_retrieval_triton(q[:0], keys, values, 0.1)
        assert out.shape == (0, 12) and idx.shape == (0,) and score.shape == (0,)

    def test_through_the_op():
        case = next(c for c in CASES if c.name == "random-qtorch.float16-ktorch.float16")
        q3 = case.queries.reshape(1, 5, -1).expand(2, 5, -1)  # 3-D, non-contiguous
        res = neuraldb_kernels.gated_retrieval(q3, case.keys, case.values, case.gamma, backend="triton")
        assert_matches_reference(res, q3, case.keys, case.values, case.gamma)
        res_t = neuraldb_kernels.gated_retrieval(
            case.queries.t().contiguous().t(), case.keys, case.values, case.gamma, backend="triton"
        )
        assert_matches_reference(res_t, case.queries, case.keys, case.values, case.gamma)

    def test_opcheck_and_compile_tracing():
        # On CPU only the tracing paths can be checked: the fake implementation, and that dynamo/AOT autograd
        # keep the custom op opaque inside a fullgraph compile (backend="aot_eager": no inductor codegen here).
        from neuraldb_kernels import config

        case = next(c for c in CASES if c.name == "random-qtorch.float32-ktorch.float16")

        def f(q, k, v):
            out, idx, score = neuraldb_kernels.gated_retrieval(q * 2, k, v, case.gamma, backend="triton")
            return out + 1, idx, score

        # The op's CPU kernel serves Triton (under the interpreter) only where the configuration forces it.
        with config.override(backend="triton"):
            torch.library.opcheck(
                torch.ops.neuraldb.gated_retrieval.default,
                (case.queries, case.keys, case.values, case.gamma),
                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
            )
            torch._dynamo.reset()
            compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
            got = compiled(case.queries, case.keys, case.values)
            want = f(case.queries, case.keys, case.values)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        # A per-call backend the device would not pick cannot travel with the traced op (under fullgraph, dynamo
        # reports the ValueError as unsupported).
        with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match=r"config.override\(backend='triton'\)"):
            torch._dynamo.reset()
            torch.compile(f, fullgraph=True, backend="aot_eager")(case.queries, case.keys, case.values)

    def test_cpu_tensors_need_the_interpreter_flag_at_call_time(monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        case = CASES[0]
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            gated_retrieval_triton(case.queries, case.keys, case.values, 0.5)
