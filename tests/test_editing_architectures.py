"""The editing pass on a tiny random-weight model of every architecture in the table: the no-grad pass (rows run
in groups and length runs, shared prefixes cached once) and the steps' forward (layers >= l only, length runs) give
what a plain forward of each row gives, with r added at the subject's last token."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _tiny_models import CONFIGS, PATCH_LAYER, tiny_model
from neuraldb.architectures import down_proj_dims
from neuraldb.editing import engine, model_access, prepass
from neuraldb.editing.contexts import Row, make_batch
from neuraldb.editing.model_access import by_token

transformers = pytest.importorskip("transformers")


def _rows(vocab: int) -> list[Row]:
    """Three facts x (bare prompt, two prefixed contexts sharing their prefix, a KL row), of different lengths."""
    g = torch.Generator().manual_seed(3)

    def toks(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    prefixes = [[2, *toks(5)], [2, *toks(3)]]
    rows = []
    for fact, (n_prompt, n_subj) in enumerate([(6, 2), (9, 5), (4, 1)]):
        prompt = toks(n_prompt)
        target = toks(2)
        for pre in [[2], *prefixes]:
            ids = pre + prompt + target
            subj = len(pre) + n_subj
            rows.append(Row(ids=ids, subj=subj, fact=fact, targets=[(len(ids) - 2, target[0])]))
        kl = [2, *prompt[: n_subj + 1], *toks(2)]
        rows.append(Row(ids=kl, subj=n_subj + 1, fact=fact, kl_pos=len(kl) - 1))
    return rows


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("compute", [None, "float64"])
def test_pass_and_steps_match_a_plain_forward(arch, compute):
    model = tiny_model(arch)
    h = model_access.handles(model, PATCH_LAYER)
    vocab = h.lm_head.weight.shape[0]
    rows = _rows(vocab)
    precision = engine.Precision(model, compute) if compute else None
    prep = prepass.prepare(h, make_batch(rows, 0, "cpu"), precision)
    torch.manual_seed(1)
    r = torch.randn(len(rows), down_proj_dims(h.down_proj)[1]) * 0.5
    with torch.no_grad(), precision.compute() if precision else contextlib.nullcontext():
        last = engine._suffix_forward(h, prep, torch.arange(len(rows)), prep.kvs, r)
    for i, row in enumerate(rows):
        got = {}

        def add(mod, inp, out, i=i, row=row):
            got["k"] = by_token(inp[0], 1)[0, row.subj].clone()
            o = by_token(out, 1).clone()
            o[0, row.subj] += r[i]
            return o.reshape(out.shape)

        hd = h.down_proj.register_forward_hook(add)
        with torch.no_grad():
            ref = h.base(input_ids=torch.tensor([row.ids])).last_hidden_state[0]
        hd.remove()
        n = len(row.ids) - row.subj
        torch.testing.assert_close(last[i, :n].float(), ref[row.subj :], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(prep.keys[i], got["k"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_key_pass_reads_what_a_plain_forward_gives(arch):
    """The keys-only pass (groups, shared prefixes, a forward that stops at layer l) at the subject's last token and
    the token before it."""
    model = tiny_model(arch)
    h = model_access.handles(model, PATCH_LAYER)
    rows = [r for r in _rows(h.lm_head.weight.shape[0]) if r.kl_pos < 0]
    batch = make_batch(rows, 0, "cpu")
    got0, got1 = engine.key_pass(h, batch), engine.key_pass(h, batch, offset=-1)
    for i, row in enumerate(rows):
        seen = {}

        def grab(mod, inp, out):
            seen["q"] = by_token(inp[0], 1)[0]

        hd = h.down_proj.register_forward_hook(grab)
        with torch.no_grad():
            h.base(input_ids=torch.tensor([row.ids]))
        hd.remove()
        torch.testing.assert_close(got0[i], seen["q"][row.subj], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got1[i], seen["q"][row.subj - 1], atol=1e-5, rtol=1e-4)
