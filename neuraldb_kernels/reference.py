"""The plain PyTorch reference of ``gated_retrieval``: the specification every backend is tested against.

For query rows ``q`` (T, d1), unit-norm key rows ``keys`` (m, d1) and residual rows ``values`` (m, d2)::

    qn    = q / max(||q||, 1e-12)                  (fp32)
    score = max_i  qn . keys[i]                    (fp32 accumulation)
    idx   = smallest i reaching that maximum       (-1 when m == 0)
    out   = values[idx] in q's dtype if score > gamma (strictly), else 0

The key scan is chunked so that at most ``_SCORE_CHUNK_BYTES`` of fp32 scores exist at any time, whatever
the number of keys (1M x 14336 keys never materialise a (T, m) matrix).
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-12
# Bound on the (T, chunk) fp32 score block plus the fp32 copy of the key chunk.
_SCORE_CHUNK_BYTES = 64 * 2**20


def normalize_queries(queries: torch.Tensor) -> torch.Tensor:
    """Rows of ``queries`` scaled to unit length in fp32 (zero rows stay zero)."""
    q = queries.float()
    return q / q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _chunk_rows(t: int, d1: int) -> int:
    per_row = 4 * (t + d1)
    return max(1, _SCORE_CHUNK_BYTES // per_row)


def best_keys(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, idx)`` of the best key for each row of 2-D ``queries``; ``(-inf, -1)`` when ``keys`` is empty."""
    t, m = queries.shape[0], keys.shape[0]
    qn = normalize_queries(queries)
    best = torch.full((t,), float("-inf"), dtype=torch.float32, device=queries.device)
    best_idx = torch.full((t,), -1, dtype=torch.int64, device=queries.device)
    step = _chunk_rows(t, keys.shape[1])
    for start in range(0, m, step):
        scores = qn @ keys[start : start + step].float().T
        # argmax returns the first maximal index; strict ">" keeps earlier chunks on ties.
        chunk_idx = scores.argmax(dim=1)
        chunk_best = scores.gather(1, chunk_idx[:, None]).squeeze(1)
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        best_idx = torch.where(better, chunk_idx + start, best_idx)
    return best, best_idx


def gated_retrieval_reference(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for 2-D ``queries`` (T, d1); returns ``(out (T, d2), idx (T,), score (T,))``.

    Example::

        >>> keys = torch.eye(3, 4).half()
        >>> out, idx, score = gated_retrieval_reference(torch.tensor([[0.0, 2.0, 0.0, 0.0]]), keys, torch.eye(3), 0.5)
        >>> idx.tolist(), score.tolist(), out.tolist()
        ([1], [1.0], [[0.0, 1.0, 0.0]])
    """
    score, idx = best_keys(queries, keys)
    out = torch.zeros((queries.shape[0], values.shape[1]), dtype=queries.dtype, device=queries.device)
    if keys.shape[0] == 0:
        return out, idx, score
    gate = score > gamma
    rows = values[idx.clamp_min(0)].to(queries.dtype)
    out = torch.where(gate[:, None], rows, out)
    return out, idx, score
