"""patch_model's contract beyond one architecture: live database changes, re-patching, disabled(), dtypes, devices,
torch.compile, autograd, copies, threads, and every bad argument."""

from __future__ import annotations

import copy
import sys
import threading
import time
import warnings

import neuraldb
import pytest
import torch
from _tiny_models import (
    PATCH_LAYER,
    assert_bitwise,
    capture,
    per_token,
    prompt,
    separated_position,
    stored_key_scores,
    tiny_model,
)
from neuraldb.patching import Patch


def _setup(arch="llama", dtype=torch.float32, length=12):
    model = tiny_model(arch, dtype=dtype)
    ids = prompt(length)
    _, module = neuraldb.down_proj_module(model, PATCH_LAYER)
    with capture(module) as cap:
        base = model(ids).logits
    keys, out = per_token(cap.inputs[0], ids)[0], per_token(cap.outputs[0], ids)
    db = neuraldb.NeuralKVDatabase(*neuraldb.down_proj_dims(module))
    return model, ids, module, base, keys, out, db


def _residual(out, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape[-1], generator=g) * float(out.abs().max().float()) * 4


def test_database_changes_are_seen_without_repatching():
    model, ids, _module, base, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    [i] = db.add(keys[p], _residual(out))
    first = model(ids).logits
    assert not torch.equal(first, base)
    db.update([i], residuals=_residual(out, seed=6))
    second = model(ids).logits
    assert not torch.equal(second, first) and not torch.equal(second, base)
    db.delete([i])
    assert_bitwise(model(ids).logits, base)


def test_auto_backend_is_chosen_per_call_kind(monkeypatch):
    # "auto" may pick another backend for a single query row (decode at batch 1): a spy backend stands in for it.
    from neuraldb_kernels import backends
    from neuraldb_kernels.reference import gated_retrieval_reference

    spy = backends.Backend("spy", lambda d: None, lambda: gated_retrieval_reference)
    monkeypatch.setitem(backends.BACKENDS, "spy", spy)
    monkeypatch.setitem(backends._AUTO_ORDER_ONE_ROW, "cpu", ("spy",))
    used = []
    real = backends.kernel
    monkeypatch.setattr(backends, "kernel", lambda name: used.append(name) or real(name))
    model, ids, _module, _base, keys, out, db = _setup()
    db.add(keys[:3], torch.stack([_residual(out, s) for s in range(3)]))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=0.65)
    multi = backends.resolve(None, torch.device("cpu"))
    for length, want in ((12, multi), (1, "spy"), (1, "spy"), (5, multi)):
        used.clear()
        model(ids[:, :length])
        assert used == [want], (length, used)


def test_patching_checks_the_backend_on_one_row_not_every_key(monkeypatch):
    # patch_model runs the backend once before installing anything. On the CPU a scan of every key there costs a
    # 1M-fact database seconds, and it evicts the caches of the forward that follows (a benchmark's patched step).
    from neuraldb_kernels import backends

    rows = []
    real = backends.kernel

    def spy(name):
        fn = real(name)
        return lambda q, k, *rest, **kw: rows.append(k.shape[0]) or fn(q, k, *rest, **kw)

    monkeypatch.setattr(backends, "kernel", spy)
    db = neuraldb.NeuralKVDatabase(16, 4)
    db.add(torch.randn(50, 16), torch.randn(50, 4))
    model = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False))
    for backend in ("torch", "cpu"):
        rows.clear()
        neuraldb.patch_model(model, db, module=model[0], gamma=0.5, backend=backend)
        assert rows == [1], backend
    with pytest.raises(RuntimeError, match="cuda"):
        neuraldb.patch_model(model, db, module=model[0], gamma=0.5, backend="cuda")  # still checked on the CPU
    assert neuraldb.patch_info(model).backend == "cpu", "a failed patch leaves the previous one"


def test_a_forward_after_every_write_sees_it():
    # Eager CPU forwards run a plan bound to the database's state; each write must invalidate it, including a
    # write that keeps the buffers (an add within capacity, a delete). The sketch's plan: test_patching_prefilter.py.
    model, ids, _module, base, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    assert_bitwise(model(ids).logits, base)  # the plan exists from here on
    capacity = db.capacity
    [i] = db.add(keys[p], _residual(out))
    assert db.capacity == capacity
    opened = model(ids).logits
    assert not torch.equal(opened, base)
    db.delete([i])
    assert_bitwise(model(ids).logits, base)
    g = torch.Generator().manual_seed(3)
    db.add(torch.randn(3 * capacity, keys.shape[1], generator=g), torch.randn(3 * capacity, out.shape[-1], generator=g))
    assert_bitwise(model(ids).logits, base)
    [j] = db.add(keys[p], _residual(out))  # after the buffers grew
    assert_bitwise(model(ids).logits, opened)
    db.update([j], residuals=_residual(out, seed=6))
    assert not torch.equal(model(ids).logits, opened)


@pytest.mark.parametrize(
    "arch,dtype",
    [("llama", torch.bfloat16), ("llama", torch.float16), ("gpt2", torch.float16), ("opt", torch.bfloat16)],
)
def test_half_precision_weights(arch, dtype):
    model, ids, module, base, keys, out, db = _setup(arch, dtype)
    p, gamma = separated_position(keys, margin=0.05)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    with capture(module) as cap:
        logits = model(ids).logits
    expected = out.clone()
    expected[0, p] = out[0, p] + db.values[0].to(dtype)
    got = per_token(cap.outputs[0], ids)
    assert got.dtype == dtype
    assert_bitwise(got, expected)
    assert_bitwise(logits[:, :p], base[:, :p])
    neuraldb.unpatch_model(model)
    assert_bitwise(model(ids).logits, base)


def test_model_to_dtype_after_patching():
    model, ids, module, _base, keys, out, db = _setup()
    p, gamma = separated_position(keys, margin=0.05)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    model.to(torch.bfloat16)
    with capture(module) as cap:
        model(ids)
    with neuraldb.disabled(model), capture(module) as plain:
        model(ids)
    diff = (per_token(cap.outputs[0], ids) - per_token(plain.outputs[0], ids)).float().abs().amax(-1)[0]
    assert diff[p] > 0 and torch.count_nonzero(diff) == 1


def test_residuals_beyond_the_model_dtype_are_refused_at_patch_time():
    model, _, module, _, keys, _, db = _setup(dtype=torch.float16)
    wide = neuraldb.NeuralKVDatabase(db.key_dim, db.value_dim, dtype=torch.float32)
    wide.add(keys[:3], torch.ones(3, db.value_dim) * torch.tensor([[1.0], [-1e5], [7e4]]))
    with pytest.raises(ValueError, match=r"up to 100000 in magnitude \(ids \[1, 2\]\).*float16's largest value 65504"):
        neuraldb.patch_model(model, wide, layer=PATCH_LAYER)
    assert neuraldb.patch_info(model) is None and not module._forward_hooks
    wide.update([1, 2], residuals=torch.full((2, db.value_dim), 6e4))
    neuraldb.patch_model(model, wide, layer=PATCH_LAYER)  # 6e4 is a float16


def test_a_model_moved_to_a_narrower_dtype_checks_the_residuals_again():
    model, ids, _, _, keys, _, db = _setup()
    wide = neuraldb.NeuralKVDatabase(db.key_dim, db.value_dim, dtype=torch.float32)
    wide.add(keys[:1], torch.full((1, db.value_dim), 1e5))
    neuraldb.patch_model(model, wide, layer=PATCH_LAYER)
    model(ids)
    model.to(torch.bfloat16)
    model(ids)  # bfloat16 holds 1e5
    model.to(torch.float16)
    for _ in range(2):  # refused on every forward until fixed, on the eager plan's path as on the first
        with pytest.raises(ValueError, match=r"up to 100000 .*float16"):
            model(ids)
    wide.update(wide.ids(), residuals=torch.ones(1, db.value_dim))
    assert torch.isfinite(model(ids).logits).all()


def test_model_on_meta_runs_shape_only():
    model, ids, _module, base, keys, out, db = _setup()
    db.add(keys[3], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER)
    model.to("meta")
    logits = model(ids.to("meta")).logits
    assert logits.device.type == "meta" and logits.shape == base.shape
    assert db.device.type == "cpu"  # shape-only runs never move the database


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_database_follows_the_model_to_cuda():
    model, ids, _module, _base, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    cpu_logits = model(ids).logits
    model.to("cuda")
    cuda_logits = model(ids.cuda()).logits
    assert db.device.type == "cuda"
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)


def test_repatching_replaces_cleanly():
    model, ids, module, base, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    patched = model(ids).logits
    other = neuraldb.NeuralKVDatabase(db.key_dim, db.value_dim)
    neuraldb.patch_model(model, other, layer=PATCH_LAYER)
    assert len(module._forward_hooks) == 1
    assert neuraldb.patch_info(model).db is other
    assert_bitwise(model(ids).logits, base)
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    assert_bitwise(model(ids).logits, patched)


def test_failed_repatch_keeps_the_previous_patch():
    model, _ids, module, _base, _keys, _out, db = _setup()
    neuraldb.patch_model(model, db, layer=PATCH_LAYER)
    before = neuraldb.patch_info(model)
    with pytest.raises(ValueError, match="key_dim"):
        neuraldb.patch_model(model, neuraldb.NeuralKVDatabase(db.key_dim + 1, db.value_dim), layer=PATCH_LAYER)
    with pytest.raises(ValueError, match="gamma"):
        neuraldb.patch_model(model, db, gamma=1.5)
    assert neuraldb.patch_info(model) is before
    assert len(module._forward_hooks) == 1


def test_disabled_nests_and_restores_on_error():
    model, ids, _module, base, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    with pytest.raises(RuntimeError, match="inside"), neuraldb.disabled(model):
        with neuraldb.disabled(model):
            assert_bitwise(model(ids).logits, base)
        assert_bitwise(model(ids).logits, base)
        raise RuntimeError("inside")
    assert neuraldb.patch_info(model).enabled
    assert not torch.equal(model(ids).logits, base)


def test_defaults_come_from_the_database_then_the_table():
    model, _ids, _module, _base, _keys, _out, db = _setup()
    neuraldb.patch_model(model, db)
    info = neuraldb.patch_info(model)
    assert (info.layer, info.gamma) == (neuraldb.architectures.default_layer(model), 0.65)
    db.layer, db.gamma = 2, 0.9
    neuraldb.patch_model(model, db)
    info = neuraldb.patch_info(model)
    assert (info.layer, info.gamma, info.module_path) == (2, 0.9, "model.layers.2.mlp.down_proj")
    db.module_path = "model.layers.0.mlp.down_proj"
    db.layer = 0
    neuraldb.patch_model(model, db)
    assert neuraldb.patch_info(model).module_path == "model.layers.0.mlp.down_proj"
    with pytest.warns(UserWarning, match="built for"):
        neuraldb.patch_model(model, db, layer=1)


def test_database_for_model():
    model = tiny_model("gpt2")
    db = neuraldb.NeuralKVDatabase.for_model(model, 2)
    assert (db.key_dim, db.value_dim) == (128, 32)  # Conv1D c_proj: 4 * n_embd -> n_embd
    assert (db.layer, db.module_path) == (2, "transformer.h.2.mlp.c_proj")
    neuraldb.patch_model(model, db)
    assert neuraldb.patch_info(model).module_path == "transformer.h.2.mlp.c_proj"
    default = neuraldb.NeuralKVDatabase.for_model(model)
    assert default.layer == neuraldb.architectures.default_layer(model)


def test_module_argument_by_path_and_by_object():
    model, _ids, module, _base, _keys, _out, db = _setup()
    neuraldb.patch_model(model, db, module=f"model.layers.{PATCH_LAYER}.mlp.down_proj")
    assert neuraldb.patch_info(model).module_path == f"model.layers.{PATCH_LAYER}.mlp.down_proj"
    neuraldb.patch_model(model, db, module=module)
    assert neuraldb.patch_info(model).module_path == f"model.layers.{PATCH_LAYER}.mlp.down_proj"
    assert len(module._forward_hooks) == 1


class _Unknown(torch.nn.Module):
    """A model family neuraldb does not know: two linear layers, no config."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(4, 6)
        self.down = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_unknown_architecture_explains_module_and_works_with_it():
    model = _Unknown()
    db = neuraldb.NeuralKVDatabase(6, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r'module="model\.layers\.8\.mlp\.down_proj"'):
        neuraldb.patch_model(model, db)
    neuraldb.patch_model(model, db, module="down", gamma=0.99)
    x = torch.randn(3, 4)
    hidden = torch.relu(model.up(x))
    db.add(hidden[1], torch.full((4,), 100.0))
    with neuraldb.disabled(model):
        plain = model(x)
    got = model(x)
    assert torch.equal(got[1], plain[1] + 100.0)


def test_wrapped_model_resolves_by_suffix():
    inner = tiny_model("llama")

    class Wrapper(torch.nn.Module):  # the shape of PEFT's PeftModel: base_model.model.<hf model>
        def __init__(self, model):
            super().__init__()
            self.base_model = torch.nn.Module()
            self.base_model.model = model
            self.config = model.config

        def forward(self, *a, **k):
            return self.base_model.model(*a, **k)

    wrapped = Wrapper(inner)
    db = neuraldb.NeuralKVDatabase(*neuraldb.down_proj_dims(inner.model.layers[1].mlp.down_proj))
    neuraldb.patch_model(wrapped, db, layer=1)
    assert neuraldb.patch_info(wrapped).module_path == "base_model.model.model.layers.1.mlp.down_proj"


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"layer": 3}, ValueError, "layer"),
        ({"layer": -1}, ValueError, "layer"),
        ({"layer": True}, TypeError, "layer"),
        ({"layer": "1"}, TypeError, "layer"),
        ({"gamma": 2.0}, ValueError, "gamma"),
        ({"gamma": "0.5"}, TypeError, "gamma"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"module": "model.layers.9.mlp.down_proj"}, ValueError, "module"),
        ({"module": "mlp.down_proj"}, ValueError, "ambiguous"),
        ({"module": torch.nn.Linear(48, 32)}, ValueError, "module"),
        ({"module": "model.layers.1.mlp"}, TypeError, "module"),
        ({"module": 3}, TypeError, "module"),
        ({"backend": "nonsense"}, ValueError, "backend"),
        ({"backend": 1}, TypeError, "backend"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unpatched(kwargs, exc, match):
    model, _ids, module, _base, _keys, _out, db = _setup()
    with pytest.raises(exc, match=match):
        neuraldb.patch_model(model, db, **kwargs)
    assert neuraldb.patch_info(model) is None
    assert not module._forward_hooks


def test_bad_model_and_db_types():
    model, _ids, _module, _base, keys, _out, db = _setup()
    with pytest.raises(TypeError, match="model"):
        neuraldb.patch_model("model", db)
    with pytest.raises(TypeError, match="db"):
        neuraldb.patch_model(model, {"keys": keys})
    with pytest.raises(ValueError, match="value_dim"):
        neuraldb.patch_model(model, neuraldb.NeuralKVDatabase(db.key_dim, db.value_dim + 1))
    with pytest.raises(ValueError, match="meta"):
        neuraldb.patch_model(model, neuraldb.NeuralKVDatabase(db.key_dim, db.value_dim, device="meta"))
    assert neuraldb.patch_info(model) is None
    with pytest.raises(ValueError, match="not patched"):
        neuraldb.unpatch_model(model)
    with pytest.raises(ValueError, match="not patched"), neuraldb.disabled(model):
        pass


def test_compiled_forward_sees_database_changes_without_recompiling():
    import torch._dynamo.testing

    model, _ids, module, _base, _keys, _out, db = _setup()
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=0.9)
    mlp = model.model.layers[PATCH_LAYER].mlp
    x = torch.randn(1, 7, 32)
    with capture(module) as cap:
        plain = mlp(x)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mlp, fullgraph=True, backend=counter)  # fullgraph: the hook must not break the graph
    assert_bitwise(compiled(x), plain)
    db.add(cap.inputs[0][0, 3], torch.ones(32))
    got = compiled(x)
    assert_bitwise(got, mlp(x))
    assert torch.equal((got - plain).abs().amax(-1)[0] > 0, torch.arange(7) == 3)
    db.add(torch.randn(5, 48), torch.randn(5, 32))
    compiled(x)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_custom_op_passes_opcheck():
    model, _ids, _module, _base, keys, _out, db = _setup()
    db.add(keys[:4], torch.randn(4, 32))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=0.5)
    route = neuraldb.patch_info(model).route
    queries = torch.cat([keys[:2], torch.randn(3, 48)]).requires_grad_()
    torch.library.opcheck(torch.ops.neuraldb.database_retrieval.default, (queries, route))


def test_eager_forward_skips_the_custom_ops_and_tracers_record_them(monkeypatch):
    from torch.fx.experimental.proxy_tensor import make_fx

    model, ids, _, _, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    patched = model(ids).logits
    embeds = model.get_input_embeddings()(ids)
    gm = make_fx(lambda e: model(inputs_embeds=e).logits, tracing_mode="real")(embeds)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.neuraldb.database_retrieval.default) == 1
    assert_bitwise(gm(embeds), patched)

    def dispatched(*a, **kw):
        raise AssertionError("an eager forward went through a neuraldb custom op")

    for name in ("database_retrieval", "gated_retrieval", "gated_retrieval_prefiltered"):
        monkeypatch.setattr(torch.ops.neuraldb, name, dispatched)
    assert_bitwise(model(ids).logits, patched)


def test_vmap_over_a_patched_layer():
    layer = torch.nn.Linear(16, 4, bias=False)
    db = neuraldb.NeuralKVDatabase(16, 4)
    keys = torch.randn(5, 16)
    db.add(keys, torch.randn(5, 4))
    neuraldb.patch_model(layer, db, module=layer, gamma=0.5)
    x = torch.cat([keys[:3] * 2, torch.randn(3, 16)]).reshape(3, 2, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(layer)(x)
        assert torch.equal(got, layer(x))


def test_patched_model_backpropagates():
    model, ids, _module, base, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)

    def grad_and_logits():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds).logits  # inputs that require grad: the custom op, not the eager path
        logits.sum().backward()
        return embeds.grad, logits.detach()

    grad, logits = grad_and_logits()
    assert grad is not None and torch.isfinite(grad).all()
    # the edit is in the graph that was differentiated: its logits are the patched ones, its gradient not the base's
    torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-3)
    neuraldb.unpatch_model(model)
    base_grad, _ = grad_and_logits()
    assert not torch.allclose(grad, base_grad, atol=1e-6)


def test_deep_copy_of_a_patched_model_is_independent():
    model, ids, module, base, keys, out, db = _setup()
    p, gamma = separated_position(keys)
    db.add(keys[p], _residual(out))
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)
    patched = model(ids).logits
    twin = copy.deepcopy(model)
    twin_patch = neuraldb.patch_info(twin)
    assert isinstance(twin_patch, Patch) and twin_patch.db is not db
    assert twin_patch.route != neuraldb.patch_info(model).route
    assert_bitwise(twin(ids).logits, patched)
    twin_patch.db.delete(twin_patch.db.ids())
    assert_bitwise(twin(ids).logits, base)
    assert_bitwise(model(ids).logits, patched)
    neuraldb.unpatch_model(twin)
    assert len(module._forward_hooks) == 1
    assert_bitwise(model(ids).logits, patched)


def test_forward_during_concurrent_writes_sees_a_consistent_database():
    model, ids, _module, _base, keys, out, db = _setup(length=16)
    # Three positions whose activations only match themselves at gamma 0.999.
    chosen = []
    for pos in range(keys.shape[0]):
        scores = stored_key_scores(keys, keys[pos])
        if float(torch.cat([scores[:pos], scores[pos + 1 :]]).max()) < 0.99:
            chosen.append(pos)
    assert len(chosen) >= 3
    pos = dict(zip("abc", chosen))
    res = {name: _residual(out, seed) for seed, name in enumerate(("a", "b", "c", "b2"))}
    gamma = 0.999

    # Every consistent state the writer below can leave: two or three of the facts, b with either residual.
    states = []
    for subset in ("abc", "ab", "ac", "bc"):
        for b_res in ("b", "b2") if "b" in subset else ("b",):
            probe = neuraldb.NeuralKVDatabase(db.key_dim, db.value_dim)
            for name in subset:
                probe.add(keys[pos[name]], res[b_res if name == "b" else name])
            neuraldb.patch_model(model, probe, layer=PATCH_LAYER, gamma=gamma)
            with torch.no_grad():
                states.append(model(ids).logits)

    # Keys that never pass the gate make each retrieval long; the facts go last so every delete moves one of them
    # into the hole (its key and its residual are two copies a reader could see half-done).
    filler = torch.randn(20000, db.key_dim, generator=torch.Generator().manual_seed(0))
    db.add(filler, torch.randn(20000, db.value_dim))
    assert float(stored_key_scores(keys, filler[0]).max()) < gamma
    ids_of = {name: db.add(keys[pos[name]], res[name])[0] for name in "abc"}
    neuraldb.patch_model(model, db, layer=PATCH_LAYER, gamma=gamma)

    stop = threading.Event()
    errors: list[str] = []
    counts = {"forwards": 0, "writes": 0}

    def reader():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    got = model(ids).logits
                counts["forwards"] += 1
                if not any(torch.equal(got, s) for s in states):
                    errors.append("a forward saw a state that is none of the consistent ones")
        except Exception as exc:  # a torn read can also surface as a shape error inside the op
            errors.append(repr(exc))

    def writer():
        try:
            while not stop.is_set():
                for name in "abc":
                    db.delete([ids_of[name]])
                    [ids_of[name]] = db.add(keys[pos[name]], res[name])
                db.update([ids_of["b"]], residuals=res["b2"])
                db.update([ids_of["b"]], residuals=res["b"])
                counts["writes"] += 1
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(2)] + [threading.Thread(target=writer)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that an unlocked reader would interleave with writes
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert counts["forwards"] > 5 and counts["writes"] > 5
