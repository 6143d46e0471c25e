"""The Triton and CUDA backends on a GPU against the reference: the full matrix, 1M keys, CUDA graphs, compile.

Skipped without a CUDA device. Most tests run with the Triton autotuner off (``NEURALDB_TRITON_AUTOTUNE=0``, a
fixed config per path) so that the matrix does not autotune dozens of shape keys; ``test_every_triton_config``
runs each config the autotuner may pick, and the CUDA-graph, compile and large-database tests keep autotuning on.
Run: ``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from retrieval_checks import adversarial_cases, assert_matches_reference, use_config

import neuraldb_kernels
from neuraldb_kernels import backends

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
GPU_BACKENDS = ("triton", "cuda")


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    reason = backends.BACKENDS[request.param].unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    # Traced and captured calls (compile, opcheck) pick their kernel from the configuration when they run.
    use_config(request, backend=request.param)
    return request.param


@pytest.fixture
def no_autotune(request):
    use_config(request, triton_autotune=False)


def run(backend, q, keys, values, gamma):
    return neuraldb_kernels.gated_retrieval(q, keys, values, gamma, backend=backend)


def random_db(m, d1, d2, kdtype=torch.float16, vdtype=torch.float16, seed=0, chunk=1 << 18):
    """Unit fp16 keys built in chunks (1M x 14336 would need 57 GB as one fp32 tensor)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    keys = torch.empty(m, d1, dtype=kdtype, device=DEV)
    for s in range(0, m, chunk):
        n = min(chunk, m - s)
        keys[s : s + n] = torch.nn.functional.normalize(torch.randn(n, d1, device=DEV, generator=g), dim=1)
    values = torch.randn(m, d2, device=DEV, generator=g).to(vdtype)
    return keys, values


def near(keys, rows, noise=0.5, dtype=torch.float16, seed=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    rows = torch.as_tensor(rows, device=DEV)
    q = (
        keys[rows].float()
        + noise * torch.randn(len(rows), keys.shape[1], device=DEV, generator=g) / keys.shape[1] ** 0.5
    )
    return (3 * q).to(dtype)


# ---- the matrix -----------------------------------------------------------------------------------------------------

_CASE_ARGS = {"t": 7, "key_dtypes": (torch.float16, torch.bfloat16, torch.float32)}
# The names from a tiny instance (collection stays cheap on CPU-only machines); the real cases are built once.
CASE_NAMES = [c.name for c in adversarial_cases(m=8, d1=8, d1_odd=7, d2=2, **_CASE_ARGS)]


@functools.lru_cache(maxsize=1)
def _cases():
    return {c.name: c for c in adversarial_cases(m=10_037, d1=1024, d1_odd=1537, d2=64, **_CASE_ARGS)}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_adversarial_cases(backend, name, no_autotune):
    c = _cases()[name].to(DEV)
    assert_matches_reference(
        run(backend, c.queries, c.keys, c.values, c.gamma), c.queries, c.keys, c.values, c.gamma, tol=c.tol
    )


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 9, 16, 17, 64, 65, 128, 300, 2048])
@pytest.mark.parametrize(
    "qdtype,kdtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float16),
    ],
    ids=str,
)
def test_query_counts_and_dtypes(backend, t, qdtype, kdtype, no_autotune):
    keys, values = random_db(20_011, 4096, 128, kdtype)
    rows = torch.randint(0, keys.shape[0], (t,), generator=torch.Generator().manual_seed(t))
    q = near(keys, rows, dtype=qdtype)
    assert_matches_reference(run(backend, q, keys, values, 0.6), q, keys, values, 0.6)


@pytest.mark.parametrize("t", [1, 16, 128])
def test_one_million_keys_d4096(backend, t):
    keys, values = random_db(1_000_000, 4096, 64)
    # Exact duplicates far apart (different splits): the first copy must win.
    keys[999_999] = keys[123_456]
    keys[700_001] = keys[123_456]
    rows = [123_456, 999_999, 500_000, 0] * (t // 4) + [123_456, 999_999, 7, 654_321][: t % 4]
    q = near(keys, rows[:t], noise=0.2)
    out, idx, score = run(backend, q, keys, values, 0.5)
    assert_matches_reference((out, idx, score), q, keys, values, 0.5)
    assert 999_999 not in idx.tolist()


@pytest.mark.parametrize("t", [1, 16, 2048])
def test_llama_width_d14336(backend, t):
    keys, values = random_db(100_000, 14336, 32)
    rows = torch.randint(0, keys.shape[0], (t,), generator=torch.Generator().manual_seed(3))
    q = near(keys, rows, dtype=torch.bfloat16)
    assert_matches_reference(run(backend, q, keys, values, 0.65), q, keys, values, 0.65)


def test_every_triton_config():
    reason = backends.BACKENDS["triton"].unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)
    from neuraldb_kernels import triton_kernel as tk

    keys, values = random_db(5_003, 512, 16)
    for kind, configs, t, bucket in (
        ("row", tk._CONFIGS_ROW, 1, 1),
        ("decode", tk._CONFIGS_DECODE, 11, 16),
        ("prefill", tk._CONFIGS_PREFILL, 200, 256),
    ):
        for qd, kd in ((torch.float16, torch.float16), (torch.float32, torch.float16), (torch.float32, torch.float32)):
            k = keys.to(kd)
            q = near(keys, torch.arange(t) * 17 % 5_003, dtype=qd)
            split, ieee = tk._split_q(qd, kd), kd == torch.float32
            for c in tk._prune(configs, {}, T_BUCKET=bucket, SPLIT_Q=split, IEEE=ieee):
                cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                res = tk.gated_retrieval_triton(q, k, values, 0.5, config=cfg)
                assert_matches_reference(res, q, k, values, 0.5)


def test_triton_tunes_each_split_length_on_its_own():
    # One config for all split lengths was tuned on whichever came first: after 16-key splits, 100k-1M keys ran at
    # 1.25x the read floor (H200, d1 = 14336) instead of 0.95-0.99x.
    reason = backends.BACKENDS["triton"].unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)
    from neuraldb_kernels import triton_kernel as tk

    tuned = tk._tuned_scan("row")
    buckets = set()
    for m in (2_000, 100_000):  # 8 KiB rows: splits of 16 and 192 keys
        keys, values = random_db(m, 4096, 16, seed=m)
        _, per = tk.plan_splits(1, m, torch.cuda.get_device_properties(0).multi_processor_count, 4096 * 2)
        q = near(keys, [m // 3])
        assert_matches_reference(run("triton", q, keys, values, 0.5), q, keys, values, 0.5)
        buckets.add(tk.split_bucket(per))
    assert len(buckets) == 2
    tuned_buckets = {k[tuned.keys.index("SPLIT_BUCKET")] for k in tuned.cache if k[tuned.keys.index("D1")] == 4096}
    assert buckets <= tuned_buckets


# ---- the op's plumbing on the GPU -------------------------------------------------------------------------------------


def test_auto_picks_triton_then_cuda():
    dev = torch.device(DEV)
    avail = backends.available_backends(dev)
    assert "torch" in avail
    expected = next(b for b in ("triton", "cuda", "torch") if b in avail)
    assert backends.resolve(None, dev) == expected
    assert backends.resolve(None, dev, 8) == expected
    assert backends.resolve(None, dev, 1) == next(b for b in ("cuda", "triton", "torch") if b in avail)
    if "cuda" in avail:
        with neuraldb_kernels.config.override(backend="cuda"):
            assert backends.resolve(None, dev) == "cuda"


def test_three_d_and_noncontiguous(backend, no_autotune):
    keys, values = random_db(3_001, 768, 40)
    wide = torch.randn(2, 5, 2 * 768, device=DEV, dtype=torch.float16)
    q = wide[..., ::2]  # non-unit stride in the last dim: the op makes it contiguous
    assert_matches_reference(run(backend, q, keys, values, 0.0), q, keys, values, 0.0)
    qt = near(keys, [1, 2, 3]).t().contiguous().t()
    assert_matches_reference(run(backend, qt, keys[:, :], values[:, 3:30], 0.5), qt, keys, values[:, 3:30], 0.5)


def test_side_stream_and_opcheck(backend, no_autotune):
    keys, values = random_db(2_000, 256, 8)
    q = near(keys, [5, 6, 7, 8])
    want = run(backend, q, keys, values, 0.5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = run(backend, q, keys, values, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    torch.library.opcheck(torch.ops.neuraldb.gated_retrieval.default, (q, keys, values, 0.5))


@pytest.mark.parametrize("t", [1, 8, 128])
def test_cuda_graph_capture(backend, t):
    keys, values = random_db(50_000, 1024, 32)
    static_q = near(keys, list(range(t)))
    # Warm up on a side stream first: the first Triton call per shape key autotunes (benchmarks, synchronises).
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run(backend, static_q, keys, values, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(backend, static_q, keys, values, 0.5)
    for rows in (list(range(100, 100 + t)), list(range(49_999, 49_999 - t, -1))):
        new_q = near(keys, rows, seed=rows[0])
        static_q.copy_(new_q)
        graph.replay()
        torch.cuda.synchronize()
        want = run(backend, new_q, keys, values, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(static_out, want))
        assert_matches_reference(tuple(x.clone() for x in static_out), new_q, keys, values, 0.5)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(backend, mode):
    keys, values = random_db(20_000, 512, 512)  # d2 == d1: the residual is added to the hidden state
    torch._dynamo.reset()

    def f(h, k, v):
        out, idx, score = neuraldb_kernels.gated_retrieval(h.float() * 1.5, k, v, 0.5, backend=backend)
        return h.float() + out, idx, score

    compiled = torch.compile(f, fullgraph=True, mode=mode)
    for seed in range(3):
        h = near(keys, torch.arange(6) * (seed + 11), seed=seed)
        got, want = compiled(h, keys, values), f(h, keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
