"""The product benchmarks (benchmarks/*.py) run and measure what they say, checked without importing them: each is run
as a script at a tiny size, and their method checks (benchmarks/checks.py) run in a subprocess, reported one test per
check. The experiments in benchmarks/experiments/ are not checked here."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# Every check in benchmarks/checks.py, by name: one that disappears fails test_every_check_is_reported.
CHECKS = [
    "test_bench_overhead_times_the_patch_hook_inside_the_forward",
    "test_bench_overhead_times_each_backend_as_a_variant_of_one_run",
    "test_bench_overhead_times_each_forward_right_after_one_in_its_own_state",
    "test_bench_overhead_graph_scenario_steps_as_the_decode_scenario",
    "test_bench_overhead_replays_one_graph_per_state_captured_under_it",
    "test_bench_overhead_graph_scenarios_need_cuda",
    "test_op_table_cold_mode_flushes_before_every_timed_call",
    "test_plan_builds_each_database_once",
    "test_memory_estimate",
    "test_derived_columns",
    "test_cascade_columns",
    "test_nominal_peak_lookup",
    "test_table_and_json",
    "test_dry_run_needs_no_gpu",
]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str | None]:
    """Check name -> None where it passed, else its failure (or skip) message."""
    xml = tmp_path_factory.mktemp("checks") / "checks.xml"
    proc = run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCH / "checks.py"), f"--junitxml={xml}", timeout=600
    )
    if not xml.exists():
        pytest.fail(
            f"benchmarks/checks.py did not run (rc {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    result = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        result[case.get("name")] = f"{bad[0].tag}: {bad[0].get('message')}\n{bad[0].text or ''}" if bad else None
    return result


@pytest.mark.parametrize("name", CHECKS)
def test_benchmark_check(outcomes, name):
    assert name in outcomes, f"benchmarks/checks.py has no check {name}"
    assert outcomes[name] is None, outcomes[name]


def test_every_check_is_reported(outcomes):
    assert sorted(outcomes) == sorted(CHECKS)


def test_op_table_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "op.json"
    proc = run("benchmarks/op_table.py", "--T", "1", "--m", "300", "--d1", "64", "--reps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    [row] = result["rows"]
    assert (row["T"], row["m"], row["d1"]) == (1, 300, 64)
    assert "cpu" in row["times_s"] and "read" in row["times_s"]


def test_gpu_op_table_plans_without_a_gpu():
    proc = run("benchmarks/gpu_op_table.py", "--dry-run", "--T", "1", "2048", "--m", "1000000", "--d1", "14336")
    assert proc.returncode == 0, proc.stderr
    assert "m=  1000000" in proc.stdout and "GiB" in proc.stdout


def test_plot_draws_an_overhead_result(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {
            "scenario": "decode_b1",
            "variant": "1bit+int4",
            "m": m,
            "unpatched_ms": 80.0,
            "added_ms": a,
            "added_pct": a / 0.8,
            "hook_ms": 0.1 + a / 2,
            "hook_pct": (0.1 + a / 2) / 0.8,
            "op_ms": a / 2,
            "key_bytes": m * 3072,
            **({"floor_ms": m * 1e-4, "added_over_floor": a / (m * 1e-4), "read_gb_s": 30.0} if m else {}),
        }
        for m, a in ((0, 0.05), (10_000, 0.7), (100_000, 3.5))
    ]
    machine = {"cpu": "a CPU", "isa": "avx512", "torch_threads": 1, "load_average_1_5_15": [0.5, 0.5, 0.5]}
    result = tmp_path / "overhead.json"
    result.write_text(json.dumps({"model": "smollm2", "dtype": "float32", "machine": machine, "rows": rows}))
    png = tmp_path / "overhead.png"
    proc = run("benchmarks/plot.py", str(result), "--out", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 10k |" in proc.stdout  # the tables, as bench_overhead prints them
