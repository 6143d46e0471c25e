"""patch_model on a tiny random-weight model of every architecture in the table: (a) empty database is bitwise
neutral, (b) one stored activation changes exactly its position by exactly the residual, (c) unpatch restores
bitwise, (d) generate() retrieves on generated tokens, (e) save/load/patch gives the same logits; padded batches."""

from __future__ import annotations

import neuraldb
import pytest
import torch
from _tiny_models import (
    CONFIGS,
    LAYERS,
    PATCH_LAYER,
    assert_bitwise,
    capture,
    per_token,
    prompt,
    separated_position,
    tiny_model,
)
from neuraldb.architectures import ARCHITECTURES, Size, cache_kwarg, model_size, tuned_for

ARCHS = sorted(CONFIGS)


def test_every_table_entry_has_a_tiny_model():
    assert set(ARCHS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gemma3", "gpt2"])
def test_size_comes_from_the_text_config_and_matches_no_swept_size(arch):
    model = tiny_model(arch)
    size = model_size(model)
    # gemma3 keeps its language model's sizes in a nested text config; gpt2's config has no intermediate_size
    assert size == (None if arch == "gpt2" else Size(hidden_size=32, num_hidden_layers=LAYERS, intermediate_size=48))
    assert tuned_for(model) is None


def _big_residual(reference: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(reference.shape[-1], generator=g) * float(reference.abs().max()) * 4


def _db_for(module: torch.nn.Module, **kw) -> neuraldb.NeuralKVDatabase:
    d1, d2 = neuraldb.down_proj_dims(module)
    return neuraldb.NeuralKVDatabase(d1, d2, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_kwarg_is_one_the_model_takes(arch):
    model = tiny_model(arch)
    name = cache_kwarg(model)
    ids = prompt()
    out = model(ids[:, :-1], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    step = model(ids[:, -1:], use_cache=True, **{name: cache})  # a name forward did not take would raise here
    torch.testing.assert_close(step.logits[:, -1], model(ids).logits[:, -1], rtol=1e-4, atol=1e-5)


class _Renamed(torch.nn.Module):
    def forward(self, input_ids, cache=None, past_key_values=None): ...


def test_cache_kwarg_prefers_the_new_name():
    assert cache_kwarg(_Renamed()) == "cache"


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_database_is_bitwise_neutral(arch):
    model = tiny_model(arch)
    ids = prompt()
    base = model(ids).logits
    _, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    neuraldb.patch_model(model, _db_for(module), layer=PATCH_LAYER)
    assert_bitwise(model(ids).logits, base)
    # The default layer from the table works too.
    neuraldb.patch_model(model, _db_for(module))
    assert neuraldb.patch_info(model).layer == neuraldb.architectures.default_layer(model)
    assert_bitwise(model(ids).logits, base)


def _one_fact_setup(arch):
    model = tiny_model(arch)
    ids = prompt()
    _path, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    with capture(module) as cap:
        base = model(ids).logits
    keys, out = per_token(cap.inputs[0], ids)[0], per_token(cap.outputs[0], ids)
    p, gamma = separated_position(keys)
    db = _db_for(module)
    db.add(keys[p], _big_residual(out))
    return model, ids, module, base, out, p, gamma, db


@pytest.mark.parametrize("arch", ARCHS)
def test_one_fact_changes_exactly_its_position(arch):
    model, ids, module, base, out, p, gamma, db = _one_fact_setup(arch)
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    with capture(module) as cap:
        logits = model(ids).logits
    expected = out.clone()
    expected[0, p] = out[0, p] + db.values[0].to(out.dtype)
    assert_bitwise(per_token(cap.outputs[0], ids), expected)
    # Causal attention: positions before p cannot see the change; position p's prediction does.
    assert_bitwise(logits[:, :p], base[:, :p])
    assert not torch.equal(logits[:, p], base[:, p])

    # (c) unpatch restores the never-patched model bitwise; disabled() does too, and only inside the block.
    with neuraldb.disabled(model):
        assert_bitwise(model(ids).logits, base)
    assert_bitwise(model(ids).logits, logits)
    neuraldb.unpatch_model(model)
    assert neuraldb.patch_info(model) is None
    assert not module._forward_hooks
    assert_bitwise(model(ids).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_patch_gives_the_same_logits(arch, tmp_path):
    model, ids, _module, _base, _out, _p, gamma, db = _one_fact_setup(arch)
    db.layer, db.gamma = PATCH_LAYER, gamma
    neuraldb.patch_model(model, db)
    logits = model(ids).logits
    db.save(tmp_path / "db.safetensors")

    fresh = tiny_model(arch)
    neuraldb.patch_model(fresh, neuraldb.NeuralKVDatabase.load(tmp_path / "db.safetensors"))
    assert_bitwise(fresh(ids).logits, logits)


def _generated_key(model, module, gen_kw):
    """A prompt, its greedy continuation, and a generated position whose activation is separated from all others
    (tiny random models often repeat one token, so a few prompts are tried)."""
    for seed in range(1, 8):
        ids = prompt(6, seed=seed)
        base = model.generate(ids, output_scores=True, return_dict_in_generate=True, **gen_kw)
        with capture(module) as cap:
            model(base.sequences)
        keys = per_token(cap.inputs[0], base.sequences)[0]
        try:
            q, gamma = separated_position(keys, candidates=range(ids.shape[1], base.sequences.shape[1] - 1))
        except AssertionError:
            continue
        return ids, base, keys, q, gamma, cap.outputs[0]
    raise AssertionError("every prompt tried generates activations too alike to single one out")


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_retrieves_on_generated_tokens(arch):
    model = tiny_model(arch)
    n_new = 8
    gen_kw = {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False, "pad_token_id": 0}
    _, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    ids, base, keys, q, gamma, out = _generated_key(model, module, gen_kw)
    seq = base.sequences
    db = _db_for(module)
    db.add(keys[q], _big_residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    patched = model.generate(ids, output_scores=True, return_dict_in_generate=True, **gen_kw)

    step = q - (ids.shape[1] - 1)  # scores[i] come from position prompt_len - 1 + i
    assert torch.equal(patched.sequences[:, : q + 1], seq[:, : q + 1])
    for i in range(step):
        assert_bitwise(patched.scores[i], base.scores[i])
    assert not torch.equal(patched.scores[step], base.scores[step])


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_changes_only_the_matching_row(arch):
    g = torch.Generator().manual_seed(3)
    ids = prompt(12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of the second example, as generate() pads
    ids[1, :4] = 0
    model = tiny_model(arch)
    _, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    with capture(module) as cap:
        base = model(ids, attention_mask=mask).logits
    keys, out = per_token(cap.inputs[0], ids), per_token(cap.outputs[0], ids)
    p, gamma = separated_position(keys[0], others=keys[1][mask[1].bool()])
    db = _db_for(module)
    db.add(keys[0, p], torch.randn(out.shape[-1], generator=g) * float(out.abs().max()) * 4)
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    with capture(module) as cap:
        logits = model(ids, attention_mask=mask).logits
    expected = out.clone()
    expected[0, p] += db.values[0].to(out.dtype)
    got = per_token(cap.outputs[0], ids)
    assert_bitwise(got[mask.bool()], expected[mask.bool()])
    assert_bitwise(logits[1][mask[1].bool()], base[1][mask[1].bool()])
