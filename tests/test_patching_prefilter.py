"""A patched model whose database serves decode steps from the int4 key sketch computes bitwise what it computes
with the plain retrieval: gate open and closed, after deletes and updates, eager and compiled."""

from __future__ import annotations

import neuraldb
import neuraldb.database_retrieval
import pytest
import torch
from _tiny_models import PATCH_LAYER, assert_bitwise, capture, per_token, prompt, separated_position, tiny_model
from neuraldb.architectures import cache_kwarg

import neuraldb_kernels

pytestmark = pytest.mark.skipif(
    "cpu" not in neuraldb_kernels.available_backends("cpu"), reason="the pre-filter serves the C++ CPU kernel only"
)


def _decode_logits(model, ids, db, prefilter):
    """Logits of each next-token step of ``ids`` with a KV cache (one query row per patched forward)."""
    db.prefilter = prefilter
    out = model(ids[:, :-1], use_cache=True)
    step = model(
        ids[:, -1:], use_cache=True, **{cache_kwarg(model): getattr(out, "cache", None) or out.past_key_values}
    )
    return step.logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_with_the_sketch_is_bitwise_the_plain_path(monkeypatch, arch):
    calls = []
    real = neuraldb.database_retrieval.plan_retrieval

    def spy(*args, **kwargs):  # the patch's eager plan, bound once per database state
        plan = real(*args, **kwargs)
        calls.extend([1] if plan.sketch is not None else [])
        return plan

    monkeypatch.setattr(neuraldb.database_retrieval, "plan_retrieval", spy)
    model = tiny_model(arch)
    ids = prompt(12)
    _, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    with capture(module) as cap:
        model(ids)
    keys = per_token(cap.inputs[0], ids)[0]
    d1, d2 = neuraldb.down_proj_dims(module)
    db = neuraldb.NeuralKVDatabase(d1, d2)
    db.PREFILTER_MIN_KEYS = 0  # the tiny model's database is small; the rule is what is tested here
    g = torch.Generator().manual_seed(0)
    db.add(torch.randn(500, d1, generator=g), torch.randn(500, d2, generator=g))
    # The last position's own key opens the gate at the decode step; a random one stays closed.
    p, gamma = separated_position(keys, candidates=range(keys.shape[0] - 1, keys.shape[0]))
    [hit] = db.add(keys[p], torch.randn(d2, generator=g) * 4)
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)

    opened = _decode_logits(model, ids, db, prefilter=True)
    assert calls, "the decode step did not use the sketch"
    assert_bitwise(opened, _decode_logits(model, ids, db, prefilter=False))
    with neuraldb.disabled(model):
        assert not torch.equal(opened, _decode_logits(model, ids, db, prefilter=True))

    # prefilter = False freed the sketch; this step builds it again, so the delete and update below must maintain it.
    assert_bitwise(_decode_logits(model, ids, db, prefilter=True), opened)
    assert db.sketch is not None
    db.delete(db.ids()[:3])  # moves the hit (the last row) into row 0
    db.update(db.ids()[5:7], keys=torch.randn(2, d1, generator=g))
    assert db.row(hit) == 0
    moved = _decode_logits(model, ids, db, prefilter=True)
    assert_bitwise(moved, opened)
    assert_bitwise(moved, _decode_logits(model, ids, db, prefilter=False))

    db.delete([hit])
    closed = _decode_logits(model, ids, db, prefilter=True)
    assert_bitwise(closed, _decode_logits(model, ids, db, prefilter=False))
    with neuraldb.disabled(model):
        assert_bitwise(closed, _decode_logits(model, ids, db, prefilter=False))

    # Compiled: the retrieval is one opaque op, so the same graph serves both paths (inductor's own rounding of the
    # rest of the model is why compiled and eager logits are not compared).
    db.add(keys[p], torch.randn(d2, generator=g) * 4)
    compiled = torch.compile(lambda x: model(x).logits)
    db.prefilter = True
    with_sketch = compiled(ids[:, -1:])
    db.prefilter = False
    assert_bitwise(with_sketch, compiled(ids[:, -1:]))
