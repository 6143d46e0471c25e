"""The op's contract around the kernels: argument errors, backend choice, torch.library / torch.compile, and the
fallback to the reference when the compiled extension is missing."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import warnings

import pytest
import torch
from retrieval_checks import assert_matches_reference, use_config

import neuraldb_kernels
from neuraldb_kernels import backends, config, extension
from neuraldb_kernels.reference import gated_retrieval_reference

CPU_BACKENDS = [b for b in neuraldb_kernels.available_backends("cpu") if b != "triton"]


def inputs(t=3, m=40, d1=16, d2=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(m, d1, generator=g), dim=1).half()
    values = torch.randn(m, d2, generator=g).half()
    q = keys[:t].float() * 2 + 0.01 * torch.randn(t, d1, generator=g)
    return q, keys, values


# ---- argument errors: the type, naming the argument and what was expected ---------------------------------------
@pytest.mark.parametrize(
    "change,exc,words",
    [
        (lambda q, k, v: (q, k[:, :-1], v), ValueError, ["keys", "(m, 16)"]),
        (lambda q, k, v: (q[:, :-1], k, v), ValueError, ["keys", "(m, 15)"]),
        (lambda q, k, v: (q, k, v[:-1]), ValueError, ["values", "(40, d2)"]),
        (lambda q, k, v: (q, k[None], v), ValueError, ["keys", "2-D"]),
        (lambda q, k, v: (q, k[0], v), ValueError, ["keys", "2-D"]),
        (lambda q, k, v: (q, k, v[0]), ValueError, ["values", "2-D"]),
        (lambda q, k, v: (q[0, 0], k, v), ValueError, ["queries", "0-d"]),
        (lambda q, k, v: (q[:, :0], k[:, :0], v), ValueError, ["queries", "d1 >= 1"]),
        (lambda q, k, v: (q.long(), k, v), TypeError, ["queries", "float32/float16/bfloat16", "int64"]),
        (lambda q, k, v: (q, k.to(torch.int8), v), TypeError, ["keys", "int8"]),
        (lambda q, k, v: (q, k, v.int()), TypeError, ["values", "int32"]),
        (lambda q, k, v: (q.to(torch.complex64), k, v), TypeError, ["queries", "complex64"]),
        (lambda q, k, v: (q, k.to(torch.complex64), v), TypeError, ["keys", "complex64"]),
        (lambda q, k, v: (q, k, v.bool()), TypeError, ["values", "bool"]),
        (lambda q, k, v: (q.to(torch.float64), k, v), TypeError, ["queries", "float64"]),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, ["queries", "torch.Tensor"]),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, ["one device", "keys on meta"]),
        (lambda q, k, v: (q.to("meta"), k, v), ValueError, ["one device", "queries on meta"]),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, ["one device", "values on meta"]),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_bad_tensors(change, exc, words):
    q, k, v = change(*inputs())
    with pytest.raises(exc) as info:
        neuraldb_kernels.gated_retrieval(q, k, v, 0.5)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize(
    "gamma,exc",
    [
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (1.0001, ValueError),
        (-1.5, ValueError),
        (10**400, ValueError),  # beyond float's range: float() would raise OverflowError
        ("0.5", TypeError),
        (None, TypeError),
        (True, TypeError),
        (torch.tensor(0.5), TypeError),
    ],
)
def test_bad_gamma(gamma, exc):
    with pytest.raises(exc, match="gamma"):
        neuraldb_kernels.gated_retrieval(*inputs(), gamma)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gamma", [-1, -1.0, 0, 1, 1.0, 0.25])
def test_gamma_bounds_are_accepted(gamma, backend):
    # Accepted, and applied: -1 opens every row's gate (no unit cosine is below it), 1 none (no cosine exceeds it).
    q, k, v = inputs()
    q = torch.cat([q, -q[:1], torch.randn(2, 16, generator=torch.Generator().manual_seed(1))])
    res = neuraldb_kernels.gated_retrieval(q, k, v, gamma, backend=backend)
    assert_matches_reference(res, q, k, v, float(gamma))
    out, idx, score = res
    opened = score > gamma
    if gamma == -1:
        assert opened.all()
    elif gamma == 1:
        assert not opened.any()
    else:
        assert opened[:3].all()
    assert torch.equal(out[opened], v[idx[opened]].float()) and not out[~opened].any()


# ---- backends: names, availability, the environment override ------------------------------------------------------
def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of.*'nope'"):
        neuraldb_kernels.gated_retrieval(*inputs(), 0.5, backend="nope")


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable: .*CUDA tensors.*cpu"):
        neuraldb_kernels.gated_retrieval(*inputs(), 0.5, backend="cuda")


def test_auto_prefers_the_compiled_kernel(monkeypatch):
    # Whether or not the extension is built here: with "cpu" available, "auto" must pick it over the reference, and
    # the op must run it. A recording stand-in serves as the compiled kernel.
    calls = []
    real = backends.BACKENDS["cpu"]
    monkeypatch.setitem(
        backends.BACKENDS,
        "cpu",
        backends.Backend(
            "cpu",
            lambda d: None if d == "cpu" else "CPU only",
            lambda: lambda *a: calls.append(1) or gated_retrieval_reference(*a),
        ),
    )
    monkeypatch.setattr(backends, "_kernels", {})
    cpu = torch.device("cpu")
    assert neuraldb_kernels.available_backends("cpu")[0] == "cpu"
    assert backends.resolve(None, cpu) == backends.resolve("auto", cpu) == backends.resolve(None, cpu, 1) == "cpu"
    neuraldb_kernels.gated_retrieval(*inputs(), 0.5)
    assert calls == [1]
    with config.override(backend="torch"):
        assert backends.resolve(None, cpu) == "torch"
    monkeypatch.setitem(backends.BACKENDS, "cpu", real)
    # And where the extension is built, the real kernel is the one preferred.
    if extension.load() is not None:
        assert neuraldb_kernels.available_backends("cpu")[0] == "cpu"


def _available(monkeypatch, name: str, reason: str | None = None) -> None:
    entry = backends.BACKENDS[name]
    monkeypatch.setitem(backends.BACKENDS, name, dataclasses.replace(entry, unavailable_reason=lambda d: reason))


def test_auto_on_cuda_sends_single_rows_to_the_cuda_kernel(monkeypatch):
    _available(monkeypatch, "triton")
    _available(monkeypatch, "cuda")
    cuda = torch.device("cuda", 0)
    assert backends.resolve(None, cuda, 1) == "cuda"
    assert [backends.resolve(None, cuda, t) for t in (None, 0, 2, 8, 2048)] == ["triton"] * 5
    assert backends.resolve("triton", cuda, 1) == "triton"  # a named backend is never swapped
    with config.override(backend="triton"):
        assert backends.resolve(None, cuda, 1) == "triton"
    _available(monkeypatch, "cuda", "not built")
    assert backends.resolve(None, cuda, 1) == "triton"


def test_configured_backend(monkeypatch):
    cpu = torch.device("cpu")
    with config.override(backend="torch"):
        assert backends.resolve(None, cpu) == "torch"
        assert backends.resolve("auto", cpu) == "torch"
        if "cpu" in CPU_BACKENDS:
            assert backends.resolve("cpu", cpu) == "cpu", "an explicit backend wins over the configuration"
        # The configured backend reaches the op: a kernel that records its calls.
        calls = []
        real = backends.BACKENDS["torch"]
        monkeypatch.setitem(
            backends.BACKENDS,
            "torch",
            backends.Backend("torch", real.unavailable_reason, lambda: lambda *a: calls.append(1) or real.kernel()(*a)),
        )
        monkeypatch.setattr(backends, "_kernels", {})
        neuraldb_kernels.gated_retrieval(*inputs(), 0.5)
        assert calls == [1]
    with config.override(backend="cuda"), pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        neuraldb_kernels.gated_retrieval(*inputs(), 0.5)
    with pytest.raises(ValueError, match="backend must be one of"), config.override(backend="bogus"):
        pass


def test_the_environment_is_read_once(monkeypatch):
    # Every NEURALDB_* switch of the kernels is a field of the configuration, parsed with the variable named on error.
    env = {var: "1" for var, _ in config.ENVIRONMENT.values()} | {
        "NEURALDB_BACKEND": "torch",
        "NEURALDB_CPU_ISA": "avx2",
        "NEURALDB_CPU_PARALLEL_MIN_US": "2.5",
    }
    cfg = config.from_environ(env)
    assert (cfg.backend, cfg.cpu_isa, cfg.cpu_parallel_min_us, cfg.cpu_chunk, cfg.cpu_debug) == (
        "torch",
        "avx2",
        2.5,
        1,
        True,
    )
    assert config.from_environ({}) == config.KernelConfig()
    with pytest.raises(ValueError, match=r"\$NEURALDB_CPU_CHUNK must be an integer, got 'x'"):
        config.from_environ({"NEURALDB_CPU_CHUNK": "x"})
    with pytest.raises(ValueError, match=r"\$NEURALDB_BACKEND must be one of"):
        config.from_environ({"NEURALDB_BACKEND": "bogus"})
    # After the first read, the environment no longer matters: no call pays for reading it.
    before = config.current()
    monkeypatch.setenv("NEURALDB_BACKEND", "bogus")
    monkeypatch.setenv("NEURALDB_CPU_ISA", "sse9")
    assert config.current() is before
    neuraldb_kernels.gated_retrieval(*inputs(), 0.5)


def test_the_cpu_options_reach_the_extension_once_per_change():
    ext = extension.load()
    if ext is None:
        pytest.skip("extension not built")
    default = ext.cpu_options()
    assert default == config.current().cpu_options()
    with config.override(cpu_isa="scalar", cpu_chunk=7, cpu_parallel_min_us=0, cpu_amx_tight=0, cpu_debug=True):
        assert ext.cpu_options() == {
            "isa": "scalar",
            "chunk": 7,
            "parallel_min_us": 0.0,
            "amx_min_t": 12,
            "amx_cap": 512,
            "amx_tight": 0,
            "amx_blocks": 1,
            "debug": True,
        }
    assert ext.cpu_options() == default


def test_cpu_kernel_choice_is_checked():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    with pytest.raises(ValueError, match="NEURALDB_CPU_ISA must be auto, scalar, avx2, avx512 or amx"):
        config.from_environ({"NEURALDB_CPU_ISA": "sse9"})
    ext = extension.load()
    # The C++ side checks the name too, for C++ callers: the next call reports it.
    ext.set_cpu_options(**(config.current().cpu_options() | {"isa": "sse9"}))
    try:
        with pytest.raises(RuntimeError, match="NEURALDB_CPU_ISA must be auto, scalar, avx2, avx512 or amx"):
            neuraldb_kernels.gated_retrieval(*inputs(), 0.5, backend="cpu")
    finally:
        ext.set_cpu_options(**config.current().cpu_options())
    isas = ext.cpu_isas()
    assert isas[-1] == "scalar"
    missing = [i for i in ("amx", "avx512", "avx2") if i not in isas]
    if missing:
        with config.override(cpu_isa=missing[0]), pytest.raises(RuntimeError, match="not supported"):
            neuraldb_kernels.gated_retrieval(*inputs(), 0.5, backend="cpu")


# ---- outputs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_types_and_devices(backend, qdtype):
    q, k, v = inputs()
    out, idx, score = neuraldb_kernels.gated_retrieval(
        q.to(qdtype).reshape(1, 3, 16), k, v.float(), 0.5, backend=backend
    )
    assert out.shape == (1, 3, 5) and out.dtype == qdtype
    assert idx.shape == (1, 3) and idx.dtype == torch.int64
    assert score.shape == (1, 3) and score.dtype == torch.float32
    assert idx.tolist() == [[0, 1, 2]]
    assert torch.equal(out[0], v[:3].to(qdtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_database_and_no_queries(backend):
    q, k, v = inputs()
    out, idx, score = neuraldb_kernels.gated_retrieval(q, k[:0], v[:0], -1.0, backend=backend)
    assert idx.tolist() == [-1, -1, -1] and score.tolist() == [-math.inf] * 3 and not out.any()
    out, idx, score = neuraldb_kernels.gated_retrieval(q[:0], k, v, 0.5, backend=backend)
    assert out.shape == (0, 5) and idx.shape == (0,) and score.shape == (0,)


# ---- torch.library and torch.compile ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    q, k, v = inputs(t=4, m=33, d1=24, d2=3)
    with config.override(backend=backend):  # the op's CPU kernel serves the configured backend
        for args in ((q, k, v, 0.5), (q.half(), k.float(), v.bfloat16(), -0.25), (q, k[:0], v[:0], 0.5)):
            torch.library.opcheck(torch.ops.neuraldb.gated_retrieval.default, args)
        sketch, signs = neuraldb_kernels.build_sketch(k), neuraldb_kernels.build_signs(k)
        for s in (None, signs):
            torch.library.opcheck(torch.ops.neuraldb.gated_retrieval_prefiltered.default, (q, k, v, 0.5, sketch, s))


def test_the_ops_schemas_carry_no_backend():
    # The device picks the kernel (per-device registrations); a backend string would have to travel with every call.
    for name in ("gated_retrieval", "gated_retrieval_prefiltered"):
        schema = getattr(torch.ops.neuraldb, name).default._schema
        assert [a.name for a in schema.arguments][:4] == ["queries", "keys", "values", "gamma"]
        assert not any(str(a.type) == "str" for a in schema.arguments), schema


def test_a_per_call_backend_is_refused_under_a_tracer():
    from torch.fx.experimental.proxy_tensor import make_fx

    if CPU_BACKENDS[0] == "torch":
        pytest.skip("only the reference runs here")
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"config.override\(backend='torch'\)"):
        make_fx(lambda x: neuraldb_kernels.gated_retrieval(x, k, v, 0.5, backend="torch"))(q)
    with config.override(backend="torch"):
        gm = make_fx(lambda x: neuraldb_kernels.gated_retrieval(x, k, v, 0.5, backend="torch"))(q)
        for a, b in zip(gm(q), gated_retrieval_reference(q, k, v, 0.5)):
            assert torch.equal(a, b)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 7, 16), torch.empty(100, 16, dtype=torch.float16), torch.empty(100, 9)
        out, idx, score = neuraldb_kernels.gated_retrieval(q, k, v, 0.5)
    assert out.shape == (2, 7, 9) and idx.shape == (2, 7) and score.shape == (2, 7)
    assert (out.dtype, idx.dtype, score.dtype) == (torch.float32, torch.int64, torch.float32)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = inputs(t=6, m=50, d1=32, d2=4)

    def f(x):
        out, idx, score = neuraldb_kernels.gated_retrieval(x * 1.5, k, v, 0.5)
        return out + 1, idx, score

    compiled = torch.compile(f, fullgraph=True)
    for a, b in zip(compiled(q), f(q)):
        assert torch.equal(a, b)
    q3 = q.reshape(2, 3, 32)
    for a, b in zip(compiled(q3), f(q3)):
        assert torch.equal(a, b)


def _prefiltered_inputs():
    q, k, v = inputs(t=2, m=300, d1=64, d2=4)
    return q, k, v, 0.5, neuraldb_kernels.build_sketch(k), neuraldb_kernels.build_signs(k)


@pytest.mark.parametrize("prefiltered", [False, True])
def test_eager_calls_skip_the_custom_op(prefiltered, monkeypatch):
    # Its dispatch costs more host time than a decode-size kernel; eager callers must not pay it.
    name = "gated_retrieval_prefiltered" if prefiltered else "gated_retrieval"
    args = _prefiltered_inputs() if prefiltered else (*inputs(), 0.5)
    fn = getattr(neuraldb_kernels, name)
    want = fn(*args)

    def dispatched(*a, **kw):
        raise AssertionError(f"an eager call went through torch.ops.neuraldb.{name}")

    monkeypatch.setattr(torch.ops.neuraldb, name, dispatched)
    for a, b in zip(fn(*args), want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("prefiltered", [False, True])
def test_tracers_record_the_custom_op(prefiltered):
    # make_fx with real tensors runs eagerly under a dispatch mode: a direct kernel call there would bake its
    # result into the graph as a constant instead of recording the op.
    from torch.fx.experimental.proxy_tensor import make_fx

    name = "gated_retrieval_prefiltered" if prefiltered else "gated_retrieval"
    args = _prefiltered_inputs() if prefiltered else (*inputs(), 0.5)
    q, rest = args[0], args[1:]
    fn = getattr(neuraldb_kernels, name)
    gm = make_fx(lambda x: fn(x, *rest), tracing_mode="real")(q)
    op = getattr(torch.ops.neuraldb, name).default
    assert [n.target for n in gm.graph.nodes].count(op) == 1
    other = torch.flip(q, dims=[0])
    for a, b in zip(gm(other), fn(other, *rest)):
        assert torch.equal(a, b)


def test_vmap_goes_through_the_custom_op():
    # torch.func wraps tensors in batched ones without storage: the kernel cannot read them, the op's batching
    # fallback can.
    q, k, v = inputs(t=6, m=40, d1=16, d2=5)
    q3 = q.reshape(3, 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(lambda x: neuraldb_kernels.gated_retrieval(x, k, v, 0.5)[0])(q3)
    assert torch.equal(got, neuraldb_kernels.gated_retrieval(q3, k, v, 0.5)[0])


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "meta"])
def test_backend_choice_traces_without_graph_breaks(device_type, monkeypatch):
    # gated_retrieval resolves its backend inside compiled code, so every availability check must trace. The triton
    # check once called importlib.util.find_spec per call, which torch 2.11's dynamo refuses (seen on an H200); torch
    # 2.14's traces it, so the lookup is made to fail here: the checks must not look packages up per call at all.
    import importlib.util

    torch._dynamo.reset()
    want = len(backends.available_backends(device_type))

    def no_lookups(*args, **kwargs):
        raise AssertionError("backend availability looked a package up at call time")

    monkeypatch.setattr(importlib.util, "find_spec", no_lookups)

    def f(x):
        return x + len(backends.available_backends(device_type))

    assert len(backends.available_backends(device_type)) == want
    assert torch.compile(f, fullgraph=True)(torch.zeros(1)).item() == want


# ---- the package without its compiled extension ---------------------------------------------------------------
def test_missing_extension_falls_back_to_the_reference(monkeypatch):
    # Simulate a failed import of neuraldb_kernels._C in a fresh loader state.
    monkeypatch.setattr(extension, "_loaded", False)
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_error", None)
    monkeypatch.setitem(sys.modules, "neuraldb_kernels._C", None)  # makes `from neuraldb_kernels import _C` fail
    monkeypatch.delattr(neuraldb_kernels, "_C", raising=False)
    q, k, v = inputs()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = neuraldb_kernels.available_backends("cpu")[0]
        res = neuraldb_kernels.gated_retrieval(q, k, v, 0.5)
    assert first == "torch"
    warned = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1 and re.search("could not be imported.*serving the PyTorch reference", warned[0]), warned
    assert_matches_reference(res, q, k, v, 0.5, tol=None)
    for a, b in zip(res, gated_retrieval_reference(q, k, v, 0.5)):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process: not again
        neuraldb_kernels.gated_retrieval(q, k, v, 0.5)
        with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: the compiled extension"):
            neuraldb_kernels.gated_retrieval(q, k, v, 0.5, backend="cpu")


@pytest.mark.parametrize("isa", ["auto", "scalar"])
def test_read_probe_reads_every_byte(request, isa):
    # The benchmarks' bandwidth probe: its checksum shows it read every byte (odd sizes, tails, both threads).
    from neuraldb_kernels import probe

    try:
        probe._module()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    import numpy as np

    use_config(request, cpu_isa=isa, cpu_parallel_min_us=0, cpu_chunk=5)
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 63, 64, 1000, 300_001, 3 << 20):
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        b = raw.numpy().tobytes()
        full = len(b) // 8 * 8
        expect = int(np.bitwise_xor.reduce(np.frombuffer(b[:full], dtype=np.uint64))) if full else 0
        for byte in b[full:]:
            expect ^= byte
        assert probe.read_probe(raw) == expect & (2**63 - 1), n


def test_the_production_extension_has_no_benchmark_probe():
    ext = extension.load()
    if ext is None:
        pytest.skip("extension not built")
    assert not hasattr(ext, "read_probe")
