"""pytest-benchmark micro-benchmarks: the op inside a patched layer, small sizes, seconds in all.

    pytest benchmarks/test_bench_patched.py               # (testpaths = tests: benchmarks run only when asked)
    pytest benchmarks/test_bench_patched.py --benchmark-json=benchmarks/results/micro.json
    pytest benchmarks/test_bench_patched.py --benchmark-disable      # CI: each runs once, as a correctness smoke

A tiny module holding one Llama-style down-projection (d1=1536 -> d2=576, SmolLM2-135M's layer 8), timed unpatched,
patched with an empty database, and patched with 2k facts, for a decode-like query (1 token) and a short prefill
(64 tokens); plus the op alone on the same shapes. Each benchmark checks its result, so the file doubles as a test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "python"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import neuraldb  # noqa: E402
from neuraldb import NeuralKVDatabase, patch_model, unpatch_model  # noqa: E402
from neuraldb_kernels import gated_retrieval  # noqa: E402

pytest.importorskip("pytest_benchmark")

D1, D2, GAMMA = 1536, 576, 0.65


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down_proj = torch.nn.Linear(D1, D2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(x)


def _db(m: int) -> NeuralKVDatabase:
    g = torch.Generator().manual_seed(m)
    db = NeuralKVDatabase(D1, D2)
    if m:
        db.add(torch.randn(m, D1, generator=g), torch.randn(m, D2, generator=g))
    return db


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """One thread by default ($NEURALDB_BENCH_THREADS to change): on a shared CPU, OpenMP barriers waiting for a time
    slice otherwise dominate microsecond timings."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("NEURALDB_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def layer() -> Layer:
    torch.manual_seed(0)
    return Layer().eval().requires_grad_(False)


@pytest.fixture(scope="module", params=[0, 2000], ids=lambda m: f"m{m}")
def db(request) -> NeuralKVDatabase:
    return _db(request.param)


@pytest.mark.parametrize("tokens", [1, 64], ids=lambda t: f"t{t}")
def test_unpatched(benchmark, layer, tokens):
    x = torch.randn(1, tokens, D1)
    out = benchmark(layer, x)
    assert out.shape == (1, tokens, D2)


@pytest.mark.parametrize("tokens", [1, 64], ids=lambda t: f"t{t}")
def test_patched(benchmark, layer, db, tokens):
    x = torch.randn(1, tokens, D1)
    expected = layer(x)
    patch_model(layer, db, module="down_proj", gamma=GAMMA)
    try:
        out = benchmark(layer, x)
    finally:
        unpatch_model(layer)
    # Random queries match no random key above gamma: the patched layer returns exactly the unpatched output.
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_patched_hit(benchmark, layer):
    """A query equal to a stored key: the retrieved residual is added."""
    db = _db(2000)
    x = db.keys[7].float().reshape(1, 1, D1) * 3
    expected = layer(x) + db.values[7].float()
    patch_model(layer, db, module="down_proj", gamma=GAMMA)
    try:
        out = benchmark(layer, x)
    finally:
        unpatch_model(layer)
    torch.testing.assert_close(out, expected)


def test_disabled(benchmark, layer):
    """Inside ``neuraldb.disabled``: the hook runs but returns at once."""
    db = _db(2000)
    x = torch.randn(1, 1, D1)
    patch_model(layer, db, module="down_proj", gamma=GAMMA)
    try:
        with neuraldb.disabled(layer):
            out = benchmark(layer, x)
    finally:
        unpatch_model(layer)
    assert out.shape == (1, 1, D2)


@pytest.mark.parametrize("tokens", [1, 64], ids=lambda t: f"t{t}")
def test_op_alone(benchmark, db, tokens):
    q = torch.randn(tokens, D1)
    out, idx, score = benchmark(gated_retrieval, q, db.keys, db.values, GAMMA)
    assert out.shape == (tokens, D2) and idx.shape == (tokens,)
    assert (idx >= 0).all() if len(db) else (idx == -1).all()
