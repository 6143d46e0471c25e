"""Editing core: the fast engine computes exactly what a plain forward computes; batched == one at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_editing import FACTS
from neuraldb import templates
from neuraldb.editing import (
    compute_keys,
    compute_keys_and_residuals,
    compute_residuals,
    edit,
    engine,
    model_access,
    prepass,
)
from neuraldb.editing.contexts import context_texts, fact_rows, generate_prefixes, make_batch
from neuraldb.facts import Fact

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.usefixtures("neuraldb_cache")


def _rows(tok, template, contexts):
    rows = []
    for i, f in enumerate(FACTS):
        rows += fact_rows(tok, template, f, i, contexts, targets=True, kl_prompt="{} is a")
    return rows


@pytest.mark.parametrize("layer", [0, 2])
def test_suffix_forward_matches_full_forward(tiny, layer):
    """The cached-prefix, upper-layers-only forward equals a plain forward with r added at the subject's last token."""
    model, tok = tiny
    template = templates.default_template(tok)
    rows = _rows(tok, template, context_texts(["Because I", "You the of the"]))
    h = model_access.handles(model, layer)
    batch = make_batch(rows, tok.pad_token_id, "cpu")
    prep = prepass.prepare(h, batch)
    torch.manual_seed(1)
    r = torch.randn(len(rows), 32)
    with torch.no_grad():
        last = engine._suffix_forward(h, prep, torch.arange(len(rows)), prep.kvs, r)
    for i, row in enumerate(rows):
        got = {}

        def add(mod, inp, out, i=i, row=row):
            got["k"] = inp[0][0, row.subj].clone()
            out = out.clone()
            out[0, row.subj] += r[i]
            return out

        hd = h.down_proj.register_forward_hook(add)
        with torch.no_grad():
            ref = h.base(input_ids=torch.tensor([row.ids])).last_hidden_state[0]
        hd.remove()
        n = len(row.ids) - row.subj
        torch.testing.assert_close(last[i, :n], ref[row.subj :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(prep.keys[i], got["k"], atol=1e-5, rtol=1e-4)


def test_subject_last_token_and_targets(tiny):
    _model, tok = tiny
    rows = fact_rows(tok, "<s>{}", FACTS[0], 0, ["", "Because I . "], targets=True, kl_prompt="{} is a")
    for row in rows[:2]:
        assert tok.convert_ids_to_tokens(row.ids[row.subj]) == "Darrieux"
        assert row.ids[0] == tok.bos_token_id
        ((pos, tid),) = row.targets
        assert tid == tok.convert_tokens_to_ids("English") and pos == len(row.ids) - 1
    kl = rows[2]
    assert tok.convert_ids_to_tokens(kl.ids[kl.subj]) == "Darrieux" and kl.kl_pos == len(kl.ids) - 1


def test_keys_batched_equals_single(tiny):
    model, tok = tiny
    kw = {"n_prefixes": 2, "prefix_len": 3}
    k_all = compute_keys(model, tok, FACTS, 1, batch_size=8, **kw)
    k_one = torch.cat([compute_keys(model, tok, [f], 1, batch_size=1, **kw) for f in FACTS])
    assert k_all.shape == (len(FACTS), 64)
    torch.testing.assert_close(k_all, k_one, atol=1e-5, rtol=1e-4)
    k_res, _ = compute_keys_and_residuals(model, tok, FACTS, 1, steps=1, **kw)
    torch.testing.assert_close(k_all, k_res, atol=1e-5, rtol=1e-4)
    bare = compute_keys(model, tok, FACTS, 1, n_prefixes=0)
    torch.testing.assert_close(
        compute_keys(model, tok, FACTS, 1, key_bare_weight=1.0, **kw), bare, atol=1e-5, rtol=1e-4
    )
    half = compute_keys(model, tok, FACTS, 1, key_bare_weight=0.5, **kw)
    torch.testing.assert_close(half, 0.5 * bare + 0.5 * (3 * k_all - bare) / 2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stop_loss", [0.0, 5e-2])
def test_residuals_batched_equals_single(tiny, stop_loss):
    model, tok = tiny
    kw = {"n_prefixes": 2, "prefix_len": 3, "steps": 6, "lr": 0.5, "stop_loss": stop_loss}
    r_all = compute_residuals(model, tok, FACTS, 2, batch_size=8, **kw)
    r_one = torch.cat([compute_residuals(model, tok, [f], 2, batch_size=1, **kw) for f in FACTS])
    assert r_all.shape == (len(FACTS), 32)
    assert r_all.norm(dim=-1).min() > 0
    torch.testing.assert_close(r_all, r_one, atol=1e-4, rtol=1e-3)


def test_extra_steps_go_on_only_where_the_target_is_not_yet_the_argmax(tiny, monkeypatch):
    model, tok = tiny
    english = tok(" English", add_special_tokens=False)["input_ids"]
    assert len(english) == 1  # FACTS[0]'s target is one token

    def english_wins(h, states):  # FACTS[0]'s target is the argmax everywhere (by a little: its loss stays above
        out = real(h, states)  # stop_loss); the others' never are
        boost = torch.zeros_like(out)
        boost[..., english[0]] = out.detach().max(-1).values - out.detach()[..., english[0]] + 0.5
        return out + boost

    real = engine.logits_of
    monkeypatch.setattr(engine, "logits_of", english_wins)
    kw = {"n_prefixes": 1, "prefix_len": 3, "lr": 0.1, "steps": 3, "kl_factor": 0.0}
    plain: dict = {}
    extra: dict = {}
    r0 = compute_residuals(model, tok, FACTS[:3], 2, stats=plain, **kw)
    r1 = compute_residuals(model, tok, FACTS[:3], 2, stats=extra, extra_steps=4, **kw)
    assert plain["steps"] == [3, 3, 3] and extra["steps"] == [3, 7, 7]
    assert torch.equal(r0[0], r1[0])  # a fact that succeeds within the budget is optimised exactly as without
    assert not torch.equal(r0[1], r1[1])


def test_residual_norm_clamped_and_loss_falls(tiny):
    model, tok = tiny
    stats: dict = {}
    r = compute_residuals(model, tok, FACTS[:2], 2, n_prefixes=1, prefix_len=3, steps=30, lr=1.0, clamp_norm_factor=0.5)
    kw = {"n_prefixes": 1, "prefix_len": 3, "lr": 0.1, "weight_decay": 0.0}  # the random model barely responds to r
    compute_keys_and_residuals(model, tok, FACTS[:2], 2, steps=1, stats=stats, **kw)
    stats2: dict = {}
    compute_keys_and_residuals(model, tok, FACTS[:2], 2, steps=30, stats=stats2, **kw)
    assert all(b < a - 1e-3 for a, b in zip(stats["loss"], stats2["loss"]))
    assert stats2["steps"] == [30, 30]
    # ||r|| <= 0.5 ||h|| (h: the layer's output at the subject's last token of the bare prompt)
    h = model_access.handles(model, 2)
    template = templates.default_template(tok)
    rows = [fact_rows(tok, template, f, i, [""], targets=True, kl_prompt=None)[0] for i, f in enumerate(FACTS[:2])]
    prep = prepass.prepare(h, make_batch(rows, tok.pad_token_id, "cpu"))
    assert torch.all(r.norm(dim=-1) <= 0.5 * prep.h_norm + 1e-4)


def test_prefixes_cached_and_deterministic(tiny, tmp_path):
    model, tok = tiny
    a = generate_prefixes(model, tok, n=3, length=4, seed=0)
    assert len(a) == 3 and all(isinstance(p, str) and p for p in a)
    files = list((tmp_path / "prefixes").glob("*.json"))
    assert len(files) == 1
    from neuraldb.editing import contexts

    contexts._MEMORY.clear()
    assert generate_prefixes(model, tok, n=3, length=4, seed=0) == a
    # a fine-tuned copy whose embeddings and config are untouched gets prefixes of its own: the key hashes every
    # weight, not only the embeddings
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    generate_prefixes(tuned, tok, n=3, length=4, seed=0)
    assert len(list((tmp_path / "prefixes").glob("*.json"))) == 2


def test_edit_creates_and_appends(tiny):
    model, tok = tiny
    model.train()
    w = model.model.embed_tokens.weight
    w.requires_grad_(True)
    db = edit(model, tok, FACTS[:3], layer=2, gamma=0.7, progress=False, n_prefixes=1, prefix_len=3, steps=3)
    assert model.training and w.requires_grad  # restored
    model.eval()
    assert len(db) == 3 and db.layer == 2 and db.gamma == pytest.approx(0.7)
    assert db.template == templates.default_template(tok) == "<s>{}"
    assert db.module_path == "model.layers.2.mlp.down_proj" and db.model_id == "tiny-test-llama"
    assert db.config["n_prefixes"] == 1 and db.config["steps"] == 3
    assert [db.fact(i) for i in db.ids()] == FACTS[:3]
    db2 = edit(model, tok, FACTS[3:], db=db, progress=False)
    assert db2 is db and len(db) == 5 and [db.fact(i) for i in db.ids()] == FACTS
    with pytest.raises(ValueError, match="layer"):
        edit(model, tok, FACTS[:1], db=db, layer=1, progress=False)


def test_template_helpers(tiny):
    _, tok = tiny
    assert templates.apply("<s>{}", "a {} b") == "<s>a {} b"
    assert templates.apply(None, "x") == "x"
    with pytest.raises(ValueError):
        templates.check("no slot")
    assert templates.encode(tok, "<s>{}", "The")[0] == tok.bos_token_id
    assert templates.encode_target(tok, "English") == [tok.convert_tokens_to_ids("English")]


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M end to end (slow)
# ---------------------------------------------------------------------------------------------------------------------


def _sum_logprob(model, tok, template, prompt, target):
    ids = templates.encode(tok, template, prompt)
    tgt = templates.encode_target(tok, target)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + tgt])).logits[0].float()
    lp = torch.log_softmax(logits[len(ids) - 1 : -1], -1)
    return float(lp.gather(1, torch.tensor(tgt)[:, None]).sum())


@pytest.mark.slow
def test_smollm2_edit_end_to_end():
    models = pytest.importorskip("neuraldb.models")
    try:
        model, tok = models.load_model("smollm2")
    except models.ModelNotFoundError as e:  # pragma: no cover - model wheel absent
        pytest.skip(f"SmolLM2 not available: {e}")
    from neuraldb.patching import patch_model, unpatch_model

    facts = [
        Fact("Danielle Darrieux", "The mother tongue of {} is", "English", target_true="French"),
        Fact("Spike Hughes", "{} originates from", "Philadelphia", target_true="London"),
        Fact("Toko Yasuda", "{} plays the", "piano", target_true="guitar"),
    ]
    db = edit(model, tok, facts, progress=False)
    assert db.template == "<|im_start|>{}"
    unrelated = templates.encode(tok, db.template, "The capital of Japan is the city of")
    with torch.no_grad():
        before = model(input_ids=torch.tensor([unrelated])).logits
    patch_model(model, db)
    try:
        for f in facts:
            assert _sum_logprob(model, tok, db.template, f.text, f.target_new) > _sum_logprob(
                model, tok, db.template, f.text, f.target_true
            ), f
        with torch.no_grad():
            after = model(input_ids=torch.tensor([unrelated])).logits
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    finally:
        unpatch_model(model)


def test_bf16_steps_restore_weights_and_patience(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"n_prefixes": 1, "prefix_len": 3, "steps": 4, "lr": 0.1}
    r16 = compute_residuals(model, tok, FACTS[:2], 2, compute_dtype="bfloat16", **kw)
    r32 = compute_residuals(model, tok, FACTS[:2], 2, **kw)
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert torch.nn.functional.cosine_similarity(r16, r32).min() > 0.9
    stats: dict = {}
    compute_keys_and_residuals(
        model,
        tok,
        FACTS[:2],
        2,
        steps=50,
        patience=2,
        weight_decay=0.0,
        stats=stats,
        **{k: v for k, v in kw.items() if k != "steps"},
    )
    assert max(stats["steps"]) < 50


@pytest.mark.parametrize("layer", [0, 2])
def test_prepare_in_compute_dtype_matches(tiny, layer):
    """With a compute dtype, layers <= l run in the model's dtype (keys, norms bit-identical) and the layers above
    from layer l's cached output in the compute dtype: float64 must reproduce the float32 pass and residuals."""
    model, tok = tiny
    template = templates.default_template(tok)
    rows = _rows(tok, template, context_texts(["Because I", "You the of the"]))
    h = model_access.handles(model, layer)
    batch = make_batch(rows, tok.pad_token_id, "cpu")
    ref = prepass.prepare(h, batch)
    got = prepass.prepare(h, batch, engine.Precision(model, "float64"))
    assert torch.equal(got.keys, ref.keys) and torch.equal(got.h_norm, ref.h_norm)
    for a, b in zip(got.kvs, ref.kvs):
        assert (a is None) == (b is None)
        if a is not None:
            assert a[0].dtype == torch.float64
            torch.testing.assert_close(a[0].float(), b[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a[1].float(), b[1], atol=1e-5, rtol=1e-4)
    if layer:
        torch.testing.assert_close(got.h_in.float(), ref.h_in, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.kl_ref.float(), ref.kl_ref, atol=1e-5, rtol=1e-4)
    kw = {"n_prefixes": 2, "prefix_len": 3, "steps": 4, "lr": 0.5}
    r64 = compute_residuals(model, tok, FACTS, layer, compute_dtype="float64", **kw)
    torch.testing.assert_close(r64, compute_residuals(model, tok, FACTS, layer, **kw), atol=1e-4, rtol=1e-3)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_keys_unit_mean(tiny):
    """key_unit_mean: the (bare-weighted) mean of the contexts' keys scaled to unit length."""
    model, tok = tiny
    template = templates.default_template(tok)
    contexts = context_texts(generate_prefixes(model, tok, n=2, length=3, template=template))
    h = model_access.handles(model, 1)
    rows = [
        r for i, f in enumerate(FACTS) for r in fact_rows(tok, template, f, i, contexts, targets=False, kl_prompt=None)
    ]
    u = torch.nn.functional.normalize(engine.key_pass(h, make_batch(rows, tok.pad_token_id, "cpu")), dim=-1)
    u = u.view(len(FACTS), len(contexts), -1)
    kw = {"n_prefixes": 2, "prefix_len": 3, "key_unit_mean": True}
    torch.testing.assert_close(compute_keys(model, tok, FACTS, 1, **kw), u.mean(1), atol=1e-5, rtol=1e-4)
    half = compute_keys(model, tok, FACTS, 1, key_bare_weight=0.5, **kw)
    torch.testing.assert_close(half, 0.5 * u[:, 0] + 0.25 * u[:, 1:].sum(1), atol=1e-5, rtol=1e-4)


def test_length_buckets_partition_and_cost():
    """Buckets cover every index once, in ascending length, and cost no more than one bucket; with no cost per
    run every distinct length is its own run, with a huge cost there is one run."""
    from neuraldb.editing.contexts import length_buckets

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 30, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        for cost in (0, 8, 32, 10**6):
            runs = length_buckets(lengths, cost)
            flat = [i for r in runs for i in r]
            assert sorted(flat) == list(range(len(lengths)))
            assert [lengths[i] for i in flat] == sorted(lengths)
            total = sum(len(r) * max(lengths[i] for i in r) + cost for r in runs)
            assert total <= len(lengths) * max(lengths) + cost
            if cost == 0:
                assert len(runs) == len(set(lengths))
            if cost == 10**6:
                assert len(runs) == 1
    assert length_buckets([5, 5, 20, 20], 4) == [[0, 1], [2, 3]]
    assert length_buckets([], 4) == []
