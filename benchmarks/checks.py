"""Self-checks of the product benchmarks' method, on tiny inputs and without a GPU: that ``bench_overhead.py`` times
what it says it times (each forward after one in its own state, one patch per variant, the hook inside the forward,
one captured graph per state), that ``op_table.py --cold-mb`` flushes before every timed call, and the CPU-side logic
of ``gpu_op_table.py`` (plan, memory estimate, derived columns, table, JSON).

    python -m pytest -q benchmarks/checks.py

``tests/test_bench_scripts.py`` runs this file in a subprocess and reports each check, so the test suite covers the
benchmarks without importing them.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead
import gpu_op_table
import neuraldb
import op_table
from neuraldb.patching import Patch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# bench_overhead.py
# ---------------------------------------------------------------------------------------------------------------------


def test_bench_overhead_times_the_patch_hook_inside_the_forward(monkeypatch):
    bench = bench_overhead
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


def _one_layer_setup(monkeypatch):
    """bench_overhead, a one-Linear model whose layer it patches, and a 3-fact database for it."""

    bench = bench_overhead
    model = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False))
    db = neuraldb.NeuralKVDatabase(16, 4)
    db.add(torch.randn(3, 16), torch.randn(3, 4))
    monkeypatch.setattr(bench.arch, "down_proj_module", lambda m, layer: ("0", m[0]))
    return bench, model, db


def test_bench_overhead_times_each_backend_as_a_variant_of_one_run(monkeypatch):
    bench, model, db = _one_layer_setup(monkeypatch)
    built = []
    monkeypatch.setattr(
        bench,
        "patch_model",
        lambda *a, backend, **k: built.append(backend) or neuraldb.patch_model(*a, backend=backend, **k),
    )
    kernels = []
    real = neuraldb.patching.Patch._retrieve
    monkeypatch.setattr(
        neuraldb.patching.Patch,
        "_retrieve",
        lambda self, q, eager: kernels.append(self._backend_on(q.device, True)) or real(self, q, eager),
    )
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
    [row] = bench.measure(
        model, db, scenario, 0, reps=4, warmup=0, device="cpu", gamma=0.5, variants={"plain": ("plain", None)}
    )
    unpatched = [round(v / 1e3) for v in row["unpatched_ms_all"]]
    patched = [round(v / 1e3) for v in row["patched_ms_all"]]
    assert len(unpatched) == len(patched) == 4
    assert all(ran[i] == "unpatched" and i > 0 and ran[i - 1] == "unpatched" for i in unpatched), ran
    assert all(ran[i] == "patched" and i > 0 and ran[i - 1] == "patched" for i in patched), ran
    assert [u < p for u, p in zip(unpatched, patched)] == [True, False, False, True]


def test_bench_overhead_graph_scenario_steps_as_the_decode_scenario():
    """The static-cache step a graph captures is the same decode step as the dynamic-cache one, every time."""
    bench = bench_overhead
    model = tiny_llama()
    static = bench.Scenario("graph_b8", model, "cpu", 12, torch.Generator().manual_seed(3))
    dynamic = bench.Scenario("decode_b8", model, "cpu", 12, torch.Generator().manual_seed(3))
    assert static.captured and not dynamic.captured and static.queries == 8
    want = dynamic.step()
    assert want.shape == (8, 1, 64)
    for _ in range(2):  # the second step rewrites the same cache slot: a replay repeats the step
        torch.testing.assert_close(static.step(), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dynamic.step(), want, rtol=0, atol=0)


def test_bench_overhead_replays_one_graph_per_state_captured_under_it(monkeypatch):
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
    scenario = types.SimpleNamespace(
        name="graph_b1", queries=1, captured=True, step=lambda: eager.append(1) or model(x)
    )
    variants = {bench.variant_label("plain", b, True): ("plain", b) for b in ("torch", "cpu")}
    rows = bench.measure(model, db, scenario, 0, reps=4, warmup=1, device="cpu", gamma=0.5, variants=variants)
    # Captured once per state (the one eager step each), then only replayed: warm-up and repetitions.
    assert len(eager) == 3
    assert sorted(set(replays)) == ["patched cpu", "patched torch", "unpatched"]
    assert all(replays.count(s) == 1 + 2 * 4 for s in set(replays))
    # Replays run no hook, so no hook time is reported; the added time is still one per variant.
    assert [(r["variant"], r["hook_ms"], len(r["patched_ms_all"])) for r in rows] == [
        ("plain torch", None, 4),
        ("plain cpu", None, 4),
    ]
    assert neuraldb.patch_info(model) is None
    assert bench.tables({"rows": [dict(r, m=0, key_bytes=0) for r in rows]})  # the tables skip the missing hook


def test_bench_overhead_graph_scenarios_need_cuda():
    bench = bench_overhead
    with pytest.raises(SystemExit):
        bench.main(["--scenarios", "graph_b1", "--device", "cpu", "--m", "0"])


# ---------------------------------------------------------------------------------------------------------------------
# op_table.py
# ---------------------------------------------------------------------------------------------------------------------


def test_op_table_cold_mode_flushes_before_every_timed_call(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(op_table, "_cache_flusher", lambda mb: lambda: calls.append(mb))
    out = tmp_path / "op.json"
    assert (
        op_table.main(["--T", "1", "--m", "300", "--d1", "64", "--reps", "2", "--cold-mb", "3", "--out", str(out)]) == 0
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["cold_mb"] == 3
    # One flush per timed call: every variant twice, but the reference once (its second rep is the warm-up check).
    assert len(calls) == sum(len(ts) for ts in row["times_s"].values()) - 1 and set(calls) == {3}


# ---------------------------------------------------------------------------------------------------------------------
# gpu_op_table.py: the measurements need a GPU, these checks do not
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def bench():
    return gpu_op_table


def test_plan_builds_each_database_once(bench):
    shapes = bench.plan([16, 1, 2048], [100_000, 10_000], [14336, 4096])
    assert len(shapes) == 12
    dbs = [(s.d1, s.m) for s in shapes]
    assert dbs == sorted(dbs)  # grouped: one database per (d1, m), reused for every T
    assert [s.t for s in shapes[:3]] == [1, 16, 2048]


def test_memory_estimate(bench):
    # 1M x 14336 fp16 keys alone are 28.7 GB; with 4096-wide values about 36.9 GB: fits an 80 GB card, not 40.
    need = bench.bytes_needed(1_000_000, 14336, 4096, 2048)
    assert 36e9 < need < 40e9
    assert bench.fits(need, 80 * 2**30) and not bench.fits(need, 40 * 2**30)
    assert bench.bytes_needed(10_000, 4096, 4096, 1) < 1e9


def test_derived_columns(bench):
    row = bench.Row(
        t=16,
        m=100_000,
        d1=14336,
        d2=4096,
        times_ms={"triton": 1.0, "cuda": 2.0, "eager": 3.0, "compiled": 1.5, "read_probe": 0.9, "gemm_probe": 0.5},
    )
    d = bench.derive(row, nominal_tflops=989.4)
    key_bytes = 100_000 * 14336 * 2
    assert d["read_probe_gbps"] == pytest.approx(key_bytes / 0.9e-3 / 1e9)
    assert d["triton_pct_read_probe"] == pytest.approx(90.0)
    assert d["cuda_pct_read_probe"] == pytest.approx(45.0)
    assert d["triton_speedup_vs_eager"] == pytest.approx(3.0)
    assert d["triton_speedup_vs_compiled"] == pytest.approx(1.5)
    assert d["triton_pct_gemm_probe"] == pytest.approx(50.0)
    assert d["triton_tflops"] == pytest.approx(2 * 16 * 100_000 * 14336 / 1e-3 / 1e12)
    assert d["triton_pct_nominal"] == pytest.approx(100 * d["triton_tflops"] / 989.4)
    assert "eager_speedup_vs_eager" not in d
    partial = bench.derive(bench.Row(1, 10, 8, 4, times_ms={"triton": 1.0}), None)
    assert set(partial) == {"triton_key_gbps", "triton_tflops"}


def test_nominal_peak_lookup(bench):
    assert bench.nominal_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bench.nominal_peak("NVIDIA H200") == pytest.approx(989.4)
    assert bench.nominal_peak("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert bench.nominal_peak("Some Future GPU") is None


def test_cascade_columns(bench):
    row = bench.Row(t=1, m=1000, d1=64, d2=4, times_ms={"triton": 1.0, "cascade": 0.25, "read_probe": 0.5})
    d = bench.derive(row, None)
    assert d["cascade_x_read"] == pytest.approx(0.5) and d["cascade_speedup_vs_triton"] == pytest.approx(4.0)
    row.derived = d
    head, line = bench.format_table([row]).splitlines()[0:3:2]
    assert "cas/rd" in head and line.split()[-2:] == ["0.500", "4.00"]
    # Row 0 opens (0.9 > 0.6); rows 1 and 2 stay closed, which the cascade reports as -1, -inf and zeros.
    out = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    plain = (out, torch.tensor([4, 7, 2]), torch.tensor([0.9, 0.5, 0.1]))
    cascade = (out.clone(), torch.tensor([4, -1, -1]), torch.tensor([0.9, float("-inf"), float("-inf")]))
    assert bench.matches_plain(cascade, plain, 0.6) == 1.0
    cascade[1][0] = 5
    assert bench.matches_plain(cascade, plain, 0.6) == pytest.approx(2 / 3)
    assert bench.bytes_needed(1000, 1536, 8, 1, sketches=True) > bench.bytes_needed(1000, 1536, 8, 1) + 1000 * 1100


def test_table_and_json(bench, tmp_path):
    rows = [bench.Row(1, 10_000, 4096, 4096, times_ms={"triton": 0.05, "eager": 0.4, "read_probe": 0.03})]
    rows[0].derived = bench.derive(rows[0], None)
    text = bench.format_table(rows)
    assert "triton" in text.splitlines()[0] and "10000" in text
    path = bench.write_json(tmp_path / "x.json", {"device": "NVIDIA H100 80GB HBM3"}, rows)
    data = json.loads(path.read_text())
    assert data["device"] == "NVIDIA H100 80GB HBM3" and data["rows"][0]["times_ms"]["triton"] == 0.05
    p = bench.result_path("NVIDIA H100 80GB HBM3", "20260101-000000")
    assert p.name == "gpu_op_table_nvidia-h100-80gb-hbm3_20260101-000000.json"
    assert p.parent.name == "results"


def test_dry_run_needs_no_gpu(bench, capsys):
    assert bench.main(["--dry-run", "--T", "1", "2048", "--m", "1000000", "--d1", "14336"]) == 0
    out = capsys.readouterr().out
    assert "m=  1000000" in out and "GiB" in out
