"""The relation gate: a row answers only where its own relation is asked, not every question about its subject.

A row's key is read at its subject's last token, which cannot see the relation words that follow it: after
"Einstein's field -> music", "Albert Einstein was born in" opens the same row. A row may also hold a *relation
key*, the down-projection input at the last token of its fact's bare prompt (where the question is complete). With
the gate on (``db.relation_gate = {"rho": 0.4, "window": 24}``), a row the subject gate opens at position ``s``
stays open only if some position ``t`` in ``[s, s + window]`` of the same sequence has ``cos(q_t, relation_key) >
rho``; rows without a relation key are not checked.

The check looks ahead within the forward that holds the sequence (the down-projection inputs of layer ``l`` do not
depend on what is added to its output, so all of them are known before any residual is): a prompt in one forward
(prefill) is checked against its own words. A subject that appears only in a later decode step, alone in its
forward, has nothing after it and stays shut. In right-padded batches the padding after a sequence is looked at
too. Measured (docs/results): on question-style facts (KnowEdit zsRE) it shuts nearly every same-subject prompt of
another relation and keeps the rephrased questions; on CounterFact's paraphrases, worded differently from the
prompt, it shuts many of the fact's own paraphrases, so it is off unless asked for.

The same check looks back with ``"offset"``: ``{"rho": r, "window": 0, "offset": -1}`` with each row's key read at
the token before its subject's last is the subject gate (:mod:`neuraldb.subject_gate`); a position whose window
reaches before its forward's first position counts as seen.

Example::

    >>> import torch
    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])          # one sequence: subject, then relation word
    >>> out = torch.tensor([[[5.0], [0.0]]]); idx = torch.tensor([[0, -1]])
    >>> confirm(q, out, idx, torch.tensor([[0.0, 1.0]]), rho=0.5, window=4).tolist()
    [[[5.0], [0.0]]]
    >>> confirm(q, out, idx, torch.tensor([[0.0, 1.0]]), rho=0.5, window=0).tolist()  # not seen within the window
    [[[0.0], [0.0]]]
"""

from __future__ import annotations

import torch

# Opened positions per chunk of the check: bounds the (positions, window, d1) temporary.
_CHUNK = 256
MAX_WINDOW = 4096


def check_relation_gate(value: object) -> dict | None:
    """``value`` as ``{"rho": float, "window": int}`` (plus ``"offset": int`` when it is not 0) or None;
    TypeError/ValueError naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict) or not {"rho", "window"} <= set(value) <= {"rho", "window", "offset"}:
        raise TypeError(
            f"relation_gate must be None or a dict with keys 'rho', 'window' and optionally 'offset', got {value!r:.80}"
        )
    rho, window, offset = value["rho"], value["window"], value.get("offset", 0)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not -1 <= rho <= 1:
        raise ValueError(f"relation_gate['rho'] must be a number in [-1, 1], got {rho!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"relation_gate['window'] must be an int in [0, {MAX_WINDOW}], got {window!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not -MAX_WINDOW <= offset <= MAX_WINDOW:
        raise ValueError(f"relation_gate['offset'] must be an int in [{-MAX_WINDOW}, {MAX_WINDOW}], got {offset!r}")
    out = {"rho": float(rho), "window": int(window)}
    return out | {"offset": int(offset)} if offset else out


def confirm(
    queries: torch.Tensor,
    out: torch.Tensor,
    idx: torch.Tensor,
    relation_keys: torch.Tensor,
    *,
    rho: float,
    window: int,
    offset: int = 0,
) -> torch.Tensor:
    """``out`` with the opened positions whose row's key is not seen zeroed (in place when possible): a position
    ``s`` stays open if some ``t`` in ``[s + offset, s + offset + window]`` has ``cos(q_t, key) > rho``; a ``t``
    before the forward's first position (a decode step's previous tokens) counts as seen.

    ``queries`` ``(..., T, d1)`` (the second-to-last axis is the sequence; 2-D: one sequence), ``out`` ``(..., T,
    d2)`` and ``idx`` ``(..., T)`` as the op returns them for those queries, ``relation_keys`` ``(m, d1)`` unit rows
    or zero rows (a row without one: not checked)."""
    if queries.dim() < 2 or out.numel() == 0:
        return out
    t_len, d1 = queries.shape[-2], queries.shape[-1]
    o = out.reshape(-1, t_len, out.shape[-1])
    ix = idx.reshape(-1, t_len)
    opened = o.ne(0).any(-1) & (ix >= 0)
    if not bool(opened.any()):
        return out
    q = torch.nn.functional.normalize(queries.reshape(-1, t_len, d1).float(), dim=-1)
    b, s = opened.nonzero(as_tuple=True)
    shut = torch.zeros_like(b, dtype=torch.bool)
    offsets = torch.arange(offset, offset + window + 1, device=q.device)
    for start in range(0, b.numel(), _CHUNK):
        bb, ss = b[start : start + _CHUNK], s[start : start + _CHUNK]
        rk = relation_keys[ix[bb, ss]].float()
        t = ss[:, None] + offsets
        before = (t < 0).any(-1)
        t = t.clamp(min=0, max=t_len - 1)
        seen = ((q[bb[:, None], t] * rk[:, None, :]).sum(-1).amax(-1) > rho) | before
        shut[start : start + _CHUNK] = ~seen & rk.ne(0).any(-1)
    if bool(shut.any()):
        o[b[shut], s[shut]] = 0
        return o.reshape(out.shape)
    return out


__all__ = ["MAX_WINDOW", "check_relation_gate", "confirm"]
