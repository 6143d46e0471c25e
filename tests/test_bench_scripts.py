"""benchmarks/host_overhead.py and benchmarks/triton_config_sweep.py run (or refuse cleanly) without a GPU, and
bench_overhead's hook timer spans the patch's retrieval."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import their siblings (_common, gpu_op_table)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_host_overhead_times_every_layer_of_each_cpu_backend(tmp_path):
    out = tmp_path / "host.json"
    threads = torch.get_num_threads()
    try:
        assert load("host_overhead").main(["--calls", "20", "--m", "8", "--d1", "32", "--d2", "8", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["machine"] and (result["m"], result["d1"], result["d2"]) == (8, 32, 8)
    rows = result["us_per_call"]
    assert "torch" in rows
    for row in rows.values():
        assert list(row) == ["kernel", "op", "gated_retrieval", "retrieve_residuals", "plain_linear", "patched - plain"]
        assert all(math.isfinite(v) for v in row.values())
        assert all(row[k] > 0 for k in ("kernel", "op", "gated_retrieval", "retrieve_residuals", "plain_linear"))


def test_triton_config_sweep_parses_configs_and_needs_a_gpu(capsys):
    sweep = load("triton_config_sweep")
    assert sweep.parse_config("128,256,32,8,4") == (128, 256, 32, 8, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="BLOCK_T,BLOCK_N,BLOCK_D,num_warps,num_stages"):
        sweep.parse_config("128,256")
    if not torch.cuda.is_available():
        assert sweep.main(["--T", "2048"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_bench_overhead_times_the_patch_hook_inside_the_forward(monkeypatch):
    import time

    import neuraldb
    from neuraldb.patching import Patch

    bench = load("bench_overhead")
    model = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False))
    db = neuraldb.NeuralKVDatabase(16, 4)
    db.add(torch.randn(3, 16), torch.randn(3, 4))
    neuraldb.patch_model(model, db, module=model[0], gamma=0.5)
    x = torch.randn(2, 16)
    want = model(x)
    real = Patch._retrieve

    def slow(self, queries, eager):
        time.sleep(0.02)
        return real(self, queries, eager)

    monkeypatch.setattr(Patch, "_retrieve", slow)
    sink: list[tuple[float, float]] = []
    handles = bench.time_patch_hook(model[0], sink)
    got = model(x)
    for h in handles:
        h.remove()
    assert torch.equal(got, want), "the timers must not change the output"
    # One (wall, CPU) pair per forward, spanning the retrieval (the sleep) but not counting it as CPU time.
    assert len(sink) == 1 and sink[0][0] >= 0.02 and sink[0][1] < 0.02
    assert len(model[0]._forward_hooks) == 1, "only the patch's own hook is left"


def test_op_table_cold_mode_flushes_before_every_timed_call(tmp_path, monkeypatch):
    op_table = load("op_table")
    calls = []
    monkeypatch.setattr(op_table, "_cache_flusher", lambda mb: (lambda: calls.append(mb)))
    out = tmp_path / "op.json"
    assert op_table.main(["--T", "1", "--m", "300", "--d1", "64", "--reps", "2", "--cold-mb", "3", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["cold_mb"] == 3
    # One flush per timed call: every variant twice, but the reference once (its second rep is the warm-up check).
    assert len(calls) == sum(len(ts) for ts in row["times_s"].values()) - 1 and set(calls) == {3}


def _one_layer_setup(monkeypatch):
    """bench_overhead, a one-Linear model whose layer it patches, and a 3-fact database for it."""
    import neuraldb

    bench = load("bench_overhead")
    model = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False))
    db = neuraldb.NeuralKVDatabase(16, 4)
    db.add(torch.randn(3, 16), torch.randn(3, 4))
    monkeypatch.setattr(bench.arch, "down_proj_module", lambda m, layer: ("0", m[0]))
    return bench, model, db


def test_bench_overhead_times_each_backend_as_a_variant_of_one_run(monkeypatch):
    import types

    import neuraldb

    bench, model, db = _one_layer_setup(monkeypatch)
    built = []
    monkeypatch.setattr(bench, "patch_model", lambda *a, backend, **k: built.append(backend) or neuraldb.patch_model(
        *a, backend=backend, **k))
    kernels = []
    real = neuraldb.patching.Patch._retrieve
    monkeypatch.setattr(neuraldb.patching.Patch, "_retrieve",
                        lambda self, q, eager: kernels.append(self._backend_on(q.device, True)) or real(self, q, eager))
    x = torch.randn(1, 16)
    ran = []

    def step():
        patch = neuraldb.patch_info(model)
        ran.append("unpatched" if patch is None else (patch.backend, id(patch)))
        return model(x)

    scenario = types.SimpleNamespace(name="decode_b1", queries=1, captured=False, step=step)
    variants = {bench.variant_label("plain", b, True): ("plain", b) for b in ("torch", None)}
    assert list(variants) == ["plain torch", "plain auto"]
    rows = bench.measure(model, db, scenario, 0, reps=4, warmup=1, device="cpu", gamma=0.5, variants=variants)
    got = [(r["variant"], r["backend"], r["reps"]) for r in rows]
    assert got == [("plain torch", "torch", 4), ("plain auto", None, 4)]
    # Each variant's patch is built once and serves all its forwards (warm-up, repetitions, hook timing), so no
    # timed forward pays a new patch's one-off work; each forward ran its own variant's backend.
    assert built == ["torch", None]
    patched = [r for r in ran if r != "unpatched"]
    # per state: one warm-up, two forwards per repetition (one untimed, one timed); per variant, the hook-timed ones
    assert len(patched) == 2 * (1 + 2 * 4 + 4) and ran.count("unpatched") == 1 + 2 * 4
    assert len({i for b, i in patched if b == "torch"}) == len({i for b, i in patched if b is None}) == 1
    assert kernels.count("torch") == 1 + 2 * 4 + 4 and kernels.count("cpu") == 1 + 2 * 4 + 4
    assert neuraldb.patch_info(model) is None


def test_bench_overhead_times_each_forward_right_after_one_in_its_own_state(monkeypatch):
    """A timed forward must find the caches as its own state leaves them, not as the other state does; and which
    state goes first alternates."""
    import types

    import neuraldb

    bench, model, db = _one_layer_setup(monkeypatch)
    x = torch.randn(1, 16)
    ran = []

    def step():
        ran.append("unpatched" if neuraldb.patch_info(model) is None else "patched")
        return model(x)

    def fake_timer(fn, device):  # "times" a forward as its index in ran
        fn()
        return float(len(ran) - 1), 1.0

    monkeypatch.setattr(bench, "timed_both", fake_timer)
    scenario = types.SimpleNamespace(name="decode_b1", queries=1, captured=False, step=step)
    [row] = bench.measure(model, db, scenario, 0, reps=4, warmup=0, device="cpu", gamma=0.5,
                          variants={"plain": ("plain", None)})
    unpatched = [round(v / 1e3) for v in row["unpatched_ms_all"]]
    patched = [round(v / 1e3) for v in row["patched_ms_all"]]
    assert len(unpatched) == len(patched) == 4
    assert all(ran[i] == "unpatched" and i > 0 and ran[i - 1] == "unpatched" for i in unpatched), ran
    assert all(ran[i] == "patched" and i > 0 and ran[i - 1] == "patched" for i in patched), ran
    assert [u < p for u, p in zip(unpatched, patched)] == [True, False, False, True]


def test_paired_steps_alternate_the_variants_and_time_each_pair(monkeypatch):
    import types

    ab = load("ab_builds")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    active, ran = [], []
    scenario = types.SimpleNamespace(step=lambda: ran.append(active[-1]) or model(torch.randn(1, 4)))
    variants = {"a": lambda: active.append("a"), "b": lambda: active.append("b")}
    step, hook = ab.paired_steps(scenario, model[0], variants, pairs=3, warmup=1)
    assert {v: len(x) for v, x in step.items()} == {v: len(x) for v, x in hook.items()} == {"a": 3, "b": 3}
    # warm-up a, b; then per pair and variant an untimed, a timed and a hook-timed step in a row (a timed step
    # follows one of its own variant), the order reversed every other pair
    assert ran == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3
    assert len(model[0]._forward_hooks) == 0, "the hook timers are removed"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def test_bench_overhead_graph_scenario_steps_as_the_decode_scenario():
    """The static-cache step a graph captures is the same decode step as the dynamic-cache one, every time."""
    bench = load("bench_overhead")
    model = _tiny_llama()
    static = bench.Scenario("graph_b8", model, "cpu", 12, torch.Generator().manual_seed(3))
    dynamic = bench.Scenario("decode_b8", model, "cpu", 12, torch.Generator().manual_seed(3))
    assert static.captured and not dynamic.captured and static.queries == 8
    want = dynamic.step()
    assert want.shape == (8, 1, 64)
    for _ in range(2):  # the second step rewrites the same cache slot: a replay repeats the step
        torch.testing.assert_close(static.step(), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dynamic.step(), want, rtol=0, atol=0)


def test_bench_overhead_replays_one_graph_per_state_captured_under_it(monkeypatch):
    import types

    import neuraldb

    bench, model, db = _one_layer_setup(monkeypatch)
    replays: list[str] = []

    def fake_capture(step):
        patch = neuraldb.patch_info(model)
        state = "unpatched" if patch is None else f"patched {patch.backend}"
        step()
        return types.SimpleNamespace(replay=lambda: replays.append(state))

    monkeypatch.setattr(bench, "capture_graph", fake_capture)
    eager = []
    x = torch.randn(1, 16)
    scenario = types.SimpleNamespace(name="graph_b1", queries=1, captured=True,
                                     step=lambda: eager.append(1) or model(x))
    variants = {bench.variant_label("plain", b, True): ("plain", b) for b in ("torch", "cpu")}
    rows = bench.measure(model, db, scenario, 0, reps=4, warmup=1, device="cpu", gamma=0.5, variants=variants)
    # Captured once per state (the one eager step each), then only replayed: warm-up and repetitions.
    assert len(eager) == 3
    assert sorted(set(replays)) == ["patched cpu", "patched torch", "unpatched"]
    assert all(replays.count(s) == 1 + 2 * 4 for s in set(replays))
    # Replays run no hook, so no hook time is reported; the added time is still one per variant.
    assert [(r["variant"], r["hook_ms"], len(r["patched_ms_all"])) for r in rows] == [
        ("plain torch", None, 4), ("plain cpu", None, 4)]
    assert neuraldb.patch_info(model) is None
    assert bench.tables({"rows": [dict(r, m=0, key_bytes=0) for r in rows]})  # the tables skip the missing hook


def test_bench_overhead_graph_scenarios_need_cuda():
    bench = load("bench_overhead")
    with pytest.raises(SystemExit):
        bench.main(["--scenarios", "graph_b1", "--device", "cpu", "--m", "0"])


@pytest.mark.skipif(sys.platform != "linux", reason="the database's 2 MB pages are Linux's")
def test_ab_pages_runs_each_variant_on_its_own_buffers_and_restores_the_huge_ones(monkeypatch, tmp_path):
    import neuraldb
    from neuraldb.host_memory import HUGE_PAGE

    ab = load("ab_pages")
    model = _tiny_llama()
    db = neuraldb.NeuralKVDatabase(64, 32)
    g = torch.Generator().manual_seed(0)
    db.add(torch.randn(20_000, 64, generator=g), torch.randn(20_000, 32, generator=g))  # 2.4 MB of keys
    neuraldb.patch_model(model, db, layer=0, gamma=0.65)
    x = torch.randint(64, (1, 1), generator=g)
    scenario = type("S", (), {"step": staticmethod(lambda: model(x))})
    module = model.model.layers[0].mlp.down_proj
    monkeypatch.setattr(ab, "patched_decode", lambda args: (scenario, module, db, neuraldb.patch_info(model)))
    from neuraldb_kernels import extension

    ext = extension.load()
    real, signs_read = ext.gated_residuals_cpu, []
    monkeypatch.setattr(ext, "gated_residuals_cpu", lambda *a: signs_read.append(a[5].data_ptr()) or real(*a))
    read: dict[str, set[int]] = {}

    def paired_steps(scenario, module, variants, pairs):
        for v, activate in variants.items():
            activate()
            signs_read.clear()
            scenario.step()
            read[v] = set(signs_read)
        return {v: [1e-3] * pairs for v in variants}, {v: [1e-4] * pairs for v in variants}

    monkeypatch.setattr(ab, "paired_steps", paired_steps)
    out = ab.main(["--pairs", "2", "--out", str(tmp_path / "ab.json")])  # its first step builds the sketches
    huge = db._signs.data_ptr()
    assert read["2MB"] == {huge} and len(read["4KB"]) == 1 and read["4KB"] != {huge}
    buffers = [getattr(db, n) for n in ("_keys", "_values", "_sketch", "_signs")]
    assert all(b.data_ptr() % HUGE_PAGE == 0 for b in buffers if b.numel() * b.element_size() >= HUGE_PAGE)
    assert db._views[0] == (len(db), id(db._keys), id(db._values), id(db._sketch), id(db._signs))
    assert out["step_diff"]["median_ms"] == 0 and json.loads((tmp_path / "ab.json").read_text())["pairs"] == 2


def test_row_threshold_sim_gates_each_row_at_the_higher_of_gamma_and_its_threshold():
    sim = load("row_threshold_sim")
    keys = torch.eye(3)
    # state i is nearest key i at cosine 0.8, 0.7 and 0.9
    states = torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.7, 0.387], [0.436, 0.0, 0.9]])
    opens, row = sim.gate(keys, states, 0.65, None)
    assert row.tolist() == [0, 1, 2] and opens.tolist() == [True, True, True]
    # row 0 raised above its state's 0.8; row 1's threshold below gamma must not lower the bar; row 2 unchanged
    opens, _ = sim.gate(keys, states, 0.65, torch.tensor([0.85, 0.5, -1.0]))
    assert opens.tolist() == [False, True, True]
    opens, _ = sim.gate(keys, states, 0.75, torch.tensor([0.85, 0.5, -1.0]))
    assert opens.tolist() == [False, False, True]


def test_split_sweep_candidates_and_needs_a_gpu(capsys):
    sweep = load("split_sweep")
    # At Llama-3-8B's width the plan splits 10k keys finer than the old 64-key minimum did (157 programs, 132 SMs).
    got = sweep.candidates(1, 10_000, 132, 14336 * 2, [500])
    assert got["old plan"] == 157 and got["plan"] == 313
    assert got["132 splits"] == 132 and got["792 splits"] == 792 and got["500 splits"] == 500
    assert max(sweep.candidates(1, 2000, 132, 14336 * 2, []).values()) <= 250  # no split under 8 keys
    if not torch.cuda.is_available():
        assert sweep.main(["--T", "1"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
