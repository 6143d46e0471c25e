"""Shared checks for gated_retrieval backends: the comparison rule against the specification and adversarial cases.

The rule (the op's docstring): a backend's score may differ from the specification's by up to
``score_error_bound(d1)``, so its idx may differ only where the two best exact scores are within that bound of each
other, and its gate only where the best exact score is within it of gamma; everywhere else idx, gate and out must
match exactly. Cases where every backend computes the same numbers exactly (duplicate keys, a score exactly at
gamma, zero query rows, non-finite rows) are checked with ``tol=None``: no exemption at all.

Used by the op tests on CPU, the Triton interpreter tests, the emulated CUDA kernel tests and the GPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch

from neuraldb_kernels import config
from neuraldb_kernels.reference import gated_retrieval_reference, normalize_queries, score_error_bound


def run_under_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a subprocess with ``TRITON_INTERPRET=1`` (``triton.jit`` reads it at import, so it cannot
    be switched on inside this process) and fail with its output unless every test there passed, none skipped."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(root / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test_file],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


def use_config(request: pytest.FixtureRequest, **changes: object) -> None:
    """Runs the rest of the test (or of the fixture that asks) under ``neuraldb_kernels.config.override(**changes)``:
    the kernels read their switches from that configuration, not from the environment."""
    cm = config.override(**changes)
    cm.__enter__()
    request.addfinalizer(lambda: cm.__exit__(None, None, None))


# The default tolerance: the documented bound at the keys' width.
BOUND: Literal["bound"] = "bound"
Tol = float | None | Literal["bound"]


def assert_matches_reference(
    result: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    *,
    tol: Tol = BOUND,
    self_consistent: bool = True,
) -> None:
    """Assert ``result = (out, idx, score)`` of a backend obeys the comparison rule for these inputs.

    ``queries`` may have leading dims. With ``self_consistent`` the backend's own gate must also agree with its
    own score (``out`` row open exactly where ``score > gamma``), which every fused kernel here guarantees.
    """
    out, idx, score = result
    lead = queries.shape[:-1]
    d2 = values.shape[1]
    assert out.shape == (*lead, d2), f"out shape {tuple(out.shape)}, expected {(*lead, d2)}"
    assert idx.shape == lead and score.shape == lead, f"idx {tuple(idx.shape)} / score {tuple(score.shape)}"
    assert out.dtype == queries.dtype and idx.dtype == torch.int64 and score.dtype == torch.float32
    assert out.device == queries.device and idx.device == queries.device and score.device == queries.device
    bound = score_error_bound(keys.shape[1])
    tol = bound if tol == BOUND else tol

    q2 = queries.reshape(-1, queries.shape[-1])
    out2, idx2, score2 = out.reshape(-1, d2).cpu(), idx.reshape(-1).cpu(), score.reshape(-1).cpu()
    # The specification runs where the inputs are (it chunks over the keys, so 1M x 4096 keys fit on a GPU).
    ref_out, ref_idx, ref_score = (x.cpu() for x in gated_retrieval_reference(q2, keys, values, gamma))
    m = keys.shape[0]
    if m == 0:
        assert torch.equal(idx2, ref_idx), f"idx {idx2.tolist()} for an empty database, expected -1"
        assert torch.equal(score2, ref_score), f"score {score2.tolist()} for an empty database, expected -inf"
        assert torch.equal(out2, ref_out), "out must be zeros for an empty database"
        return

    top = _top2(q2, keys).cpu()
    gap = top[:, 0] - top[:, 1]
    # The exact score of the key each row picked (it may differ from the specification's pick in a near-tie).
    picked = torch.clamp(idx2, 0, m - 1).to(keys.device)
    picked_score = (normalize_queries(q2, torch.float64) * keys[picked].double()).sum(1).float().cpu()
    picked_out = values[picked].to(q2.dtype).cpu()
    tie = gap <= tol if tol is not None else torch.zeros_like(gap, dtype=torch.bool)
    near_gamma = (ref_score - gamma).abs() <= tol if tol is not None else torch.zeros_like(tie)
    g32 = torch.tensor(gamma, dtype=torch.float32)

    for r in range(q2.shape[0]):
        where = (
            f"row {r} (ref idx {ref_idx[r].item()}, score {ref_score[r].item():.7f}; got idx {idx2[r].item()}, "
            f"score {score2[r].item():.7f}; gamma {gamma})"
        )
        i = int(idx2[r])
        if int(ref_idx[r]) < 0:  # no key has a finite score: a non-finite query row
            assert i == -1 and score2[r] == float("-inf"), f"{where}: expected idx -1, score -inf"
            assert not out2[r].any(), f"{where}: out must be zeros"
            continue
        assert 0 <= i < m, f"{where}: index out of range"
        if tie[r]:
            assert picked_score[r] >= top[r, 0] - tol, f"{where}: not within {tol} of the best score"
            assert abs(score2[r] - picked_score[r]) <= bound, f"{where}: score of the picked key differs"
        else:
            assert i == int(ref_idx[r]), f"{where}: idx differs outside a near-tie"
            assert abs(score2[r] - ref_score[r]) <= bound, f"{where}: score differs by more than {bound:.2g}"
        open_row = picked_out[r]
        zeros = torch.zeros_like(open_row)
        is_open = torch.equal(out2[r], open_row)
        is_closed = torch.equal(out2[r], zeros)
        assert is_open or is_closed, f"{where}: out is neither values[idx] cast to {q2.dtype} nor zeros"
        if is_open and is_closed:
            continue  # a zero value row: the gate cannot be observed
        if not near_gamma[r]:
            assert is_open == bool(ref_score[r] > gamma), f"{where}: gate differs from the reference"
        if self_consistent:
            assert is_open == bool(score2[r] > g32), f"{where}: gate disagrees with the backend's own score"


def _top2(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(T, 2) best two exact scores per row (float64 rounded to fp32, non-finite ones as -inf; the second is -inf
    when m == 1), chunked over the keys."""
    qn = normalize_queries(queries, torch.float64)
    best = torch.full((queries.shape[0], 2), float("-inf"), device=queries.device)
    for s in range(0, keys.shape[0], chunk):
        sc = (qn @ keys[s : s + chunk].double().T).float()
        sc = sc.nan_to_num(nan=float("-inf"), posinf=float("-inf"))
        best = torch.cat([best, sc], dim=1).topk(2, dim=1).values
    return best


@dataclass
class Case:
    """One adversarial input; ``tol`` is what :func:`assert_matches_reference` should be called with."""

    name: str
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    gamma: float
    tol: Tol = BOUND

    def to(self, device: str | torch.device) -> Case:
        return Case(
            self.name, self.queries.to(device), self.keys.to(device), self.values.to(device), self.gamma, self.tol
        )


def unit_keys(m: int, d1: int, dtype: torch.dtype = torch.float16, *, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(m, d1, generator=generator), dim=1).to(dtype)


def near_queries(keys: torch.Tensor, t: int, noise: float, dtype: torch.dtype, *, generator: torch.Generator):
    """Queries close to random keys (so scores spread from ~0 to ~1 and most gates open at gamma ~0.5)."""
    pick = torch.randint(0, keys.shape[0], (t,), generator=generator)
    q = keys[pick].float() + noise * torch.randn(t, keys.shape[1], generator=generator) / keys.shape[1] ** 0.5
    return (q * 3.0).to(dtype)


def adversarial_cases(
    *,
    m: int = 1037,
    d1: int = 192,
    d1_odd: int = 131,
    d2: int = 24,
    t: int = 5,
    query_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16),
    key_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16),
    seed: int = 0,
) -> list[Case]:
    """The op issue's adversarial cases at the given sizes (CPU tensors; move them with :meth:`Case.to`)."""
    g = torch.Generator().manual_seed(seed)
    cases: list[Case] = []
    vals = lambda rows, dt=torch.float16: torch.randn(rows, d2, generator=g).to(dt)

    for kd in key_dtypes:
        for qd in query_dtypes:
            keys = unit_keys(m, d1, kd, generator=g)
            cases.append(Case(f"random-q{qd}-k{kd}", near_queries(keys, t, 1.0, qd, generator=g), keys, vals(m), 0.5))
    keys = unit_keys(m, d1, generator=g)
    cases.append(Case("T=1", near_queries(keys, 1, 1.0, torch.float16, generator=g), keys, vals(m), 0.5))
    cases.append(
        Case("values-bf16", near_queries(keys, t, 1.0, torch.float32, generator=g), keys, vals(m, torch.bfloat16), 0.5)
    )
    cases.append(
        Case(
            "values-fp32-queries-bf16",
            near_queries(keys, t, 1.0, torch.bfloat16, generator=g),
            keys,
            vals(m, torch.float32),
            0.5,
        )
    )
    keys1 = unit_keys(1, d1, generator=g)
    cases.append(Case("m=1", near_queries(keys1, t, 1.0, torch.float16, generator=g), keys1, vals(1), 0.5))
    cases.append(Case("m=0", torch.randn(t, d1, generator=g).half(), keys[:0], vals(0), 0.5, tol=None))
    keys_odd = unit_keys(m, d1_odd, generator=g)
    cases.append(Case("odd-d1", near_queries(keys_odd, t, 1.0, torch.float32, generator=g), keys_odd, vals(m), 0.5))
    cases.append(Case("all-below-gamma", torch.randn(t, d1, generator=g), keys, vals(m), 0.9))

    # Exact ties: key 3 is duplicated at 1, m // 2 and m - 2 (other splits); queries aim at it; lowest index wins.
    dup = keys.clone()
    for j in (1, m // 2, m - 2):
        dup[j] = dup[3]
    q = dup[3].float().repeat(t, 1) * torch.linspace(0.5, 4, t)[:, None]
    q[1:] += 0.02 * torch.randn(t - 1, d1, generator=g)  # the first row is the key itself, scaled
    cases.append(Case("exact-ties", q, dup, vals(m), 0.5, tol=None))
    cases.append(Case("exact-ties-fp16-q", q.half(), dup, vals(m), 0.5, tol=None))
    # Every key identical: one long exact tie across all splits and tiles.
    same = keys[5:6].repeat(m, 1)
    cases.append(
        Case("all-keys-equal", near_queries(keys, t, 1.0, torch.float32, generator=g), same, vals(m), -0.9, tol=None)
    )

    # A score exactly at gamma (gate closed) and just above it (open): query e0, key 7 has 0.5 in coordinate 0,
    # every other key less; all products are exact, so every backend computes exactly 0.5.
    ex = keys.clone()
    ex[:, 0] = (torch.rand(m, generator=g) * 0.9 - 0.45).half()
    ex[7, 0] = 0.5
    e0 = torch.zeros(t, d1)
    e0[:, 0] = torch.tensor([1.0, 2.0, 0.25, 8.0, 1.0][:t] + [1.0] * max(0, t - 5))
    for qd in query_dtypes:
        cases.append(Case(f"score-at-gamma-q{qd}", e0.to(qd), ex, vals(m), 0.5, tol=None))
    cases.append(Case("score-just-above-gamma", e0.clone(), ex, vals(m), 0.4999, tol=None))

    # Zero query rows: every score is exactly 0, index 0 wins; closed at gamma 0, open at gamma -0.5.
    zq = near_queries(keys, t, 1.0, torch.float32, generator=g)
    zq[::2] = 0
    cases.append(Case("zero-rows-gamma0", zq, keys, vals(m), 0.0, tol=None))
    cases.append(Case("zero-rows-gamma-neg", zq.half(), keys, vals(m), -0.5, tol=None))
    zq_all = torch.zeros(t, d1)
    cases.append(Case("all-zero-queries", zq_all, keys, vals(m), 0.0, tol=None))

    # Non-finite input is never retrieved. Key rows: NaN in one element; +inf where the query aiming at it is
    # positive (a +inf score in fp32); +inf and -inf (NaN). Query rows: NaN, +inf, -inf, then ordinary rows.
    bad = keys.clone()
    nan_row, inf_row, both_row = 1, m // 2, m - 1  # in different splits and tiles, whatever m (at least 3)
    bad[nan_row, 3 % d1], bad[inf_row, 0] = float("nan"), float("inf")
    bad[both_row, 5 % d1], bad[both_row, 6 % d1] = float("inf"), float("-inf")
    aim = bad[[nan_row, inf_row, both_row, 0, m // 3]].float()
    aim = aim.nan_to_num(nan=0.5, posinf=0.5, neginf=-0.5).abs()[:t]
    cases.append(Case("non-finite-key-rows", aim.to(torch.float16), bad, vals(m), -0.9))
    nq = near_queries(keys, t, 1.0, torch.float32, generator=g)
    nq[0, 7], nq[1, 0] = float("nan"), float("inf")
    if t > 2:
        nq[2, d1 - 1] = float("-inf")
    for qd in query_dtypes:
        cases.append(Case(f"non-finite-query-rows-q{qd}", nq.to(qd), keys, vals(m), -0.9))
    return cases
