"""Exact post-edit scores for the price of re-scoring only the sequences the gate opens on.

The patch adds a residual at a position only where the best key's cosine with that position's down-projection
input exceeds gamma. That input is computed before the patch acts (earlier in the same layer), so it is the
same in the patched and the unpatched model: a sequence on which no position passes the gate runs through the
patched model exactly as through the unpatched one and keeps its unpatched score. :func:`retrieval_hits` finds,
with a forward that stops at the patched layer, which rows each sequence retrieves (for several key-table sizes
at once); :func:`merge_rescored` re-scores only the sequences that retrieve something.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

__all__ = ["GATE_MARGIN", "gate_fires", "merge_rescored", "prompt_hits", "retrieval_hits"]

T = TypeVar("T")

# The queries here come from other batches (other padding) than the scoring forwards, which moves cosines by
# ~1e-6; a position this close below gamma counts as open, which can only cost an unneeded re-score.
GATE_MARGIN = 1e-3


@torch.inference_mode()
def retrieval_hits(
    model,
    layer: int,
    seqs: Sequence[Sequence[int]],
    keys: torch.Tensor,
    gamma: float,
    *,
    sizes: Sequence[int] | None = None,
    margin: float = GATE_MARGIN,
    batch_size: int = 64,
    pad_id: int = 0,
    focus: Sequence[int] | None = None,
) -> list[list[list[int]]] | tuple[list[list[list[int]]], list[list[list[int]]]]:
    """Rows of ``keys`` that each token sequence retrieves, per key-table size.

    ``keys`` (m, d1) are the database's unit rows; a table of size n is its first n rows (``sizes``, default
    ``[m]``), so growing databases that share their first rows are handled in one forward. Returns
    ``hits[size_index][sequence]``: the distinct rows retrieved at the positions where the best cosine exceeds
    ``gamma - margin``, in order of first retrieval. The best row per position is the smallest index reaching
    the maximum, as in :func:`neuraldb_kernels.reference.best_keys`. The model must not be patched at
    ``layer`` by anything that changes the down-projection's input (a neuraldb patch changes only its output).
    With ``focus`` (one position per sequence) it also returns, in the same layout, the row retrieved at that
    position alone (an empty list where the gate is closed there).
    """
    from neuraldb_kernels import normalize_queries

    from ..editing import model_access

    sizes = [len(keys)] if sizes is None else list(sizes)
    if sorted(sizes) != sizes or (sizes and (sizes[0] < 0 or sizes[-1] > len(keys))):
        raise ValueError(f"sizes must be increasing and within 0..{len(keys)}, got {sizes}")
    h = model_access.handles(model, layer)
    k = keys.float()
    bounds = [0, *sizes]
    out: list[list[list[int]]] = [[] for _ in sizes]
    at: list[list[list[int]]] = [[] for _ in sizes]
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        q, mask = model_access.down_proj_inputs(h, chunk, pad_id)
        qn = normalize_queries(q.to(k.device))
        best = torch.full(mask.shape, float("-inf"), device=qn.device)
        idx = torch.full(mask.shape, -1, dtype=torch.long, device=qn.device)
        for si in range(len(sizes)):
            lo, hi = bounds[si], bounds[si + 1]
            if hi > lo:
                sc = qn @ k[lo:hi].T
                cb, ci = sc.max(-1)
                better = cb > best  # strict: on ties the earlier row wins
                best = torch.where(better, cb, best)
                idx = torch.where(better, ci + lo, idx)
            open_ = (best > gamma - margin) & mask
            for r in range(len(chunk)):
                rows = idx[r][open_[r]].tolist()
                out[si].append(list(dict.fromkeys(rows)))
                if focus is not None:
                    p = focus[s + r]
                    at[si].append([int(idx[r, p])] if open_[r, p] else [])
    return out if focus is None else (out, at)


def gate_fires(
    model, layer: int, seqs: Sequence[Sequence[int]], keys: torch.Tensor, gamma: float, **kwargs
) -> list[bool]:
    """Whether the gate opens at any position of each token sequence (``kwargs``: :func:`retrieval_hits`'s)."""
    return [bool(h) for h in retrieval_hits(model, layer, seqs, keys, gamma, **kwargs)[0]]


def prompt_hits(
    model,
    tok,
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    layer: int,
    keys: torch.Tensor,
    gamma: float,
    last_prompt_token: bool = False,
    **kwargs,
) -> list[list[list[int]]] | tuple[list[list[list[int]]], list[list[list[int]]]]:
    """:func:`retrieval_hits` of text prompts with several continuations each (as :func:`.scoring.score_grouped`
    scores them, tokenised by :func:`.scoring.encode_pair`): per size, per prompt, the rows retrieved anywhere in
    the prompt followed by any of its continuations. With ``last_prompt_token`` it also returns the row retrieved
    at the prompt's last token, whose output predicts the continuation's first token."""
    from ..templates import pad_id
    from .scoring import encode_pair

    seqs, owner, last = [], [], []
    for p, (c, ts) in enumerate(zip(contexts, continuations)):
        for t in ts:
            a, b = encode_pair(tok, c, t)
            seqs.append(a + b)
            owner.append(p)
            last.append(len(a) - 1)
    res = retrieval_hits(
        model, layer, seqs, keys, gamma, pad_id=pad_id(tok), focus=last if last_prompt_token else None, **kwargs
    )

    def merge(per_size: list[list[list[int]]]) -> list[list[list[int]]]:
        out = []
        for hits in per_size:
            merged: list[list[int]] = [[] for _ in contexts]
            for p, h in zip(owner, hits):
                merged[p] = list(dict.fromkeys(merged[p] + h))
            out.append(merged)
        return out

    return (merge(res[0]), merge(res[1])) if last_prompt_token else merge(res)


def merge_rescored(
    baseline: Sequence[T], fires: Sequence[bool], rescore: Callable[[list[int]], Sequence[T]]
) -> list[T]:
    """``baseline`` with the entries where ``fires`` is true replaced by ``rescore(their indices)`` (in order)."""
    if len(baseline) != len(fires):
        raise ValueError(f"{len(baseline)} baseline entries but {len(fires)} gate flags")
    todo = [i for i, f in enumerate(fires) if f]
    out = list(baseline)
    new = rescore(todo) if todo else []
    if len(new) != len(todo):
        raise ValueError(f"rescore returned {len(new)} entries for {len(todo)} indices")
    for i, v in zip(todo, new):
        out[i] = v
    return out
