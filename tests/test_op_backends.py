"""Every CPU backend of ``gated_retrieval`` (and every kernel of the C++ backend) against the reference.

The C++ backend runs once per kernel this CPU supports (``NEURALDB_CPU_ISA``: amx, avx512, avx2, scalar), so the
AMX pre-filter, the AVX-512/AVX2 fp32 scans and the portable fallback are all checked on one machine. The
comparison rule is ``retrieval_checks.assert_matches_reference``: results may differ from the reference only
where two scores, or a score and gamma, are within 1e-3; everywhere else idx, gate and out must match exactly.
(The Triton backend has its own tests, under the Triton interpreter.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from retrieval_checks import adversarial_cases, assert_matches_reference, near_queries, unit_keys, use_config

import neuraldb_kernels
from neuraldb_kernels import config, extension


def _cpu_kernels() -> list[str]:
    ext = extension.load()
    return list(ext.cpu_isas()) if ext is not None else []


# "torch" runs the reference through the op (flattening, strides, custom-op plumbing); "cpu-<isa>" the C++ kernel.
VARIANTS = ["torch"] + [f"cpu-{isa}" for isa in _cpu_kernels()]
VARIANTS += [b for b in neuraldb_kernels.available_backends("cpu") if b not in ("torch", "cpu", "triton")]


def _split(variant: str) -> tuple[str, dict[str, str]]:
    """Backend name for ``variant``, and the kernel configuration that picks its kernel."""
    if variant.startswith("cpu-"):
        return "cpu", {"cpu_isa": variant.removeprefix("cpu-")}
    return variant, {}


def _use(variant: str, request: pytest.FixtureRequest) -> str:
    """Backend name for ``variant``, with the kernel configuration set for the rest of the test."""
    backend, changes = _split(variant)
    use_config(request, **changes)
    return backend


@pytest.fixture(params=VARIANTS)
def backend(request):
    return _use(request.param, request)


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def run(backend, queries, keys, values, gamma, **kw):
    res = neuraldb_kernels.gated_retrieval(queries, keys, values, gamma, backend=backend)
    assert_matches_reference(res, queries, keys, values, gamma, **kw)
    return res


def test_the_extension_serves_cpu_by_default():
    # If the build silently dropped the C++ kernel, every "cpu-*" test below would vanish: make that visible.
    if extension.load() is None:
        pytest.skip(f"extension not built: {extension.missing_reason()}")
    assert neuraldb_kernels.available_backends("cpu")[:2] == ["cpu", "torch"]
    assert "scalar" in _cpu_kernels()


# ---- the adversarial cases of the op issue --------------------------------------------------------------------
CASES = adversarial_cases(
    m=1037, d1=192, d1_odd=1537, d2=24, t=5, key_dtypes=(torch.float16, torch.bfloat16, torch.float32)
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_adversarial_case(backend, case):
    run(backend, case.queries, case.keys, case.values, case.gamma, tol=case.tol)


# ---- shapes around every block size (keys per tile 1..8, 24, 32; query tiles 1..8, 16, 32, group 256) ---------
@pytest.mark.parametrize(
    "t,m,d1",
    [
        (1, 1, 1),
        (1, 9, 15),
        (2, 31, 16),
        (3, 33, 17),
        (4, 47, 31),
        (5, 65, 33),
        (6, 95, 63),
        (7, 97, 64),
        (8, 100, 65),
        (9, 129, 100),
        (16, 150, 32),
        (17, 151, 47),
        (31, 200, 96),
        (33, 257, 96),
        (130, 301, 40),
        (300, 120, 24),
    ],
)
def test_block_edges(backend, t, m, d1):
    g = torch.Generator().manual_seed(t * 1000 + m)
    keys = unit_keys(m, d1, generator=g)
    q = near_queries(keys, t, 0.5, torch.float32, generator=g)
    run(backend, q, keys, torch.randn(m, 7, generator=g).half(), 0.5)


@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_value_and_query_dtypes(backend, qdtype, vdtype):
    g = torch.Generator().manual_seed(7)
    keys = unit_keys(500, 80, generator=g)
    q = near_queries(keys, 9, 0.7, qdtype, generator=g)
    out, _, _ = run(backend, q, keys, torch.randn(500, 6, generator=g).to(vdtype), 0.5)
    assert out.dtype == qdtype


def test_long_rows(backend):
    # d1 of real models (Mistral-7B's MLP is 14336 wide): long fp32 sums, tails after the last full vector.
    g = torch.Generator().manual_seed(11)
    for d1 in (4096, 14336 + 5):
        keys = unit_keys(150, d1, generator=g)
        run(backend, near_queries(keys, 3, 2.0, torch.bfloat16, generator=g), keys, torch.randn(150, 4).half(), 0.5)


def test_leading_dims_and_non_contiguous_views(backend):
    g = torch.Generator().manual_seed(5)
    d1 = 72
    wide = unit_keys(2 * 600, d1 + 8, generator=g)
    keys = torch.nn.functional.normalize(wide[::2, 3 : 3 + d1].float(), dim=1).half()  # copy with unit rows ...
    wide[::2, 3 : 3 + d1] = keys
    keys_view = wide[::2, 3 : 3 + d1]  # ... then the same keys as a row-strided view of a bigger buffer
    assert not keys_view.is_contiguous()
    values = torch.randn(5, 600, generator=g).half().t()  # column-major values
    q = near_queries(keys, 24, 0.5, torch.float32, generator=g)
    q3 = q.reshape(4, 6, d1).transpose(0, 1)  # 3-D and non-contiguous
    out, idx, score = run(backend, q3, keys_view, values, 0.5)
    assert out.shape == (6, 4, 5) and idx.shape == (6, 4) and score.shape == (6, 4)
    ref = neuraldb_kernels.gated_retrieval(q3.contiguous(), keys, values.contiguous(), 0.5, backend=backend)
    for a, b in zip((out, idx, score), ref):
        assert torch.equal(a, b), "a view and its contiguous copy must give the same result"
    # Query rows that are themselves strided (every second column): copied, same answer.
    qq = torch.zeros(24, 2 * d1)
    qq[:, ::2] = q
    run(backend, qq[:, ::2], keys, values, 0.5)


def test_million_keys_small_d1(backend, two_threads):
    g = torch.Generator().manual_seed(2)
    m, d1 = 1_000_000, 16
    keys = unit_keys(m, d1, generator=g)
    keys[m - 1] = keys[m - 3]  # a tie at the very end: the lower index wins
    q = torch.cat([keys[[0, 123_457, m - 3, 2**20 - 1 - 48_576]].float() * 2, torch.randn(2, d1, generator=g)])
    _out, idx, _ = run(backend, q, keys, torch.randn(m, 3, generator=g).half(), 0.5)
    if backend == "cpu":
        assert idx[2] == m - 3


# ---- threads: chunks handed out in turn, ties across chunk and thread boundaries ---------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
@pytest.mark.parametrize("t", [1, 8, 20])
def test_ties_across_threads_and_chunks(backend, request, two_threads, chunk, t):
    use_config(request, cpu_parallel_min_us=0, cpu_chunk=chunk)  # always start the thread team
    g = torch.Generator().manual_seed(chunk + t)
    m = 3001
    keys = unit_keys(m, 48, generator=g)
    for j in (2999, 1500, 33, 31, 7):
        keys[j] = keys[3000]
    q = near_queries(keys, t, 1.0, torch.float32, generator=g)
    q[0] = keys[3000].float() * 3
    _, idx, _ = run(backend, q, keys, torch.randn(m, 4, generator=g).half(), 0.0)
    if backend == "cpu":
        # The C++ kernels score identical rows identically wherever they sit, so the lowest index must win. (The
        # reference's BLAS may round identical rows differently by position, so it only ties up to rounding.)
        assert idx[0] == 7


# ---- the AMX pre-filter: many keys inside its margin, candidate lists that overflow -----------------------------
@pytest.mark.parametrize("tight,blocks", [(0, 1), (1, 1), (1, 3)])
@pytest.mark.parametrize("cap", [1, 2, 128])
def test_prefilter_crowded_margin(request, cap, tight, blocks):
    if "amx" not in _cpu_kernels():
        pytest.skip("no AMX on this CPU")
    backend = _use("cpu-amx", request)
    use_config(request, cpu_amx_cap=cap, cpu_amx_tight=tight, cpu_amx_blocks=blocks)
    g = torch.Generator().manual_seed(cap)
    base = torch.randn(1, 256, generator=g)
    # 2000 keys within ~1e-3 of each other in cosine: bf16 rounding alone cannot order them.
    keys = torch.nn.functional.normalize(base + 0.03 * torch.randn(2000, 256, generator=g), dim=1).half()
    q = torch.cat([base + 0.01 * torch.randn(20, 256, generator=g), torch.randn(20, 256, generator=g)])
    run(backend, q, keys, torch.randn(2000, 8, generator=g).half(), 0.5)
    run(backend, q, keys.float(), torch.randn(2000, 8, generator=g), 0.5)


def test_prefilter_is_exact_where_bf16_would_not_be(request):
    """Keys 0 and 1 are 2.7e-3 apart in fp32 but equal in bf16: the pre-filter's fp32 rescoring must pick key 1.

    The query is 2^-4 (1.0019) on the first 128 coordinates and 2^-4 (0.9981) on the last 128 (unit norm): both
    round to 2^-4 in bf16. Key 1 lives on the first half, key 0 on the second, with equal weights.
    """
    if "amx" not in _cpu_kernels():
        pytest.skip("no AMX on this CPU")
    backend = _use("cpu-amx", request)
    g = torch.Generator().manual_seed(9)
    h = 128
    q = torch.cat([torch.full((h,), 1.0019), torch.full((h,), 0.9981)]) / 16
    c = 1 / h**0.5
    k0 = torch.cat([torch.zeros(h), torch.full((h,), c)])
    k1 = torch.cat([torch.full((h,), c), torch.zeros(h)])
    keys = torch.cat([k0[None], k1[None], unit_keys(500, 2 * h, dtype=torch.float32, generator=g)]).half()
    queries = q.repeat(40, 1)
    qn = torch.nn.functional.normalize(queries, dim=1)
    assert (qn.bfloat16().float() @ keys.bfloat16().float().T).argmax(1).eq(0).all(), "bf16 alone picks key 0"
    assert (qn @ keys.float().T).argmax(1).eq(1).all()
    _, idx, _ = run(backend, queries, keys, torch.randn(502, 4).half(), 0.5)
    assert idx.eq(1).all()


# ---- random inputs, fixed example budget -------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz(data):
    t = data.draw(st.integers(0, 40), label="T")
    m = data.draw(st.integers(0, 400), label="m")
    d1 = data.draw(st.integers(1, 70), label="d1")
    d2 = data.draw(st.integers(1, 9), label="d2")
    qd, kd, vd = (data.draw(st.sampled_from(DTYPES), label=n) for n in ("qdtype", "kdtype", "vdtype"))
    gamma = data.draw(st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), st.floats(-1, 1)), label="gamma")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    keys = unit_keys(m, d1, kd, generator=g)
    if m > 1 and data.draw(st.booleans(), label="duplicates"):
        src = torch.randint(0, m, (max(1, m // 10),), generator=g)
        dst = torch.randint(0, m, (src.numel(),), generator=g)
        keys[dst] = keys[src]
    q = near_queries(keys, t, 1.0, qd, generator=g) if m > 0 else torch.randn(t, d1, generator=g).to(qd)
    if t > 0 and data.draw(st.booleans(), label="zero rows"):
        q[:: max(1, t // 3)] = 0
    values = torch.randn(m, d2, generator=g).to(vd)
    lead = data.draw(st.sampled_from([(t,), (1, t), (t, 1)]), label="leading dims")
    q = q.reshape(*lead, d1)
    for variant in VARIANTS:
        backend, changes = _split(variant)
        with config.override(**changes):
            res = neuraldb_kernels.gated_retrieval(q, keys, values, gamma, backend=backend)
        assert_matches_reference(res, q, keys, values, gamma)
