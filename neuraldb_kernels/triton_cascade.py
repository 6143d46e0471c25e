"""The Triton kernel of ``gated_retrieval_prefiltered``: the exact cascade (1-bit signs, int4 sketch, exact rescoring)
as one split scan, then the plain kernel's finishing step.

Contract: :func:`neuraldb_kernels.prefilter.gated_retrieval_prefiltered_reference` (bounds and row layouts:
:mod:`neuraldb_kernels.prefilter`). Per call, no host synchronisation and fixed shapes (CUDA-graph safe):

1. torch ops on the device: the normalised queries ``qn`` (fp32), their int8 codes ``q8`` with one scale ``c`` per
   row, and per row the constants of both bounds, computed in float64 and rounded up to fp32.
2. ``_cascade_kernel``, grid ``(row blocks, splits)`` as the plain scan: per tile of ``BLOCK_N`` keys, the sign bound
   of every key (``signs`` given), the int4 bound of the tile's survivors only (masked loads: a tile with none reads
   no sketch byte), and for the keys that pass both for some row the plain scan's own tile scores
   (``triton_kernel._tile_scores`` with the plain scan's config, see :func:`~neuraldb_kernels.triton_kernel.plain_config`),
   reduced to per-split (best score, lowest index) pairs exactly as the plain scan does.
3. ``triton_kernel._finish_kernel`` with ``CLOSED_EMPTY``: reduces the splits, recomputes the winner's cosine, gates,
   gathers the residual; a closed gate gives ``idx = -1, score = -inf``, zeros.

Why the output is the plain Triton scan's (same idx, score and residual wherever its gate opens): the plain scan takes
the argmax of its *scan* scores (raw query, tile arithmetic) and reports the winner's *cosine* (the finishing
kernel's arithmetic). A key is dropped only where a stage's bound, plus a rank margin ``RHO (n + UNIT_NORM)``, is below
gamma. The bound covers the cosine; the margin covers how far the scan score's order can stray from the cosine's:
both are within ``2.01 g(d1 + 1) ||k||`` (cosine, the two normalisations) and ``2 g(d1) ||k|| + 2^-16 ||k||`` (scan
score over the query norm; the 2^-16 is the bf16 hi/lo query split) of the exact cosine, so a dropped key ``i`` can
never have a scan score at or above a key ``j`` whose cosine opens the gate, provided ``||k_j|| <= UNIT_NORM`` (the op
asks for unit keys; fp16/bf16 rounding of a unit key leaves it below 1.004). Hence the best candidate is the plain
scan's winner whenever the gate opens, and its score is computed by the same code. Where the gate stays closed the
pre-filtered contract reports no key. Every bound is evaluated in fp32 with ``2^-20`` of the sum of its terms' sizes
added (at most 8 roundings of ``2^-24`` each), and the per-row constants are rounded up, so each is at least the
float64 reference's bound: the candidates are a superset of the reference's.

Not yet measured on a GPU (docs/gpu.md). The sign stage unpacks one bit per element by byte loads, and the int4
stage runs an fp32 (ieee) dot: correct and simple; the GPU session decides whether they need packed loads and an
integer MMA.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from neuraldb_kernels import triton_kernel as tk
from neuraldb_kernels.prefilter import (
    _HEADER_BYTES,
    _SIGN_HEADER,
    SIGN_OUTLIERS,
    SKETCH_GROUP,
    _gamma_n,
    _groups,
    _round_up_f32,
    sign_row_bytes,
    sketch_row_bytes,
)
from neuraldb_kernels.reference import normalize_queries

# The rank margin per unit of key norm beyond the bounds' own slack: 2.01 g(d1 + 1) + 2 g(d1) + 2^-16 (module
# docstring), rounded up generously to 5 g(d1 + 2) + 2^-15; UNIT_NORM covers the winner's norm.
RHO_ABS = 2.0**-15
UNIT_NORM = 1.01
# Relative round-up of a bound evaluated in fp32 (>= 8 roundings of 2^-24).
_EVAL_UP = 2.0**-20
# Per-row constants, in this order: c, l1, A = ||qn||, sign slack on n, int4 slack on n, the constant margin.
_NCONST = 8
# The row layouts in units of the typed view each field is read through (int16 for the outlier indices and the fp16
# values and scales, bytes for the bits and codes).
_SIGN_IDX = tl.constexpr(_SIGN_HEADER // 2)
_SIGN_VAL = tl.constexpr(_SIGN_HEADER // 2 + SIGN_OUTLIERS)
_SIGN_BITS = tl.constexpr(_SIGN_HEADER + 4 * SIGN_OUTLIERS)
_SKETCH_SCALES = tl.constexpr(_HEADER_BYTES // 2)
_SKETCH_CODES = tl.constexpr(_HEADER_BYTES)  # then 2 G bytes of scales
_UP = tl.constexpr(_EVAL_UP)
_GROUP = tl.constexpr(SKETCH_GROUP)
_HALF = tl.constexpr(SKETCH_GROUP // 2)


def rank_margin(d1: int) -> float:
    return 5 * _gamma_n(d1 + 2) + RHO_ABS


def stage_d(block_t: int) -> int:
    """Elements of d1 per step of the bound stages: narrow for 16-row blocks, whose (keys, rows) bound terms
    already fill the registers (compiled for sm_90 with the default decode config: 1168 bytes of stack at 32, 1824 at
    64); wide under the interpreter, where each step costs the same whatever its width."""
    if tk._interpreting():
        return 128
    return 64 if block_t == 1 else 32


@triton.jit
def _col(rc, c: tl.constexpr):
    """Column ``c`` of the (BLOCK_T, NCONST) per-row constants, as a (1, BLOCK_T) row to broadcast over keys."""
    sel = tl.arange(0, rc.shape[1]) == c
    return tl.expand_dims(tl.sum(tl.where(sel[None, :], rc, 0.0), axis=1), 0)


@triton.jit
def _rows_dot(k, qt, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr):
    """(BLOCK_N, BLOCK_T) dots of key tile ``k`` (BLOCK_N, BLOCK_D) with query block ``qt`` (BLOCK_D, BLOCK_T)."""
    if BLOCK_T == 1:
        qv = tl.sum(qt.to(tl.float32), axis=1)
        return tl.expand_dims(tl.sum(k.to(tl.float32) * qv[None, :], axis=1), 1)
    else:
        acc = tl.zeros((k.shape[0], BLOCK_T), tl.float32)
        return tk._mma(k, qt, acc, UPCAST, IEEE)


@triton.jit
def _sign_pass(
    s32, s16, s8, stride_s32, stride_s16, stride_s, n, alive, q8_ptr, qn_ptr, rows, row_ok, rc, gamma, D1,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NOUT: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_T): whether each (key, row) passes the 1-bit bound (NaN passes)."""
    n64 = n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q_cols = rows.to(tl.int64)[None, :] * D1
    dot = tl.zeros((n.shape[0], BLOCK_T), tl.float32)
    bits = s8 + n64[:, None] * stride_s + _SIGN_BITS
    for d0 in range(0, D1, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D1
        byte = tl.load(bits + (d >> 3)[None, :], mask=alive[:, None] & d_ok[None, :], other=0)
        sgn = tl.where(((byte >> (d & 7)[None, :]) & 1) != 0, 1.0, -1.0).to(tl.float16)
        q8 = tl.load(q8_ptr + q_cols + d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        # Integer products and sums below 2^24 (|q8| <= 127, d1 <= 65535): exact in any order.
        dot += _rows_dot(sgn, q8, UPCAST, False, BLOCK_T)
    # One outlier at a time: a (keys, outliers, rows) gather would not fit in registers at decode tiles.
    s1 = tl.zeros((n.shape[0], BLOCK_T), tl.float32)
    q_rows = qn_ptr + rows.to(tl.int64)[None, :] * D1
    for o in tl.static_range(NOUT):
        j = tl.load(s16 + n64 * stride_s16 + _SIGN_IDX + o, mask=alive, other=0).to(tl.int32) & 0xFFFF
        v = tl.load(s16 + n64 * stride_s16 + _SIGN_VAL + o, mask=alive, other=0)
        v = v.to(tl.float16, bitcast=True).to(tl.float32)
        qj = tl.load(q_rows + j[:, None], mask=(alive & (j < D1))[:, None] & row_ok[None, :], other=0.0)
        s1 += qj * v[:, None]
    hdr = s32 + n64 * stride_s32
    a = tl.load(hdr, mask=alive, other=0.0)[:, None]
    r = tl.load(hdr + 1, mask=alive, other=0.0)[:, None]
    nn = tl.load(hdr + 2, mask=alive, other=0.0)[:, None]
    cd = _col(rc, 0) * dot
    terms = a * (tl.abs(cd) + _col(rc, 1)) + _col(rc, 2) * r + _col(rc, 3) * nn + _col(rc, 5)
    ub = s1 + a * (cd + _col(rc, 1)) + _col(rc, 2) * r + _col(rc, 3) * nn + _col(rc, 5)
    ub = ub + _UP * (tl.abs(s1) + terms)
    return ~(ub < gamma) & alive[:, None] & row_ok[None, :]


@triton.jit
def _int4_pass(
    k32, k16, k8, stride_k32, stride_k16, stride_k, n, alive, qn_ptr, rows, row_ok, rc, gamma, D1, G,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_T): whether each (key, row) passes the int4 bound; keys outside ``alive`` are not read."""
    n64 = n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q_cols = rows.to(tl.int64)[None, :] * D1
    s = tl.zeros((n.shape[0], BLOCK_T), tl.float32)
    codes = k8 + n64[:, None] * stride_k + _SKETCH_CODES + 2 * G
    for d0 in range(0, D1, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D1
        m2 = alive[:, None] & d_ok[None, :]
        grp = d // _GROUP
        within = d % _GROUP
        byte = tl.load(codes + (grp * _HALF + within % _HALF)[None, :], mask=m2, other=0x88)
        nib = tl.where((within >= _HALF)[None, :], byte >> 4, byte & 15).to(tl.int32) - 8
        sc = tl.load(k16 + n64[:, None] * stride_k16 + _SKETCH_SCALES + grp[None, :], mask=m2, other=0)
        dq = nib.to(tl.float32) * sc.to(tl.float16, bitcast=True).to(tl.float32)  # exact
        qt = tl.load(qn_ptr + q_cols + d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        s += _rows_dot(dq, qt, UPCAST, True, BLOCK_T)
    hdr = k32 + n64 * stride_k32
    e = tl.load(hdr, mask=alive, other=0.0)[:, None]
    nn = tl.load(hdr + 1, mask=alive, other=0.0)[:, None]
    terms = _col(rc, 2) * e + _col(rc, 4) * nn + _col(rc, 5)
    ub = s + terms
    ub = ub + _UP * (tl.abs(s) + terms)
    return ~(ub < gamma) & alive[:, None] & row_ok[None, :]


@triton.jit
def _cascade_kernel(
    q_ptr, nrm_ptr, k_ptr, qn_ptr, q8_ptr, rc_ptr,
    s32, s16, s8, k32, k16, k8,
    ps_ptr, pi_ptr,
    gamma, T, M, D1, G, stride_q, stride_k,
    stride_s32, stride_s16, stride_s, stride_k32, stride_k16, stride_sk,
    keys_per_split,
    HAS_SIGNS: tl.constexpr, NOUT: tl.constexpr, NCONST: tl.constexpr,
    SPLIT_Q: tl.constexpr, LO_SCALE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGE_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    offs_n = tl.arange(0, BLOCK_N)
    q_cols = q_ptr + rows.to(tl.int64)[None, :] * stride_q
    nrm = tk._row_norms(nrm_ptr, rows, row_ok, SPLIT_Q, BLOCK_T)
    rc = tl.load(rc_ptr + rows[:, None] * NCONST + tl.arange(0, NCONST)[None, :], mask=row_ok[:, None], other=0.0)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    best = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK_T,), 2147483647, tl.int32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        keep = n_ok[:, None] & row_ok[None, :]
        if HAS_SIGNS:
            keep = _sign_pass(
                s32, s16, s8, stride_s32, stride_s16, stride_s, n, n_ok, q8_ptr, qn_ptr, rows, row_ok, rc, gamma,
                D1, UPCAST, BLOCK_T, STAGE_D, NOUT,
            )  # fmt: skip
        alive = tl.max(keep.to(tl.int32), axis=1) > 0
        if tl.max(alive.to(tl.int32), axis=0) > 0:
            keep = keep & _int4_pass(
                k32, k16, k8, stride_k32, stride_k16, stride_sk, n, alive, qn_ptr, rows, row_ok, rc, gamma, D1, G,
                UPCAST, BLOCK_T, STAGE_D,
            )  # fmt: skip
            cand = tl.max(keep.to(tl.int32), axis=1) > 0
            if tl.max(cand.to(tl.int32), axis=0) > 0:
                acc = tk._tile_scores(
                    q_cols, nrm, k_ptr + n.to(tl.int64)[:, None] * stride_k, cand, row_ok, D1,
                    SPLIT_Q, LO_SCALE, UPCAST, IEEE, BLOCK_T, BLOCK_N, BLOCK_D,
                )  # fmt: skip
                best, best_i = tk._running_best(acc, n, cand, best, best_i)
    tl.store(ps_ptr + pid_s * T + rows, best, mask=row_ok)
    tl.store(pi_ptr + pid_s * T + rows, best_i, mask=row_ok)


def _query_inputs(queries: torch.Tensor, d1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qn fp32, q8 fp16, consts (T, _NCONST) fp32)`` for both stages, on the queries' device without a sync."""
    qn = normalize_queries(queries).contiguous()
    c = qn.abs().amax(dim=1, keepdim=True) / 127
    ok = (c > 0) & c.isfinite()
    q8 = torch.where(ok, (qn / torch.where(ok, c, 1.0)).round().clamp(-127, 127), 0.0)
    qd = qn.double()
    up = 1 + 1e-9  # float64 sums of d1 terms err by < d1 2^-53 relative
    l1 = (qd - c.double() * q8.double()).abs().sum(dim=1) * up
    a = qd.norm(dim=1) * up
    rho = rank_margin(d1)
    consts = torch.zeros((queries.shape[0], _NCONST), dtype=torch.float32, device=queries.device)
    consts[:, 0] = c[:, 0]  # the scale itself: l1 is measured against it
    consts[:, 1] = _round_up_f32(l1)
    consts[:, 2] = _round_up_f32(a)
    consts[:, 3] = _round_up_f32((_gamma_n(d1) + _gamma_n(SIGN_OUTLIERS)) * a + rho)
    consts[:, 4] = _round_up_f32(2 * _gamma_n(d1) * a + rho)
    consts[:, 5] = _round_up_f32(torch.full_like(a, rho * UNIT_NORM))
    return qn, q8.to(torch.float16), consts


def gated_retrieval_prefiltered_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    sketch: torch.Tensor,
    signs: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton cascade for 2-D ``queries`` (T, d1) and unit-stride rows (sketch and signs as the op checks them);
    see the module docstring. ``num_splits``/``config`` as for
    :func:`~neuraldb_kernels.triton_kernel.gated_retrieval_triton` (``config`` is the rescoring's, as the plain scan's).
    """
    device = queries.device
    tk.check_device(device)
    t, d1 = queries.shape
    m, d2 = keys.shape[0], values.shape[1]
    if m >= 2**31 - 1:
        raise ValueError(f"keys must have fewer than 2**31 - 1 rows, got {m}")
    out = torch.empty((t, d2), dtype=queries.dtype, device=device)
    idx = torch.empty((t,), dtype=torch.int64, device=device)
    score = torch.empty((t,), dtype=torch.float32, device=device)
    if t == 0 or m == 0:
        return out.zero_(), idx.fill_(-1), score.fill_(float("-inf"))
    first = sign_row_bytes(d1) if signs is not None else sketch_row_bytes(d1)
    splits, per = tk.plan_splits(t, m, tk._sm_count(device), first)
    if num_splits is not None:
        per = -(-m // max(1, min(num_splits, m)))
        splits = -(-m // per)
    ps = torch.empty((splits, t), dtype=torch.float32, device=device)
    pi = torch.empty((splits, t), dtype=torch.int32, device=device)
    rows = signs if signs is not None else sketch  # a placeholder the kernel never reads without signs
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        qn, q8, consts = _query_inputs(queries, d1)
        nrm, kc = tk.scan_inputs(queries, keys, ps)
        cfg = tk.plain_config(queries, keys, kc, config)
        kc.pop("T_BUCKET")
        grid = (triton.cdiv(t, cfg["BLOCK_T"]), splits)
        cfg["STAGE_D"] = stage_d(cfg["BLOCK_T"])
        s32, s16 = rows.view(torch.float32), rows.view(torch.int16)
        k32, k16 = sketch.view(torch.float32), sketch.view(torch.int16)
        _cascade_kernel[grid](
            queries, nrm, keys, qn, q8, consts,
            s32, s16, rows, k32, k16, sketch,
            ps, pi,
            float(gamma), t, m, d1, _groups(d1), queries.stride(0), keys.stride(0),
            s32.stride(0), s16.stride(0), rows.stride(0), k32.stride(0), k16.stride(0), sketch.stride(0),
            per,
            HAS_SIGNS=signs is not None, NOUT=SIGN_OUTLIERS, NCONST=_NCONST,
            **kc, **cfg,
        )  # fmt: skip
        tk.finish(queries, keys, values, gamma, ps, pi, (out, idx, score), closed_empty=True)
    return out, idx, score


__all__ = ["gated_retrieval_prefiltered_triton", "rank_margin"]
