"""Self-checks of the experiments in this folder: each runs (or refuses cleanly) without a GPU and does what its
docstring says. They are not part of the test suite (pytest's testpaths is tests/, and tests never import an
experiment); run them with

    python -m pytest -q benchmarks/experiments/experiment_checks.py
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the experiments import each other and benchmarks/_common

from checks import tiny_llama


def load(name: str):
    return importlib.import_module(name)


def test_host_overhead_times_every_layer_of_each_cpu_backend(tmp_path):
    out = tmp_path / "host.json"
    threads = torch.get_num_threads()
    try:
        assert (
            load("host_overhead").main(["--calls", "20", "--m", "8", "--d1", "32", "--d2", "8", "--out", str(out)]) == 0
        )
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


@pytest.mark.skipif(sys.platform != "linux", reason="the database's 2 MB pages are Linux's")
def test_ab_pages_runs_each_variant_on_its_own_buffers_and_restores_the_huge_ones(monkeypatch, tmp_path):
    import neuraldb
    from neuraldb.host_memory import HUGE_PAGE

    ab = load("ab_pages")
    model = tiny_llama()
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
    huge = db._storage.signs_buf.data_ptr()
    assert read["2MB"] == {huge} and len(read["4KB"]) == 1 and read["4KB"] != {huge}
    st = db._storage
    buffers = [st.keys_buf, st.values_buf, st.sketch_buf, st.signs_buf]
    assert all(b.data_ptr() % HUGE_PAGE == 0 for b in buffers if b.numel() * b.element_size() >= HUGE_PAGE)
    assert st.cached_views[0] == (len(db), *map(id, buffers))
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
