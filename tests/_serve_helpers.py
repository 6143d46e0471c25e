"""What the ``neuraldb serve`` tests share: a server on the tiny word-level Llama, and a database row that makes the
model answer a chosen word right after a prompt (no editing: a key read from the prompt, a residual along the
word's output embedding)."""

from __future__ import annotations

import torch
from _tiny_editing import FACTS, word_llama
from _tiny_models import capture
from neuraldb import NeuralKVDatabase, templates
from neuraldb.architectures import down_proj_module

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LAST_LAYER = 3  # word_llama has 4 layers: a residual here reaches the logits through the final norm only
# editing hyperparameters that take well under a second on the tiny model
FAST_EDIT = {"n_prefixes": 1, "prefix_len": 3, "steps": 30, "lr": 1.0}


def app_for(db_path=None, db=None, layer=LAST_LAYER, **settings):
    """``(app, model, tok, db)``: a fresh tiny model served with ``db`` (default: the one in ``db_path``, else an
    empty one at ``layer``; layer 2 is where FAST_EDIT's edits change the tiny model's answers)."""
    from neuraldb.serve import ServeSettings, build_app

    model, tok = word_llama()
    if db is None:
        db = NeuralKVDatabase.load(db_path) if db_path is not None and db_path.exists() else None
    if db is None:
        db = NeuralKVDatabase.for_model(model, layer)
        db.template = templates.default_template(tok)
    settings.setdefault("token", TOKEN)
    settings.setdefault("edit_hparams", FAST_EDIT)
    app = build_app(model, tok, db, db_path=db_path, settings=ServeSettings(**settings))
    return app, model, tok, db


def answer_row(model, tok, db, text: str, word: str) -> int:
    """Add to ``db`` a row that opens at the last token of ``text`` and makes ``word`` the next token; its id."""
    key, residual = row_for(model, tok, db.template, text, word)
    [i] = db.add(key[None], residual[None].half(), facts=[FACTS[0]])
    return i


def row_for(model, tok, template, text: str, word: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key, residual)`` of a row at LAST_LAYER that opens at the last token of ``text`` (in ``template``) and makes
    ``word`` the next token."""
    _, module = down_proj_module(model, LAST_LAYER)
    ids = torch.tensor([templates.encode(tok, template, text)])
    from neuraldb.patching import disabled, patch_info

    with capture(module) as cap, torch.no_grad(), disabled(model) if patch_info(model) else _null():
        model(input_ids=ids)
    key = cap.inputs[0][0, -1]
    direction = model.lm_head.weight[tok.convert_tokens_to_ids(word)]
    return key, 50.0 * direction / direction.norm()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
