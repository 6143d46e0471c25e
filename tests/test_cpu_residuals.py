"""``bind_cpu_residuals``: what a patched eager forward on the CPU calls. None exactly where no row's gate opens,
else the plain op's ``out`` (bitwise) in the queries' leading shape."""

from __future__ import annotations

import pytest
import torch

import neuraldb_kernels
from neuraldb_kernels import build_signs, build_sketch
from neuraldb_kernels.op import bind_cpu_residuals

pytestmark = pytest.mark.skipif(
    "cpu" not in neuraldb_kernels.available_backends("cpu"), reason="binds the C++ CPU kernel"
)

D1, D2 = 96, 24


def _db(m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(m, D1, generator=g), dim=1).half()
    return keys, torch.randn(m, D2, generator=g).half(), g


def _plain(q: torch.Tensor, keys, values, gamma):
    out, _, score = neuraldb_kernels.gated_retrieval(q, keys, values, gamma, backend="cpu")
    return out, score


@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 3)])
def test_none_exactly_where_no_gate_opens(qdtype, lead):
    keys, values, g = _db(700)
    fn = bind_cpu_residuals(keys, values, 0.65)
    closed = torch.randn(*lead, D1, generator=g).to(qdtype)
    assert fn(closed) is None
    assert not _plain(closed, keys, values, 0.65)[0].any()
    opened = closed.clone()
    opened.view(-1, D1)[-1] = keys[5].to(qdtype) * 3  # one row of several opens its gate
    got = fn(opened)
    want = _plain(opened, keys, values, 0.65)[0]
    assert got is not None and got.dtype == qdtype and got.shape == (*lead, D2)
    assert torch.equal(got, want) and got.view(-1, D2)[-1].any()


def test_a_score_equal_to_gamma_stays_closed():
    keys, values, _ = _db(300)
    q = keys[7:8].float() + 0.3 * keys[8:9].float()
    score = float(_plain(q, keys, values, 0.0)[1])
    assert bind_cpu_residuals(keys, values, score)(q) is None  # the gate is strict: score > gamma
    below = torch.nextafter(torch.tensor(score), torch.tensor(-1.0)).item()
    assert torch.equal(bind_cpu_residuals(keys, values, below)(q), _plain(q, keys, values, below)[0])


def test_empty_database_and_no_rows():
    keys, values, g = _db(0)
    assert bind_cpu_residuals(keys, values, 0.5)(torch.randn(1, D1, generator=g)) is None
    keys, values, _ = _db(50)
    assert bind_cpu_residuals(keys, values, -1.0)(torch.empty(0, D1)) is None


def test_strided_queries():
    keys, values, _ = _db(400)
    wide = torch.cat([keys[:3].float() * 2, torch.zeros(3, D1)], dim=1).view(1, 3, 2 * D1)
    q = wide.view(1, 3, D1, 2)[..., 0]  # every other element: not unit-stride in the last dim
    q.copy_(keys[:3].float() * 2)
    assert q.stride(-1) == 2
    assert torch.equal(bind_cpu_residuals(keys, values, 0.65)(q), _plain(q.contiguous(), keys, values, 0.65)[0])


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("with_signs", [False, True])
def test_the_sketch_path_gives_the_plain_output(rows, with_signs):
    keys, values, g = _db(1500, seed=3)
    sketch, signs = build_sketch(keys), build_signs(keys) if with_signs else None
    fn = bind_cpu_residuals(keys, values, 0.65, sketch, signs, sketch_max_rows=1)
    q = torch.randn(rows, D1, generator=g)
    assert fn(q) is None
    q[0] = keys[1234].float() * 0.5
    assert torch.equal(fn(q), _plain(q, keys, values, 0.65)[0])


def test_bad_shapes_name_the_arguments():
    keys, values, _ = _db(10)
    with pytest.raises(RuntimeError, match=r"keys \(m, d1\)"):
        bind_cpu_residuals(keys[0], values, 0.5)(torch.randn(1, D1))
