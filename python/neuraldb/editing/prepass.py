"""The no-grad pass before the optimisation steps: everything the steps reuse, computed once per batch of facts.

A batch's rows are padded to one layout (see :mod:`neuraldb.editing.engine`), but running them through the model in
that layout computes mostly padding: a bare prompt sits in a block as wide as the longest prefixed context, and
every prefixed context repeats the same prefix tokens for every fact. So the pass runs the rows in groups, one per
place among a fact's rows (the bare prompt, each prefixed context, the KL prompt), each group in a layout of its own
width; the tokens every row of a group begins with (the template's start and the generated prefix) run once, and
the group's rows continue from that prefix's key/value cache. The results are then laid out in the batch's layout.
Padding is masked and a shared prefix's states are the states each row would compute for it, so this equals one
padded pass up to floating-point rounding (``tests/test_editing.py``: the steps' forward equals a plain forward).

Example::

    >>> prep = prepare(handles, make_batch(rows, pad_id, "cpu")) # doctest: +SKIP
    >>> prep.keys.shape                                                    # (rows, d1)   doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from neuraldb.editing.contexts import Batch, call_cost, length_buckets
from neuraldb.editing.model_access import (
    Handles,
    StopForward,
    build_cache,
    by_token,
    first_output,
    hooks,
    kv_tensors,
    logits_of,
    new_cache,
    right_padded,
    stubbed_layers,
)

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    """Everything the optimisation steps reuse, from one no-grad pass over all rows of a chunk."""

    batch: Batch
    kvs: list  # per layer (k, v) of the prefix block (B, heads, P, hd), or None
    h_in: torch.Tensor | None  # layer-l input at suffix positions (B, S, H); None when l == 0
    tuple_out: bool
    keys: torch.Tensor  # (B, d1) float32
    h_norm: torch.Tensor  # (B,) norm of layer l's output at the subject's last token
    kl_ref: torch.Tensor | None  # (n_kl, V) reference log-probs of the KL rows


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _groups(rows) -> list[list[int]]:
    """Row indices by their place among their fact's rows."""
    seen: dict[int, int] = {}
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        place = seen.get(r.fact, 0)
        seen[r.fact] = place + 1
        groups.setdefault(place, []).append(i)
    return list(groups.values())


def _shared_len(rows) -> int:
    """How many tokens every row begins with, counting only positions before every row's subject's last token
    (from there on a row depends on its residual)."""
    if len(rows) < 2:
        return 0
    first, n = rows[0].ids, min(r.subj for r in rows)
    c = 0
    while c < n and all(r.ids[c] == first[c] for r in rows):
        c += 1
    return c


def _forward(h: Handles, ids, mask, pos, precision, past, pairs, got):
    """One no-grad forward of ``ids`` continuing ``past`` (per-layer (k, v) or None). With a compute dtype, layers
    <= l run in the model's dtype and those above, from layer l's output (``got["h_out"]``, which a hook in
    ``pairs`` must store before stopping the pass), in the compute dtype. Returns the final output (None if the
    pass stopped) and the per-layer (k, v) of past and new positions together."""
    n, l = len(h.layers), h.layer
    low = precision.dtype if precision is not None else None

    def cache_for(layers):
        # layer 0 is always filled: the mask and positions are derived from its length
        return new_cache(h.model) if past is None else build_cache(h.model, past, sorted({0, *layers}))

    run = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True}
    cache = cache_for(range(l + 1) if low is not None else range(n))
    out = None
    with hooks(*pairs):
        try:
            out = h.base(**run, **{h.cache_kwarg: cache})
        except StopForward:
            pass
    kvs = kv_tensors(cache)
    if low is not None:
        upper = cache_for(range(l + 1, n))
        with precision.compute(), stubbed_layers(h.layers, l + 1, got["h_out"], got["tuple_out"]):
            out = h.base(**run, **{h.cache_kwarg: upper})
        kvs = [a if i <= l else b for i, (a, b) in enumerate(zip(kvs, kv_tensors(upper)))]
    return out, kvs


def _head(h: Handles, ids: list[int], device, precision, got) -> list:
    """The per-layer (k, v) of the tokens a group's rows share."""

    def below(mod, args, out):
        got["tuple_out"] = isinstance(out, (tuple, list))

    def stop_at_l(mod, args, out):
        if precision is not None and precision.dtype is not None:
            got["h_out"] = first_output(out).to(precision.dtype)
            raise StopForward

    pairs = [(h.layers[0].register_forward_hook, below), (h.layers[h.layer].register_forward_hook, stop_at_l)]
    t = torch.tensor([ids], device=device)
    _, kvs = _forward(
        h, t, torch.ones_like(t), torch.arange(len(ids), device=device)[None], precision, None, pairs, got
    )
    return kvs


def _bucket_pass(h: Handles, rows, c: int, past, S: int, pad_id: int, device, precision, got):
    """The rows unpadded but for their tail (token i at column i), continuing the shared ``past`` of ``c`` tokens.
    Returns what the batch layout needs: keys, norms, layer-l input at the S positions from each subject's last
    token, the KV of each row's first P columns, the KL rows' reference log-probs."""
    l = h.layer
    low = precision.dtype if precision is not None else None
    ids, mask = right_padded([r.ids for r in rows], pad_id, device)
    W = ids.shape[1]
    pos = torch.arange(W, device=device).expand(len(rows), W)
    at = torch.arange(len(rows), device=device)
    subj = torch.tensor([r.subj - c for r in rows], device=device)  # columns of this pass (it starts at token c)
    window = (subj[:, None] + torch.arange(S, device=device)).clamp(max=W - c - 1)

    def stop_at_l(out):
        if low is not None:
            got["h_out"] = first_output(out).to(low)
            raise StopForward

    def below(mod, args, out):
        got["tuple_out"] = isinstance(out, (tuple, list))

    def pre_layer(mod, args, kwargs):
        x = _hidden_arg(args, kwargs)
        got["h_in"] = x[at[:, None], window]

    def post_layer(mod, args, out):
        got["h_norm"] = first_output(out)[at, subj].float().norm(dim=-1)
        stop_at_l(out)

    def grab(mod, inp, out):
        got["k"] = by_token(first_output(inp), len(rows))[at, subj].float()

    pairs = [  # `below` before `post_layer`: with l == 0 the latter stops the pass
        (h.layers[0].register_forward_hook, below),
        (lambda fn: h.layers[l].register_forward_pre_hook(fn, with_kwargs=True), pre_layer),
        (h.layers[l].register_forward_hook, post_layer),
        (h.down_proj.register_forward_hook, grab),
    ]
    if past is not None:
        past = [None if kv is None else tuple(t.expand(len(rows), -1, -1, -1) for t in kv) for kv in past]
    out, kvs = _forward(h, ids[:, c:], mask, pos[:, c:], precision, past, pairs, got)
    cast = (lambda t: t.to(low)) if low is not None else (lambda t: t)
    kl = [j for j, r in enumerate(rows) if r.kl_pos >= 0]
    kl_ref = None
    if kl:
        last = out.last_hidden_state
        cols = torch.tensor([rows[j].kl_pos - c for j in kl], device=last.device)
        with precision.compute() if low is not None else contextlib.nullcontext():  # the head the steps use
            kl_ref = torch.log_softmax(logits_of(h, last[torch.tensor(kl, device=last.device), cols]), -1)
    return {
        "k": got["k"],
        "h_norm": got["h_norm"],
        "h_in": cast(got["h_in"]) if l > 0 else None,
        "kvs": [None if kv is None else tuple(cast(t) for t in kv) for kv in kvs],
        "kl": kl,
        "kl_ref": kl_ref,
    }


class _Assembly:
    """The batch's tensors, filled bucket by bucket."""

    def __init__(self, batch: Batch):
        self.batch, self.B, self.device = batch, len(batch.rows), batch.ids.device
        self.keys = self.h_norm = self.h_in = None
        self.kvs: list = []
        self.kl_parts: list[tuple[int, torch.Tensor]] = []

    def put(self, idx: list[int], part: dict) -> None:
        at, B, P = torch.tensor(idx, device=self.device), self.B, self.batch.P
        if self.keys is None:
            self.keys = part["k"].new_zeros(B, part["k"].shape[-1])
            self.h_norm = part["h_norm"].new_zeros(B)
            self.kvs = [
                None if kv is None else tuple(t.new_zeros(B, t.shape[1], P, t.shape[3]) for t in kv)
                for kv in part["kvs"]
            ]
            if part["h_in"] is not None:
                self.h_in = part["h_in"].new_zeros(B, self.batch.S, part["h_in"].shape[-1])
        self.keys[at], self.h_norm[at] = part["k"], part["h_norm"]
        for full, got in zip(self.kvs, part["kvs"]):
            if full is not None:
                w = min(P, got[0].shape[2])  # columns >= a row's subject position are masked in the steps
                for f, g in zip(full, got):
                    f[at, :, :w] = g[:, :, :w]
        if self.h_in is not None:
            self.h_in[at] = part["h_in"]
        self.kl_parts += [(idx[j], part["kl_ref"][k]) for k, j in enumerate(part["kl"])]

    def kl_ref(self) -> torch.Tensor | None:
        parts = sorted(self.kl_parts, key=lambda x: x[0])
        return torch.stack([r for _, r in parts]) if parts else None


@torch.no_grad()
def prepare(h: Handles, batch: Batch, precision=None) -> Prepared:
    """One no-grad pass over ``batch`` (see the module docstring for how it is split). With a ``precision`` whose
    dtype differs from the model's, the layers up to the edited one run in the model's dtype (the keys and clamp
    norms are exact) and the layers above in the compute dtype, which is also the dtype of the returned cache and
    activations (the steps run in it)."""
    rows, device = batch.rows, batch.ids.device
    got: dict = {}
    out = _Assembly(batch)
    for group in _groups(rows):
        g_rows = [rows[i] for i in group]
        c = _shared_len(g_rows)
        past = _head(h, g_rows[0].ids[:c], device, precision, got) if c else None
        for bucket in length_buckets([len(r.ids) - c for r in g_rows], call_cost(device)):
            part = _bucket_pass(h, [g_rows[j] for j in bucket], c, past, batch.S, batch.pad_id, device, precision, got)
            out.put([group[j] for j in bucket], part)
    return Prepared(
        batch=batch,
        kvs=out.kvs,
        h_in=out.h_in,
        tuple_out=got.get("tuple_out", False),
        keys=out.keys,
        h_norm=out.h_norm,
        kl_ref=out.kl_ref(),
    )


@torch.no_grad()
def row_keys(h: Handles, batch: Batch, offset: int = 0) -> torch.Tensor:
    """The down-projection input of layer l at each row's subject's last token (``offset`` < 0: that many tokens
    before it), ``(rows, d1)`` float32, from forwards that stop there, grouped and sharing prefixes as
    :func:`prepare` does (only layers <= l run)."""
    rows, device = batch.rows, batch.ids.device
    out: torch.Tensor | None = None
    for group in _groups(rows):
        g_rows = [rows[i] for i in group]
        # the position read must be computed by the rows' own pass, not by the shared one
        c = max(0, min(_shared_len(g_rows), min(r.subj for r in g_rows) + offset))
        past = None
        if c > 0:
            t = torch.tensor([g_rows[0].ids[:c]], device=device)
            cache = new_cache(h.model)
            with hooks((h.layers[h.layer].register_forward_hook, _raise_stop)):
                try:
                    h.base(input_ids=t, attention_mask=torch.ones_like(t), use_cache=True, **{h.cache_kwarg: cache})
                except StopForward:
                    pass
            past = kv_tensors(cache)
        for bucket in length_buckets([len(r.ids) - c for r in g_rows], call_cost(device)):
            k = _bucket_keys(h, [g_rows[j] for j in bucket], c, past, offset, batch.pad_id, device)
            if out is None:
                out = k.new_zeros(len(rows), k.shape[-1])
            out[torch.tensor([group[j] for j in bucket], device=device)] = k
    return out


def _bucket_keys(h: Handles, rows, c: int, past, offset: int, pad_id: int, device) -> torch.Tensor:
    """:func:`row_keys` of rows that continue the shared ``past`` of ``c`` tokens, unpadded but for their tail."""
    ids, mask = right_padded([r.ids for r in rows], pad_id, device)
    W = ids.shape[1]
    cols = torch.tensor([r.subj + offset - c for r in rows], device=device)
    got: dict = {}

    def grab(mod, inp, o):
        x = by_token(first_output(inp), len(rows))
        got["k"] = x[torch.arange(len(rows), device=x.device), cols].float()
        raise StopForward

    kv = (
        None
        if past is None
        else [None if p is None else tuple(t.expand(len(rows), -1, -1, -1) for t in p) for p in past]
    )
    cache = new_cache(h.model) if kv is None else build_cache(h.model, kv, range(h.layer + 1))
    pos = torch.arange(W, device=device).expand(len(rows), W)[:, c:]
    with hooks((h.down_proj.register_forward_hook, grab)):
        try:
            h.base(
                input_ids=ids[:, c:], attention_mask=mask, position_ids=pos, use_cache=True, **{h.cache_kwarg: cache}
            )
        except StopForward:
            pass
    return got["k"]


def _raise_stop(mod, inp, out):
    raise StopForward
