"""The Triton backend of ``gated_retrieval``: a split-K scan over the keys, then a small reduce/gate/gather kernel.

Over 400 lines because the three kernels, their autotuning configs and the launcher's split plan share constants and
invariants (split lengths, buckets, the tie rule across splits) that must change together.

Contract: :mod:`neuraldb_kernels.reference`. Three launches, all on the caller's stream, no host synchronisation
(outputs and the per-split workspace come from ``torch.empty``, which CUDA-graph capture handles):

1. ``_norm_kernel`` (only when the queries must change dtype for the tensor cores): ``max(||q||, 1e-12)`` per row.
2. ``_scan_kernel``, grid ``(row blocks, splits)``: each program takes ``BLOCK_T`` query rows and a contiguous
   range of keys (flash-decoding style: the keys are split across programs so that 100k-1M keys fill every SM
   even for one query row), loops over key tiles of ``BLOCK_N`` rows and, inside, over ``d1`` in ``BLOCK_D``
   chunks, and keeps a running (max, first argmax) per query row; it writes one (score, index) pair per row and
   split. Three ways to form the dot products:

   * ``BLOCK_T == 1``: fp32 multiply-adds on the upcast key tile (no tensor cores, exact fp32 products); for
     ``T == 1`` the autotuner chooses between this and the 16-row tensor-core block below;
   * queries already in the keys' dtype (fp16/fp16, bf16/bf16) or fp32 keys: one ``tl.dot`` per chunk on the
     raw (unnormalised) rows; the products are exact and accumulate in fp32 (fp32 keys use ``ieee`` precision);
   * any other pair (fp32 or bf16 queries with fp16 keys, ...): the normalised query is split into
     ``hi + lo / LO_SCALE`` in the keys' dtype and fed to two ``tl.dot``; its rounding error is about
     ``u**2`` (2.4e-7 for fp16, 1.5e-5 for bf16) instead of ``u`` for a plain cast.

   The argmax is taken on these scores; scaling a row by its norm does not change which key wins. Every path is
   exact to about 1e-7 relative (1.5e-5 for bf16 splits), far inside the 1e-3 the contract allows for near-ties.
3. ``_finish_kernel``, one program per row: reduces the per-split pairs (max score, lowest index on ties; the
   splits are contiguous and increasing, so this is the global first argmax), recomputes the winning cosine in
   fp32 exactly as the reference does (``q / max(||q||, 1e-12)`` times the key row), applies the strict gate
   ``score > gamma`` and writes ``values[idx]`` cast to the queries' dtype, or zeros.

On CUDA the scan is autotuned per (T bucket, d1, split-length bucket, dtypes); the first call for each key benchmarks
the configs and synchronises, so warm up before capturing a CUDA graph (and again after the database grows into a new
split-length bucket). ``NEURALDB_TRITON_AUTOTUNE=0`` (``config.override(triton_autotune=False)``) turns that off (a fixed
config per path, see ``_DEFAULT_CONFIGS``). Under ``TRITON_INTERPRET=1`` (CPU tensors) a fixed config
is used and the interpreter's broken bf16 ``tl.dot`` is avoided by upcasting the (exactly representable) operands
to fp32. ``TRITON_INTERPRET`` must be set before this module is imported: ``triton.jit`` reads it at decoration.

Known limit: the scan works on the raw query row where no dtype change is needed, so queries with a norm near
fp32's range (~1e38 / sqrt(d1)) overflow there; the reference normalises first.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from neuraldb_kernels.triton_configs import (  # noqa: F401  (tests and the cascade reach them through this module)
    _AUTOTUNE_KEY,
    _CONFIGS,
    _CONFIGS_DECODE,
    _CONFIGS_PREFILL,
    _CONFIGS_ROW,
    _DEFAULT_CONFIGS,
    _INTERPRET_CONFIG,
    _autotuning,
    _prune,
    split_bucket,
    t_bucket,
)

NORM_EPS = 1e-12

# How many programs the scan aims for, in multiples of the SM count, and the fewest key bytes one split scans.
# These shape decode (T <= 16) performance; retune on the GPU with benchmarks/experiments/split_sweep.py. The minimum is in bytes,
# not keys: at Llama-3-8B's d1 = 14336 a 64-key minimum (1.8 MB a split) left 10k keys 157 programs on an H200's 132
# SMs, and the scan took 1.7x the read floor.
_WAVES = 4
_MIN_SPLIT_BYTES = 128 * 1024
_MIN_SPLIT_KEYS_CAP = 64  # narrow rows (< 2 KiB) keep the old 64-key minimum: the byte rule was measured at d1 = 14336
_MAX_SPLITS = 2048
_SPLIT_ROUND = 16

# Per-dtype scale of the low half of a split query: 2**(mantissa bits + 1), so lo * LO_SCALE is O(|q|).
_LO_SCALE = {torch.float16: 2048.0, torch.bfloat16: 256.0, torch.float32: 1.0}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _norm_kernel(q_ptr, nrm_ptr, D1, stride_q, EPS: tl.constexpr, BLOCK_D: tl.constexpr):
    """nrm[t] = max(||q[t]||, EPS) in fp32."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    row = q_ptr + t.to(tl.int64) * stride_q
    ss = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D1, BLOCK_D):
        d = d0 + offs
        q = tl.load(row + d, mask=d < D1, other=0.0).to(tl.float32)
        ss += q * q
    tl.store(nrm_ptr + t, tl.maximum(tl.sqrt_rn(tl.sum(ss, axis=0)), EPS))


@triton.jit
def _mma(k, q, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += k @ q with fp32 accumulation (k: (BLOCK_N, BLOCK_D), q: (BLOCK_D, BLOCK_T))."""
    if UPCAST:
        # The interpreter stores bf16 as raw uint16 and multiplies the bit patterns; the operands here are exactly
        # representable in fp32, so upcasting changes nothing but the accumulation order. Not tl.dot: the interpreter
        # runs it as a BLAS sgemm, which sums the rows in a block's tail in another order than the others, so two
        # identical key rows could score an ulp apart (the contract's exact ties need them equal, as on the GPU's MMA).
        return acc + tl.sum(k.to(tl.float32)[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
    elif IEEE:
        return tl.dot(k, q, acc, input_precision="ieee")
    else:
        return tl.dot(k, q, acc)


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even by hand: the interpreter truncates in ``.to(tl.bfloat16)``."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _tile_scores(
    q_cols, nrm, k_rows, n_ok, row_ok, D1,
    SPLIT_Q: tl.constexpr, LO_SCALE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The scan's (BLOCK_N, BLOCK_T) scores of one key tile (rows outside ``n_ok`` read as zeros). One helper for the
    plain scan and the cascade's rescoring (triton_cascade.py), so that both round every key's score alike: a row's
    score depends only on its own key and the config, never on which other rows of the tile are loaded."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)
    if SPLIT_Q:
        acc_lo = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)
    for d0 in range(0, D1, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D1
        k = tl.load(k_rows + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        qt = tl.load(q_cols + d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        if BLOCK_T == 1:
            qv = tl.sum(qt.to(tl.float32), axis=1)  # the single row as a (BLOCK_D,) vector
            acc += tl.expand_dims(tl.sum(k.to(tl.float32) * qv[None, :], axis=1), 1)
        elif SPLIT_Q:
            qn = tl.div_rn(qt.to(tl.float32), nrm[None, :])
            q_hi = qn.to(k.dtype)
            q_lo = ((qn - q_hi.to(tl.float32)) * LO_SCALE).to(k.dtype)
            acc = _mma(k, q_hi, acc, UPCAST, IEEE)
            acc_lo = _mma(k, q_lo, acc_lo, UPCAST, IEEE)
        else:
            acc = _mma(k, qt.to(k.dtype), acc, UPCAST, IEEE)
    if SPLIT_Q:
        acc = acc + acc_lo * (1.0 / LO_SCALE)
    return acc


@triton.jit
def _row_norms(nrm_ptr, rows, row_ok, SPLIT_Q: tl.constexpr, BLOCK_T: tl.constexpr):
    # Only the hi/lo split reads them; the other paths get ones they ignore.
    if SPLIT_Q:
        return tl.load(nrm_ptr + rows, mask=row_ok, other=1.0)
    else:
        return tl.full((BLOCK_T,), 1.0, tl.float32)


@triton.jit
def _running_best(acc, n, n_ok, best, best_i):
    """(best, best_i) updated with a tile's scores ``acc`` of keys ``n`` (only those in ``n_ok`` count)."""
    acc = tl.where(n_ok[:, None], acc, float("-inf"))
    tile_best = tl.max(acc, axis=0)
    tile_i = tl.min(tl.where(acc == tile_best[None, :], n[:, None], 2147483647), axis=0)
    # Tiles come in increasing key order: a strict ">" keeps the first index on ties.
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, tile_i, best_i)


@triton.jit
def _scan_kernel(
    q_ptr,
    nrm_ptr,
    k_ptr,
    ps_ptr,
    pi_ptr,
    T,
    M,
    D1,
    stride_q,
    stride_k,
    keys_per_split,
    SPLIT_BUCKET,  # only an autotuning key (not constexpr: no recompilation per bucket)
    T_BUCKET: tl.constexpr,  # only an autotuning key
    SPLIT_Q: tl.constexpr,
    LO_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    offs_n = tl.arange(0, BLOCK_N)
    # The query block is read transposed, (BLOCK_D, BLOCK_T), so the scores come out as (BLOCK_N keys, BLOCK_T
    # rows): the keys are the MMA's M dimension, which suits Hopper's wgmma for any T.
    q_cols = q_ptr + rows.to(tl.int64)[None, :] * stride_q
    nrm = _row_norms(nrm_ptr, rows, row_ok, SPLIT_Q, BLOCK_T)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    best = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK_T,), 2147483647, tl.int32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        acc = _tile_scores(
            q_cols, nrm, k_ptr + n.to(tl.int64)[:, None] * stride_k, n_ok, row_ok, D1,
            SPLIT_Q, LO_SCALE, UPCAST, IEEE, BLOCK_T, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        best, best_i = _running_best(acc, n, n_ok, best, best_i)
    tl.store(ps_ptr + pid_s * T + rows, best, mask=row_ok)
    tl.store(pi_ptr + pid_s * T + rows, best_i, mask=row_ok)


@triton.jit
def _cosine(q_row, k_row, nrm, D1, BLOCK_D: tl.constexpr):
    """``(q / nrm) . key`` in fp32, as the reference normalises: the winner's score the finish kernel reports."""
    offs_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D1, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D1
        q = tl.load(q_row + d, mask=d_ok, other=0.0).to(tl.float32)
        k = tl.load(k_row + d, mask=d_ok, other=0.0).to(tl.float32)
        dot += tl.div_rn(q, nrm) * k
    return tl.sum(dot, axis=0)


@triton.jit
def _first_best_finite(q_row, k_ptr, stride_k, nrm, M, D1, BLOCK_D: tl.constexpr):
    """The lowest index of the best finite cosine of the query row against every key (M when none is finite), one
    key at a time: the slow path of :func:`_finish_kernel` for keys with non-finite elements."""
    best = float("-inf")
    best_i = tl.zeros((), tl.int64) + M
    for n in range(M):
        n64 = tl.zeros((), tl.int64) + n  # k_ptr offsets pass 2^31 at 1M x 14336 keys
        s = _cosine(q_row, k_ptr + n64 * stride_k, nrm, D1, BLOCK_D)
        better = (s > best) & (s < float("inf"))
        best = tl.where(better, s, best)
        best_i = tl.where(better, n64, best_i)
    return best_i


@triton.jit
def _finish_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ps_ptr,
    pi_ptr,
    out_ptr,
    idx_ptr,
    score_ptr,
    gamma,
    T,
    M,
    D1,
    D2,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    num_splits,
    EPS: tl.constexpr,
    RNE_BF16: tl.constexpr,
    CLOSED_EMPTY: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    t = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    ps = tl.load(ps_ptr + s * T + t, mask=s_ok, other=float("-inf"))
    pi = tl.load(pi_ptr + s * T + t, mask=s_ok, other=2147483647)
    best = tl.max(ps, axis=0)
    i = tl.min(tl.where(ps == best, pi, 2147483647), axis=0).to(tl.int64)
    # No index: every score was non-finite (a non-finite query row). Read row 0, keep the gate shut, and write the
    # contract's (-1, -inf).
    valid = i < M
    i = tl.where(valid, i, 0)

    # The winning cosine, computed as the reference does: (q / max(||q||, eps)) . key, in fp32.
    offs_d = tl.arange(0, BLOCK_D)
    q_row = q_ptr + t.to(tl.int64) * stride_q
    k_row = k_ptr + i * stride_k
    ss = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D1, BLOCK_D):
        d = d0 + offs_d
        q = tl.load(q_row + d, mask=d < D1, other=0.0).to(tl.float32)
        ss += q * q
    nrm = tl.maximum(tl.sqrt_rn(tl.sum(ss, axis=0)), EPS)
    score = tl.where(valid, _cosine(q_row, k_row, nrm, D1, BLOCK_D), float("-inf"))
    # A key row with an inf element scores +inf (or NaN) and can win its split, hiding that split's best finite key;
    # the contract says it never wins. Then rescan every key for this row, skipping non-finite scores: masking them in
    # the scan itself spills registers in the 64x64 prefill configs, and only keys the database refuses get here.
    if valid & ~(score < float("inf")):
        i = _first_best_finite(q_row, k_ptr, stride_k, nrm, M, D1, BLOCK_D)
        valid = i < M
        i = tl.where(valid, i, 0)
        score = tl.where(valid, _cosine(q_row, k_ptr + i * stride_k, nrm, D1, BLOCK_D), float("-inf"))
    if CLOSED_EMPTY:
        # The pre-filtered contract: a closed gate reports no key, since the cascade never scored the keys below it.
        valid = valid & (score > gamma)
        score = tl.where(valid, score, float("-inf"))
    tl.store(idx_ptr + t, tl.where(valid, i, -1))
    tl.store(score_ptr + t, score)

    offs_v = tl.arange(0, BLOCK_V)
    v_row = v_ptr + i * stride_v
    o_row = out_ptr + t.to(tl.int64) * stride_o
    # The gate as a vector: the interpreter mistypes a broadcast scalar bool (splat gives fp32 data).
    gate_v = (tl.zeros((BLOCK_V,), tl.float32) + score) > gamma
    for c0 in range(0, D2, BLOCK_V):
        c = c0 + offs_v
        c_ok = c < D2
        v = tl.load(v_row + c, mask=c_ok & gate_v, other=0.0)
        if RNE_BF16:
            tl.store(o_row + c, _to_bf16_rne(v.to(tl.float32)), mask=c_ok)
        else:
            tl.store(o_row + c, v.to(out_ptr.dtype.element_ty), mask=c_ok)


# Whether triton.jit saw TRITON_INTERPRET=1 when this module was imported (it decides at decoration time).
_BUILT_FOR_INTERPRETER = not isinstance(_scan_kernel, triton.runtime.JITFunction)


# --------------------------------------------------------------------------------------------------------------
# Configs and autotuning
# --------------------------------------------------------------------------------------------------------------


_tuned: dict[str, object] = {}


def _tuned_scan(kind: str):
    if kind not in _tuned:
        _tuned[kind] = triton.autotune(
            configs=_CONFIGS[kind], key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune}
        )(_scan_kernel)
    return _tuned[kind]


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------


def _kind(t: int) -> str:
    return "row" if t == 1 else "decode" if t <= 16 else "prefill"


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so that cross-split reduction is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(t: int, m: int, sms: int, key_bytes: int) -> tuple[int, int]:
    """``(num_splits, keys_per_split)`` for T query rows over m > 0 keys of ``key_bytes`` bytes each (d1 times the
    element size) on a device with ``sms`` SMs.

    Aims for ``_WAVES * sms`` programs in all, counting 128-row blocks for prefill, but no split of fewer than
    ``_MIN_SPLIT_BYTES`` of keys nor ``_SPLIT_ROUND`` keys (but ``_MIN_SPLIT_KEYS_CAP`` keys are always enough), and
    at most ``_MAX_SPLITS`` splits (the finishing kernel reads them all).

    Example (one decode row over 100k fp16 keys of d1 = 14336 on an H100's 132 SMs)::

        >>> plan_splits(1, 100_000, 132, 14336 * 2)
        (521, 192)
    """
    rows_per_block = 1 if t == 1 else 16 if t <= 16 else 128
    row_blocks = -(-t // rows_per_block)
    want = -(-(_WAVES * sms) // row_blocks)
    min_keys = min(_MIN_SPLIT_KEYS_CAP, max(_SPLIT_ROUND, -(-_MIN_SPLIT_BYTES // max(1, key_bytes))))
    splits = max(1, min(want, -(-m // min_keys), _MAX_SPLITS))
    per = -(-m // splits)
    per = -(-per // _SPLIT_ROUND) * _SPLIT_ROUND
    return -(-m // per), per


def _split_q(q_dtype: torch.dtype, k_dtype: torch.dtype) -> bool:
    """Whether the queries need the normalised hi/lo split to meet the keys' dtype (else: a direct cast)."""
    return k_dtype != torch.float32 and q_dtype != k_dtype


def scan_inputs(queries: torch.Tensor, keys: torch.Tensor, placeholder: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``(nrm, consts)`` of a scan: the row norms (``placeholder`` where the path reads none) and the constexprs
    that pick the scan's arithmetic."""
    t, d1 = queries.shape
    split_q = _split_q(queries.dtype, keys.dtype)  # ignored by the BLOCK_T == 1 path
    nrm = placeholder
    if split_q:
        nrm = torch.empty((t,), dtype=torch.float32, device=queries.device)
        _norm_kernel[(t,)](queries, nrm, d1, queries.stride(0), EPS=NORM_EPS, BLOCK_D=1024)
    consts = {
        "T_BUCKET": t_bucket(t),
        "SPLIT_Q": split_q,
        "LO_SCALE": _LO_SCALE[keys.dtype],
        "UPCAST": _interpreting(),
        "IEEE": keys.dtype == torch.float32,
    }
    return nrm, consts


def scan_config(kind: str, consts: dict, config: dict | None = None) -> dict | None:
    """The scan's tile config for ``kind`` ("row", "decode", "prefill"): the interpreter's, else the default one when
    autotuning is off or ``config`` overrides it, else None (the autotuner picks)."""
    if not (_interpreting() or config is not None or not _autotuning()):
        return None
    if _interpreting():
        cfg = dict(_INTERPRET_CONFIG[kind])
    else:
        c = _prune(_DEFAULT_CONFIGS[kind], {}, **consts)[0]
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    cfg.update(config or {})
    return cfg


def plain_config(queries: torch.Tensor, keys: torch.Tensor, consts: dict, config: dict | None = None) -> dict:
    """The tile config the plain scan runs for these inputs (``scan_config``'s, else what the autotuner chose for
    them, else the default one): the cascade rescores with it, so that each key's score is the plain scan's bitwise.
    The autotuner's choice is read from its cache under the key ``Autotuner.run`` forms (the key arguments' values,
    then the dtypes of the tensor arguments), so it is found once the plain op has run on inputs of this bucket."""
    t, d1 = queries.shape
    kind = _kind(t)
    cfg = scan_config(kind, consts, config)
    if cfg is not None:
        return cfg
    _, per = plan_splits(t, keys.shape[0], _sm_count(queries.device), d1 * keys.element_size())
    f32 = str(torch.float32)
    key = (t_bucket(t), d1, split_bucket(per), str(queries.dtype), f32, str(keys.dtype), f32, str(torch.int32))
    tuner = _tuned.get(kind)
    c = getattr(tuner, "cache", {}).get(key) or _prune(_DEFAULT_CONFIGS[kind], {}, **consts)[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def finish(queries, keys, values, gamma: float, ps, pi, outputs, *, closed_empty: bool) -> None:
    """Launches the finishing kernel on the per-split ``(ps, pi)`` into ``outputs = (out, idx, score)``; with
    ``closed_empty`` a closed gate reports ``idx = -1, score = -inf`` (the pre-filtered op's contract)."""
    out, idx, score = outputs
    t, d1 = queries.shape
    interpret = _interpreting()
    _finish_kernel[(t,)](
        queries,
        keys,
        values,
        ps,
        pi,
        out,
        idx,
        score,
        float(gamma),
        t,
        keys.shape[0],
        d1,
        values.shape[1],
        queries.stride(0),
        keys.stride(0),
        values.stride(0),
        out.stride(0),
        ps.shape[0],
        EPS=NORM_EPS,
        RNE_BF16=interpret and queries.dtype == torch.bfloat16 and values.dtype != torch.bfloat16,
        CLOSED_EMPTY=closed_empty,
        BLOCK_S=max(16, triton.next_power_of_2(ps.shape[0])),
        BLOCK_D=256 if interpret else 1024,
        BLOCK_V=256 if interpret else 1024,
        num_warps=4,
    )


def check_device(device: torch.device) -> None:
    """RuntimeError unless Triton kernels can run on ``device`` now."""
    if device.type == "cpu" and not (_interpreting() and _BUILT_FOR_INTERPRETER):
        raise RuntimeError(
            "the Triton kernel runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before "
            "neuraldb_kernels.triton_kernel (and triton) are first imported"
        )


def gated_retrieval_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    *,
    num_splits: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel for 2-D ``queries`` (T, d1) with unit-stride rows; see the module docstring.

    ``num_splits`` and ``config`` (``BLOCK_T``/``BLOCK_N``/``BLOCK_D``, plus ``num_warps``/``num_stages`` on
    CUDA) override the plan and the autotuner; tests use them to force ties across splits and every code path.
    """
    if keys.dtype not in _LO_SCALE:
        raise TypeError(f"keys must have dtype float16/bfloat16/float32, got {keys.dtype}")
    device = queries.device
    check_device(device)
    t, d1 = queries.shape
    m, d2 = keys.shape[0], values.shape[1]
    if m >= 2**31 - 1:
        raise ValueError(f"keys must have fewer than 2**31 - 1 rows, got {m}")
    out = torch.empty((t, d2), dtype=queries.dtype, device=device)
    idx = torch.empty((t,), dtype=torch.int64, device=device)
    score = torch.empty((t,), dtype=torch.float32, device=device)
    if t == 0:
        return out, idx, score
    if m == 0:
        return out.zero_(), idx.fill_(-1), score.fill_(float("-inf"))

    splits, per = plan_splits(t, m, _sm_count(device), d1 * keys.element_size())
    if num_splits is not None:
        per = -(-m // max(1, min(num_splits, m)))
        splits = -(-m // per)
    ps = torch.empty((splits, t), dtype=torch.float32, device=device)
    pi = torch.empty((splits, t), dtype=torch.int32, device=device)

    kind = _kind(t)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        nrm, consts = scan_inputs(queries, keys, ps)
        args = (queries, nrm, keys, ps, pi, t, m, d1, queries.stride(0), keys.stride(0), per, split_bucket(per))
        cfg = scan_config(kind, consts, config)
        if cfg is not None:
            grid = (triton.cdiv(t, cfg["BLOCK_T"]), splits)
            _scan_kernel[grid](*args, **consts, **cfg)
        else:
            grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), splits)
            _tuned_scan(kind)[grid](*args, **consts)
        finish(queries, keys, values, gamma, ps, pi, (out, idx, score), closed_empty=False)
    return out, idx, score


__all__ = ["gated_retrieval_triton", "plan_splits", "split_bucket", "t_bucket"]
