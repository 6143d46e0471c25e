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

from neuraldb.facts import Fact

__all__ = ["DEFAULT_RHO", "enable_subject_gate"]

# Measured on 1,000 CounterFact facts (SmolLM2, layer 6): the names that share only an edited subject's last word
# scored at most 0.13 with its key, the facts' own paraphrases above 0.3 in 97.8% of cases.
DEFAULT_RHO = 0.3


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
    from neuraldb.editing.previous_keys import previous_token_keys
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
