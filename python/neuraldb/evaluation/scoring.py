"""Shared teacher-forced log-probability helpers used by every evaluation in this package.

One forward pass scores ``context + continuation`` for a whole batch. Sequences are **left-padded** so that
every continuation ends at the last position; only the last ``max(len(continuation)) + 1`` positions are
projected to the vocabulary (``logits_to_keep`` where the model supports it), and ``position_ids`` are
computed from the attention mask so absolute-position models see the same positions as without padding.

Tokenisation follows lm-evaluation-harness: ``continuation_ids = encode(context + continuation)[len(encode(context)):]``
so the continuation is tokenised exactly as the model sees it in running text; where the tokeniser merges across
the boundary (the context's tokens are not a prefix of the whole), it falls back to encoding the continuation on
its own without special tokens (ROME's ``tok(" " + target)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neuraldb import templates
from neuraldb.architectures import cache_kwarg

__all__ = ["ContinuationScore", "encode_pair", "progress", "score_continuations", "score_grouped", "score_token_ids"]


def progress(iterable, *, desc: str | None = None, total: int | None = None, enabled: bool = True, unit: str = "batch"):
    """tqdm progress bar (to stderr) when ``enabled``, counting in ``unit``; the bare iterable otherwise."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, unit=unit)


@dataclass
class ContinuationScore:
    """Teacher-forced scores of one continuation: per-token log-probabilities and the model's top-1 tokens."""

    token_ids: list[int]
    token_logprobs: list[float]
    argmax_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def sum_logprob(self) -> float:
        """log P(continuation | context), the whole multi-token continuation."""
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        """Per-token average log-probability (ROME/MEMIT divide the NLL by the target length)."""
        return self.sum_logprob / max(self.n_tokens, 1)

    @property
    def token_correct(self) -> list[bool]:
        """Per target token: is it the model's top-1 prediction (teacher forcing)?"""
        return [a == t for a, t in zip(self.argmax_ids, self.token_ids)]

    @property
    def token_accuracy(self) -> float:
        c = self.token_correct
        return sum(c) / len(c) if c else 0.0

    @property
    def is_greedy(self) -> bool:
        """Every target token is the top-1 prediction (lm-eval's ``is_greedy``)."""
        return all(self.token_correct)


def _encode(tok, text: str, *, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` (with the tokeniser's special tokens, e.g. BOS) and of ``continuation``.

    Trailing spaces of the context move to the continuation (lm-eval does the same), so
    ``("Paris is in ", "France")`` scores the token " France".
    """
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], " " * n_space + continuation
    ctx = _encode(tok, context, special=True)
    whole = _encode(tok, context + continuation, special=True)
    if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx) :]
    return ctx, _encode(tok, continuation, special=False)


def _supports(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.inference_mode()
def score_token_ids(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    desc: str | None = None,
    show_progress: bool = True,
) -> list[ContinuationScore]:
    """Score already-tokenised ``(context_ids, continuation_ids)`` pairs. Batches are formed from pairs of
    similar total length (sorted), results come back in input order. ``context_ids`` must be non-empty."""
    n = len(pairs)
    out: list[ContinuationScore | None] = [None] * n
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    device = _device(model)
    use_keep = _supports(model, "logits_to_keep")
    use_pos = _supports(model, "position_ids")
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for batch in progress(batches, desc=desc, enabled=show_progress and len(batches) > 1):
        seqs = []
        for i in batch:
            ctx, cont = list(pairs[i][0]), list(pairs[i][1])
            if not ctx:
                raise ValueError("context must contain at least one token (use the tokeniser's BOS for empty text)")
            if not cont:
                raise ValueError("continuation must contain at least one token")
            seqs.append((ctx, cont))
        length = max(len(c) + len(t) for c, t in seqs)
        max_cont = max(len(t) for _, t in seqs)
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for r, (c, t) in enumerate(seqs):
            s = c + t
            ids[r, length - len(s) :] = torch.tensor(s)
            mask[r, length - len(s) :] = 1
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if use_pos:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        keep = max_cont + 1
        if use_keep:
            # Positions as a tensor, not the int: transformers then gathers them into a contiguous block. The int
            # slices a strided view, and bf16 matmuls on CPU run ~100x slower on that (135 s against 0.8 s per
            # batch of 32 for Gemma-3-270M's 262k-token head).
            kwargs["logits_to_keep"] = torch.arange(length - keep, length, device=device)
        logits = model(**kwargs).logits
        logits = logits[:, -keep:, :].float()
        # position j of the kept window predicts the token at window position j + 1
        logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
        top = logits[:, :-1, :].argmax(-1)
        for r, (i, (_, t)) in enumerate(zip(batch, seqs)):
            k = len(t)
            tgt = torch.tensor(t, device=logp.device)
            rows = logp[r, keep - 1 - k :, :]
            lp = rows.gather(-1, tgt[:, None])[:, 0]
            out[i] = ContinuationScore(list(t), lp.tolist(), top[r, keep - 1 - k :].tolist())
    return out  # type: ignore[return-value]


def score_continuations(
    model,
    tok,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 32,
    desc: str | None = None,
    show_progress: bool = True,
) -> list[ContinuationScore]:
    """Teacher-forced scores of ``continuations[i]`` after ``contexts[i]`` (strings; see :func:`encode_pair`)."""
    if len(contexts) != len(continuations):
        raise ValueError("contexts and continuations must have the same length")
    pairs = [encode_pair(tok, c, t) for c, t in zip(contexts, continuations)]
    return score_token_ids(
        model, pairs, pad_id=templates.pad_id(tok), batch_size=batch_size, desc=desc, show_progress=show_progress
    )


def _out_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None  # transformers >= 5.2x names it "cache"
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return cache if hasattr(cache, "batch_select_indices") else None


@torch.inference_mode()
def score_grouped_token_ids(
    model,
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    desc: str | None = None,
    show_progress: bool = True,
) -> list[list[ContinuationScore]]:
    """Score several continuations of each shared context, running the context **once**.

    Pass 1 runs the left-padded contexts with a KV cache and reads the first continuation token's distribution
    from the last position; pass 2 (only when some continuation has 2+ tokens) repeats each context's cache once per
    continuation and feeds the continuations' tokens after it, with ``position_ids`` continuing the context's.
    Same numbers as :func:`score_token_ids` on ``context + continuation`` (up to float rounding), at a fraction of
    the cost when contexts are long and continuations short (CounterFact's two targets, multiple-choice letters).
    Models that return no cache fall back to :func:`score_token_ids`.
    """
    results: list[list[ContinuationScore | None]] = [[None] * len(c) for _, c in groups]
    if not groups:
        return []
    device = _device(model)
    order = sorted(range(len(groups)), key=lambda g: len(groups[g][0]))
    batches, cur, cur_rows = [], [], 0
    for g in order:  # batch_size bounds the number of continuation rows in pass 2
        k = max(1, len(groups[g][1]))
        if cur and cur_rows + k > batch_size:
            batches.append(cur)
            cur, cur_rows = [], 0
        cur.append(g)
        cur_rows += k
    if cur:
        batches.append(cur)
    use_keep = _supports(model, "logits_to_keep")
    for batch in progress(batches, desc=desc, enabled=show_progress and len(batches) > 1):
        ctxs = [list(groups[g][0]) for g in batch]
        if any(not c for c in ctxs):
            raise ValueError("context must contain at least one token (use the tokeniser's BOS for empty text)")
        P = max(len(c) for c in ctxs)
        ids = torch.full((len(batch), P), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), P), dtype=torch.long)
        for r, c in enumerate(ctxs):
            ids[r, P - len(c) :] = torch.tensor(c)
            mask[r, P - len(c) :] = 1
        kwargs = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
            "use_cache": True,
        }
        if use_keep:
            kwargs["logits_to_keep"] = 1
        out = model(**kwargs)
        cache = _out_cache(out)
        if cache is None:
            flat = [(groups[g][0], t) for g in batch for t in groups[g][1]]
            scores = iter(score_token_ids(model, flat, pad_id=pad_id, batch_size=batch_size, show_progress=False))
            for g in batch:
                results[g] = [next(scores) for _ in groups[g][1]]
            continue
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (B, V)
        first_top = first.argmax(-1)
        rows = [(b, j, list(t)) for b, g in enumerate(batch) for j, t in enumerate(groups[g][1])]
        if not rows:
            continue
        if any(not t for _, _, t in rows):
            raise ValueError("continuation must contain at least one token")
        T = max(len(t) for _, _, t in rows)
        rest_lp = rest_top = None
        if T > 1:
            sel = torch.tensor([b for b, _, _ in rows], dtype=torch.long, device=device)
            cache.batch_select_indices(sel)
            inp = torch.full((len(rows), T - 1), pad_id, dtype=torch.long)
            m2 = torch.zeros((len(rows), T - 1), dtype=torch.long)
            pos = torch.zeros((len(rows), T - 1), dtype=torch.long)
            for r, (b, _, t) in enumerate(rows):
                n = len(t) - 1
                if n:
                    inp[r, :n] = torch.tensor(t[:-1])
                    m2[r, :n] = 1
                pos[r] = len(ctxs[b]) + torch.arange(T - 1)
            full_mask = torch.cat([mask.to(device)[sel], m2.to(device)], dim=1)
            cache_kw = cache_kwarg(model)
            out2 = model(
                input_ids=inp.to(device),
                attention_mask=full_mask,
                position_ids=pos.to(device),
                use_cache=True,
                **{cache_kw: cache},
            )
            logits2 = out2.logits.float()
            rest_lp = torch.log_softmax(logits2, dim=-1)
            rest_top = logits2.argmax(-1)
        for r, (b, j, t) in enumerate(rows):
            lps = [float(first[b, t[0]])]
            tops = [int(first_top[b])]
            for i in range(1, len(t)):
                lps.append(float(rest_lp[r, i - 1, t[i]]))
                tops.append(int(rest_top[r, i - 1]))
            results[batch[b]][j] = ContinuationScore(t, lps, tops)
    return results  # type: ignore[return-value]


def score_grouped(
    model,
    tok,
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    desc: str | None = None,
    show_progress: bool = True,
) -> list[list[ContinuationScore]]:
    """:func:`score_grouped_token_ids` on strings: ``continuations[i]`` are the options after ``contexts[i]``.
    Tokenisation as :func:`encode_pair` (per option; options that merge with the context fall back alone)."""
    groups = []
    flat_fallback = []
    for gi, (c, ts) in enumerate(zip(contexts, continuations)):
        pairs = [encode_pair(tok, c, t) for t in ts]
        ctx = pairs[0][0] if pairs else _encode(tok, c, special=True)
        if any(p[0] != ctx for p in pairs):  # trailing-space moves differ per option: score them unshared
            flat_fallback.append(gi)
        groups.append((ctx, [p[1] for p in pairs], pairs))
    res = score_grouped_token_ids(
        model,
        [(g[0], g[1]) if i not in flat_fallback else (g[0], []) for i, g in enumerate(groups)],
        pad_id=templates.pad_id(tok),
        batch_size=batch_size,
        desc=desc,
        show_progress=show_progress,
    )
    for gi in flat_fallback:
        res[gi] = score_token_ids(
            model, groups[gi][2], pad_id=templates.pad_id(tok), batch_size=batch_size, show_progress=False
        )
    return res
