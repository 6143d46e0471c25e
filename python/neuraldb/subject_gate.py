"""The subject gate: a row opens where its whole subject is written, not at every name that ends in the same word.

A row's key is read at its subject's last token, and there the last word dominates: on held-out WikiText-2, 17 of
the 21 positions that opened a calibrated 1,000-fact CounterFact database were names ending in a word of an edited
subject ("the Drum Theatre" opened "Armstrong Circle Theatre", "Dominic Hall" opened "Jane Franklin Hall"), and they
made 92% of the perplexity the edits cost there (``benchmarks/experiments/opening_anatomy.py``). The token before
the last tells them apart: with the gate on, a row whose subject has more than one token also holds the
down-projection input at the token before its subject's last one (averaged over the editing contexts as the row's
key is), and a position that opens the row stays open only if the position before it has cosine above ``rho`` with
that key. The previous position of the first token of a forward (a decode step) is not known there, so such a
position is not checked. ``neuraldb edit``, ``neuraldb eval`` and ``neuraldb serve`` turn it on after fitting the
thresholds (:func:`neuraldb.gate_fit.fit_defaults`; ``--no-calibrate`` skips both). It uses the slot of :mod:`neuraldb.relation_gate` (a row holds one of the two keys) with
the check one position back (``{"rho": rho, "window": 0, "offset": -1}``).

Example::

    >>> n = enable_subject_gate(model, tok, db, rho=0.3)   # rows given a key; db.relation_gate is set   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuraldb import templates
from neuraldb.facts import Fact

__all__ = ["DEFAULT_RHO", "enable_subject_gate", "previous_token_keys"]

# Measured on 1,000 CounterFact facts (SmolLM2, layer 6): the names that share only an edited subject's last word
# scored at most 0.13 with its key, the facts' own paraphrases above 0.3 in 98.6% of cases.
DEFAULT_RHO = 0.3


def previous_token_keys(model, tok, facts: Sequence[Fact], layer: int, *, template: str | None, config) -> torch.Tensor:
    """``(n, d1)`` float32 unit rows: for each fact, the down-projection input of ``layer`` at the token before its
    subject's last one, over the contexts and with the weighting of ``config`` (an ``EditConfig``) as its key is
    computed; a zero row where the subject is one token (the token before it is not the subject's)."""
    from neuraldb.architectures import down_proj_dims
    from neuraldb.editing import engine, model_access
    from neuraldb.editing.contexts import (
        _subject_last,
        context_mean,
        context_texts,
        fact_rows,
        generate_prefixes,
        make_batch,
    )

    h = model_access.handles(model, layer)
    out = torch.zeros(len(facts), down_proj_dims(h.down_proj)[0])
    if not facts:
        return out
    prefixes = generate_prefixes(
        model, tok, n=config.n_prefixes, length=config.prefix_len, template=template, seed=config.seed
    )
    contexts = context_texts(prefixes)
    device, pad = model_access.model_device(model), templates.pad_id(tok)
    multi = []
    for f in facts:
        pre = f.prompt.partition("{}")[0]
        _, first = _subject_last(tok, template, f.text, len(pre) + 1)
        _, last = _subject_last(tok, template, f.text, len(pre) + len(f.subject))
        multi.append(last - 1 >= first)
    bs = max(1, config.batch_size)
    with model_access.editing_state(model):
        for start in range(0, len(facts), bs):
            chunk = facts[start : start + bs]
            rows = [
                r
                for j, f in enumerate(chunk)
                for r in fact_rows(tok, template, f, j, contexts, targets=False, kl_prompt=None)
            ]
            row_keys = engine.key_pass(h, make_batch(rows, pad, device), offset=-1)
            out[start : start + len(chunk)] = context_mean(row_keys, rows, len(chunk), len(contexts), config).cpu()
    out[~torch.tensor(multi)] = 0
    return torch.nn.functional.normalize(out, dim=-1)


def enable_subject_gate(model, tok, db, *, rho: float = DEFAULT_RHO) -> int:
    """Give every Fact row of ``db`` whose subject has more than one token its previous-token key and turn the subject
    gate on (``db.relation_gate = {"rho": rho, "window": 0, "offset": -1}``; a relation gate's keys are replaced);
    returns the number of rows given a key.

    Example::

        >>> enable_subject_gate(model, tok, db)       # doctest: +SKIP
        947
    """
    from neuraldb.database_state import DatabaseChangedError, recorded_layer
    from neuraldb.editing.defaults import EditConfig, recorded, resolve
    from neuraldb.relation_gate import check_relation_gate

    gate = check_relation_gate({"rho": rho, "window": 0, "offset": -1})
    layer = recorded_layer(db)
    config = resolve(model, layer=layer, **recorded(db.config, EditConfig.names() - {"layer", "gamma"}))
    with db.lock:
        ids = db.ids()
        chosen = [(i, f) for i in ids if isinstance(f := db.fact(i), Fact)]
    keys = previous_token_keys(model, tok, [f for _, f in chosen], layer, template=db.template, config=config)
    if chosen:
        with db.lock:
            if db.ids() != ids:
                raise DatabaseChangedError("db changed while its previous-token keys were computed; run again")
            db.update([i for i, _ in chosen], relation_keys=keys)
    db.relation_gate = gate
    return int(keys.norm(dim=-1).gt(0).sum())
