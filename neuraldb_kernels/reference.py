"""The specification of ``gated_retrieval`` (every backend is tested against it) and the plain PyTorch backend.

For query rows ``q`` (T, d1), unit-norm key rows ``keys`` (m, d1) and residual rows ``values`` (m, d2)::

    score_i = fp32( q . keys[i] / max(||q||, 1e-12) )     the exact cosine, rounded once to fp32
    score   = max_i score_i                                NaN scores never win
    idx     = smallest i with score_i == score             -1 (and score -inf) when no score_i is a number
    out     = values[idx] in q's dtype if score > fp32(gamma) (strictly), else 0
    with per-row thresholds t (m,) fp32: out is kept only where also score > t[idx] (:func:`apply_row_thresholds`)

Per-row thresholds gate the best row only: the argmax is over all rows, then that row's own threshold is tested
(never a fall back to the second best row). A threshold at or below gamma changes nothing, so the gate of row ``j`` is
``score > max(gamma, t[j])`` and an exact scan at gamma followed by the row's own test computes it exactly.

:func:`gated_retrieval_reference` computes the exact cosine in float64, which is machine-independent: the fp32 value
it rounds to depends on the BLAS build only where the exact cosine lies within ~1e-16 of an fp32 rounding boundary.
An fp32 GEMM is not: the same key row scored in a GEMM's main block and in its tail can differ by one fp32 step, and
which index wins a tie then depends on the CPU. The backends compute in fp32 (fast); each of their scores is within
:func:`score_error_bound` of the specification's, so they may differ from it only where two keys' exact scores, or
the best score and gamma, are within that bound of each other.

Non-finite inputs: a query row with a NaN or infinite element normalises to NaN, every score is NaN, and the row gets
``idx = -1, score = -inf, out = 0``; a key row with NaN gives NaN scores and is never retrieved; a key row with an
infinite element scores +-inf or NaN (IEEE rules, the same in every backend) and can win with +inf. The database
refuses non-finite keys, so only direct callers of the op meet these cases.

:func:`gated_retrieval_torch` is the "torch" backend (it serves where no compiled kernel does): the specification
on CPU, fp32 elsewhere. Both are chunked so that at most ``_SCORE_CHUNK_BYTES`` of scores exist at any time,
whatever the number of keys (1M x 14336 keys never materialise a (T, m) matrix).
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-12
# Bound on the (T, chunk) score block plus the converted copy of the key chunk.
_SCORE_CHUNK_BYTES = 64 * 2**20
_U32 = 2.0**-24
# Where the "torch" backend scores in float64: on CPU it is the fallback when the extension is missing, and float64
# costs it ~2x; most GPUs run float64 at 1/32-1/64 of fp32, and MPS has none.
_FLOAT64_DEVICES = ("cpu",)


def score_error_bound(d1: int) -> float:
    """How far a backend's fp32 score may be from the specification's, for unit keys of width ``d1``.

    An fp32 dot product of ``d1`` terms errs by at most ``d1 u sum|q_i k_i|`` (``u = 2^-24``) and normalising adds a
    few ``d1 u / 2``; with unit rows ``sum|q_i k_i| <= 1``. The ``2^-16`` covers the Triton kernel's bf16 split of
    the query (error ``u_bf16^2``). The rounding of the specification itself adds ``u``.

    Example::

        >>> round(score_error_bound(1536), 6)
        0.000199
    """
    return 2 * (d1 + 8) * _U32 + 2.0**-16


def normalize_queries(queries: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of ``queries`` scaled to unit length in ``dtype`` (zero rows stay zero; non-finite rows become NaN)."""
    q = queries.to(dtype)
    return q / q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _chunk_rows(t: int, d1: int, itemsize: int) -> int:
    return max(1, _SCORE_CHUNK_BYTES // (itemsize * (t + d1)))


def best_keys(
    queries: torch.Tensor, keys: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score fp32, idx)`` of the best key for each row of 2-D ``queries``, scored in ``dtype`` and rounded to fp32;
    ``(-inf, -1)`` where no key has a score that is a number (an empty ``keys``, a non-finite query row).

    float64 (the default) is the specification; float32 is the "torch" backend's arithmetic.
    """
    t, m = queries.shape[0], keys.shape[0]
    qn = normalize_queries(queries, dtype)
    best = torch.full((t,), float("-inf"), dtype=torch.float32, device=queries.device)
    best_idx = torch.full((t,), -1, dtype=torch.int64, device=queries.device)
    step = _chunk_rows(t, keys.shape[1], torch.finfo(dtype).bits // 8)
    for start in range(0, m, step):
        scores = (qn @ keys[start : start + step].to(dtype).T).float()
        # Non-finite scores never win (NaN would: argmax orders it above every number).
        scores = scores.nan_to_num(nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
        # argmax returns the first maximal index; strict ">" keeps earlier chunks on ties, and -inf never wins.
        chunk_idx = scores.argmax(dim=1)
        chunk_best = scores.gather(1, chunk_idx[:, None]).squeeze(1)
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        best_idx = torch.where(better, chunk_idx + start, best_idx)
    return best, best_idx


def _gated(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    score, idx = best_keys(queries, keys, dtype=dtype)
    out = torch.zeros((queries.shape[0], values.shape[1]), dtype=queries.dtype, device=queries.device)
    if keys.shape[0] == 0:
        return out, idx, score
    # A fp32 tensor against a Python float compares in fp32: the gate is score > fp32(gamma), as in every kernel.
    gate = (score > gamma) & (idx >= 0)
    rows = values[idx.clamp_min(0)].to(queries.dtype)
    out = torch.where(gate[:, None], rows, out)
    return out, idx, score


def gated_retrieval_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    thresholds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The specification for 2-D ``queries`` (T, d1); returns ``(out (T, d2), idx (T,), score (T,))``; with
    per-row ``thresholds`` (m,) as the module docstring says.

    Example::

        >>> keys = torch.eye(3, 4).half()
        >>> out, idx, score = gated_retrieval_reference(torch.tensor([[0.0, 2.0, 0.0, 0.0]]), keys, torch.eye(3), 0.5)
        >>> idx.tolist(), score.tolist(), out.tolist()
        ([1], [1.0], [[0.0, 1.0, 0.0]])
    """
    out, idx, score = _gated(queries, keys, values, gamma, torch.float64)
    return (out if thresholds is None else apply_row_thresholds(out, idx, score, thresholds)), idx, score


def gated_retrieval_torch(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "torch" backend: the specification itself on CPU; in fp32 on other devices, where its scores are within
    :func:`score_error_bound` of it like the compiled kernels' but identical key rows may score an ulp apart (an fp32
    GEMM may sum the rows of a tile's tail in another order), so exact ties are the one guarantee it lacks there.

    Example::

        >>> keys = torch.eye(3, 4).half()
        >>> gated_retrieval_torch(torch.tensor([[0.0, 2.0, 0.0, 0.0]]), keys, torch.eye(3), 0.5)[1].tolist()
        [1]
    """
    dtype = torch.float64 if queries.device.type in _FLOAT64_DEVICES else torch.float32
    return _gated(queries, keys, values, gamma, dtype)


def apply_row_thresholds(
    out: torch.Tensor, idx: torch.Tensor, score: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """``out`` of a scan at gamma with the rows whose best key fails its own threshold zeroed: where
    ``score > thresholds[idx]`` fails (``idx``/``score`` as the op returns them, any leading shape; ``thresholds``
    ``(m,)`` fp32 on their device). A closed row (``idx = -1``) stays zero.

    Example::

        >>> out = torch.ones(2, 3); idx = torch.tensor([0, 1]); score = torch.tensor([0.9, 0.9])
        >>> apply_row_thresholds(out, idx, score, torch.tensor([-1.0, 0.95]))[:, 0].tolist()
        [1.0, 0.0]
    """
    if thresholds.numel() == 0:
        return out
    keep = score > thresholds[idx.clamp_min(0)]
    return torch.where(keep[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
