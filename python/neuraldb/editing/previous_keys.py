"""Previous-token keys: the down-projection input at the token before a subject's last one, computed over the editing
contexts as the row's own key is (what :mod:`neuraldb.subject_gate` checks).

Example::

    >>> keys = previous_token_keys(model, tok, facts, 6, template=db.template, config=cfg)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuraldb import templates
from neuraldb.architectures import down_proj_dims
from neuraldb.editing.contexts import (
    _subject_last,
    context_mean,
    context_texts,
    fact_rows,
    generate_prefixes,
    make_batch,
)
from neuraldb.editing.engine import key_pass
from neuraldb.editing.model_access import editing_state, handles, model_device
from neuraldb.facts import Fact

__all__ = ["previous_token_keys"]


def previous_token_keys(model, tok, facts: Sequence[Fact], layer: int, *, template: str | None, config) -> torch.Tensor:
    """``(n, d1)`` float32 unit rows: for each fact, the down-projection input of ``layer`` at the token before its
    subject's last one, over the contexts and with the weighting of ``config`` (an ``EditConfig``) as its key is
    computed; a zero row where the subject is one token (the token before it is not the subject's)."""
    h = handles(model, layer)
    out = torch.zeros(len(facts), down_proj_dims(h.down_proj)[0])
    if not facts:
        return out
    prefixes = generate_prefixes(
        model, tok, n=config.n_prefixes, length=config.prefix_len, template=template, seed=config.seed
    )
    contexts = context_texts(prefixes)
    device, pad = model_device(model), templates.pad_id(tok)
    multi = []
    for f in facts:
        pre = f.prompt.partition("{}")[0]
        _, first = _subject_last(tok, template, f.text, len(pre) + 1)
        _, last = _subject_last(tok, template, f.text, len(pre) + len(f.subject))
        multi.append(last - 1 >= first)
    bs = max(1, config.batch_size)
    with editing_state(model):
        for start in range(0, len(facts), bs):
            chunk = facts[start : start + bs]
            rows = [
                r
                for j, f in enumerate(chunk)
                for r in fact_rows(tok, template, f, j, contexts, targets=False, kl_prompt=None)
            ]
            row_keys = key_pass(h, make_batch(rows, pad, device), offset=-1)
            out[start : start + len(chunk)] = context_mean(row_keys, rows, len(chunk), len(contexts), config).cpu()
    out[~torch.tensor(multi)] = 0
    return torch.nn.functional.normalize(out, dim=-1)
