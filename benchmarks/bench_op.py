"""pytest-benchmark timings of gated_retrieval on CPU at small sizes (runs in well under a minute).

    pytest benchmarks/bench_op.py                      # every CPU backend and kernel, eager peers, read probe
    pytest benchmarks/bench_op.py --benchmark-json=out.json

(pytest's testpaths is tests/, so a plain ``pytest`` never runs these.) For the full table against the read
bandwidth, see benchmarks/op_table.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import neuraldb_kernels
from neuraldb_kernels import extension

pytest.importorskip("pytest_benchmark")

M, D1, D2 = 20_000, 1536, 256
EXT = extension.load()
KERNELS = list(EXT.cpu_isas()) if EXT is not None else []
BACKENDS = ["torch"] + [f"cpu-{k}" for k in KERNELS]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(M, D1, generator=g), dim=1).half()
    values = torch.randn(M, D2, generator=g).half()
    queries = {t: torch.randn(t, D1, generator=g) for t in (1, 8, 128)}
    return keys, values, queries


@pytest.mark.parametrize("t", [1, 8, 128])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_retrieval(benchmark, data, backend, t, monkeypatch):
    keys, values, queries = data
    name = backend
    if backend.startswith("cpu-"):
        monkeypatch.setenv("NEURALDB_CPU_ISA", backend.removeprefix("cpu-"))
        name = "cpu"
        if backend == "cpu-scalar" and t == 128:
            pytest.skip("the portable fallback at T=128 takes seconds")
    benchmark.group = f"T={t} m={M} d1={D1}"
    benchmark.extra_info.update(T=t, m=M, d1=D1, threads=torch.get_num_threads(),
                                isa=os.environ.get("NEURALDB_CPU_ISA", "auto"))
    out, idx, score = benchmark(neuraldb_kernels.gated_retrieval, queries[t], keys, values, 0.5, backend=name)
    assert idx.shape == (t,)


@pytest.mark.parametrize("t", [1, 8, 128])
@pytest.mark.parametrize("peer", ["fp16_mm", "fp32_mm"])
def test_eager_peer(benchmark, data, peer, t):
    keys, _, queries = data
    q = queries[t]
    benchmark.group = f"T={t} m={M} d1={D1}"
    if peer == "fp16_mm":
        benchmark(lambda: q.half() @ keys.T)
    else:
        benchmark(lambda: q.float() @ keys.float().T)


def test_read_probe(benchmark, data):
    if EXT is None:
        pytest.skip("extension not built")
    keys = data[0]
    benchmark.group = "read"
    benchmark.extra_info["bytes"] = keys.numel() * keys.element_size()
    benchmark(EXT.read_probe, keys)
