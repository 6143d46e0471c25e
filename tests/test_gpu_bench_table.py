"""The CPU-side logic of benchmarks/gpu_op_table.py (planning, memory estimate, derived columns, table, JSON).

The measurements need a GPU; these checks do not, so the script cannot rot unnoticed on CPU-only CI.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_op_table.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_op_table", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


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
    row = bench.Row(t=16, m=100_000, d1=14336, d2=4096,
                    times_ms={"triton": 1.0, "cuda": 2.0, "eager": 3.0, "compiled": 1.5, "read_probe": 0.9,
                              "gemm_probe": 0.5})
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
