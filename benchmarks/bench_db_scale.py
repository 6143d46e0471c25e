"""The database at 100k-1M facts: time and peak memory to add (batches of 1k), delete 10% at random, save and load.

    python benchmarks/bench_db_scale.py                       # m = 100k and 1M at SmolLM2-135M's layer dims (1536, 576)
    python benchmarks/bench_db_scale.py --m 100000            # 100k only (~0.5 GB)
    python benchmarks/bench_db_scale.py --m 20000 --tag smoke

Each m runs in a fresh subprocess, so its peak memory is its own. Memory is the process's resident set from
``/proc/self/status`` (``VmRSS`` now, ``VmHWM`` peak, reset between phases through ``/proc/self/clear_refs``), minus
the resident set before the database existed: it counts torch's allocations, which tracemalloc does not see. The
ideal is ``(d1 + d2) * m * 2`` bytes (fp16 keys and residuals); the target is within 10% of it plus the storage's growth
headroom (capacity doubles, so up to 2x the rows are *allocated*; pages of rows never written are not resident, so
the resident set grows with the rows actually written except for the copy made while doubling).

Keys are random (normalised by ``add``), residuals random, facts None (a Fact's strings add their own size).
Results: ``benchmarks/results/db_scale[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import (
    RESULTS,
    PeakSampler,
    anon_bytes,
    gib,
    load_average,
    machine_description,
    mem_available_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    write_json,
)
from neuraldb import NeuralKVDatabase


def _phase(name: str, base: tuple[int, int], fn) -> tuple[dict, object]:
    gc.collect()
    reset_peak_rss()
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        value = fn()
    secs = time.perf_counter() - t0
    row = {
        "phase": name,
        "seconds": round(secs, 3),
        "rss_gib": gib(rss_bytes() - base[0]),
        "peak_rss_gib": gib(peak_rss_bytes() - base[0]),
        "anon_gib": gib(anon_bytes() - base[1]),
        "peak_anon_gib": gib(sampler.peak_anon_bytes - base[1]),
    }
    print(
        f"  {name:7s} {secs:8.2f} s   resident {row['rss_gib']:7.3f} GiB   peak {row['peak_rss_gib']:7.3f} GiB   "
        f"anonymous peak {row['peak_anon_gib']:7.3f} GiB",
        flush=True,
    )
    return row, value


def run_one(m: int, d1: int, d2: int, batch: int, delete_frac: float, directory: Path, seed: int) -> dict:
    """All phases for one m, in this process."""
    torch.manual_seed(seed)
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    # Warm torch's allocator and the kernels add uses, so the baseline holds their one-time costs.
    warm = NeuralKVDatabase(d1, d2)
    warm.add(torch.randn(batch, d1), torch.randn(batch, d2))
    del warm
    gc.collect()
    base = (rss_bytes(), anon_bytes())
    ideal = (d1 + d2) * m * 2
    out: dict = {
        "m": m,
        "key_dim": d1,
        "value_dim": d2,
        "batch": batch,
        "ideal_gib": gib(ideal),
        "ideal_bytes": ideal,
        "phases": [],
    }
    db = NeuralKVDatabase(d1, d2)

    add_secs = [0.0]

    def add_all():
        for start in range(0, m, batch):
            n = min(batch, m - start)
            keys = torch.randn(n, d1, generator=gen)
            residuals = torch.randn(n, d2, generator=gen).mul_(0.1)
            t0 = time.perf_counter()
            db.add(keys, residuals)
            add_secs[0] += time.perf_counter() - t0

    row, _ = _phase("add", base, add_all)
    row["add_only_seconds"] = round(add_secs[0], 3)
    row["facts_per_s"] = round(m / add_secs[0])
    row["capacity"] = db.capacity
    row["capacity_gib"] = gib(db.capacity * (d1 + d2) * 2)
    out["phases"].append(row)

    doomed = rnd.sample(db.ids(), int(m * delete_frac))
    row, _ = _phase("delete", base, lambda: db.delete(doomed))
    row["deleted"] = len(doomed)
    out["phases"].append(row)
    n_left = len(db)
    probe_ids = db.ids()[:: max(1, n_left // 7)]
    probe = {i: db.get(i)[0] for i in probe_ids}

    path = directory / f"db_{m}.safetensors"
    row, _ = _phase("save", base, lambda: db.save(path))
    row["file_gib"] = gib(path.stat().st_size)
    out["phases"].append(row)

    db = None  # frees the database before the next size; the closures above have run
    gc.collect()
    out["rss_after_free_gib"] = gib(rss_bytes() - base[0])
    row, loaded = _phase("load", base, lambda: NeuralKVDatabase.load(path))
    assert len(loaded) == n_left and all(torch.equal(loaded.get(i)[0], k) for i, k in probe.items())
    out["phases"].append(row)
    path.unlink()

    add = out["phases"][0]
    # ratios against the unrounded ideal: at small m it rounds to 0.000 GiB
    ideal_gib = ideal / 2**30
    out["add_resident_over_ideal"] = round(add["rss_gib"] / ideal_gib, 3)
    out["peak_over_ideal"] = {p["phase"]: round(p["peak_rss_gib"] / ideal_gib, 3) for p in out["phases"]}
    out["peak_anon_over_ideal"] = {p["phase"]: round(p["peak_anon_gib"] / ideal_gib, 3) for p in out["phases"]}
    return out


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="100000,1000000", help="comma-separated database sizes")
    ap.add_argument("--key-dim", type=int, default=1536)
    ap.add_argument("--value-dim", type=int, default=576)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--delete-frac", type=float, default=0.1)
    ap.add_argument("--dir", type=Path, default=None, help="where the database file is written (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one m, print JSON
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one is not None:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            res = run_one(args.one, args.key_dim, args.value_dim, args.batch, args.delete_frac, Path(d), seed=0)
        print("RESULT " + json.dumps(res), flush=True)
        return res

    out = args.out or RESULTS / ("db_scale" + (f"_{args.tag}" if args.tag else "") + ".json")
    result = {
        "benchmark": "bench_db_scale",
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine_description("cpu"),
        "runs": [],
    }
    for m in (int(x) for x in args.m.split(",") if x):
        need = (args.key_dim + args.value_dim) * m * 2 * 3
        avail = mem_available_bytes()
        print(
            f"m={m}: ideal {gib((args.key_dim + args.value_dim) * m * 2):.3f} GiB, available {gib(avail):.1f} GiB",
            flush=True,
        )
        if avail is not None and avail < need:
            print(f"  skipped: needs about {gib(need):.1f} GiB free", flush=True)
            result["runs"].append({"m": m, "skipped": f"MemAvailable {gib(avail)} GiB < {gib(need)} GiB"})
            continue
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(m),
            "--key-dim",
            str(args.key_dim),
            "--value-dim",
            str(args.value_dim),
            "--batch",
            str(args.batch),
            "--delete-frac",
            str(args.delete_frac),
        ]
        if args.dir:
            cmd += ["--dir", str(args.dir)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        load_before = load_average()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        lines = proc.stdout.splitlines()
        print("\n".join(x for x in lines if not x.startswith("RESULT ")), flush=True)
        if proc.returncode != 0:
            result["runs"].append({"m": m, "error": f"exit status {proc.returncode}"})
            continue
        res = json.loads(next(x for x in lines if x.startswith("RESULT "))[len("RESULT ") :])
        res["load_average_before_after"] = [load_before, load_average()]
        result["runs"].append(res)
        write_json(out, result)
    print()
    print(table(result))
    write_json(out, result)
    print(f"\nwrote {out}")
    return result


def table(result: dict) -> str:
    lines = [
        "| m | phase | seconds | resident GiB | peak GiB (VmHWM) | anonymous peak GiB | anon. peak / ideal | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in result["runs"]:
        if "phases" not in run:
            lines.append(f"| {run['m']:,} | - | | | | | | {run.get('skipped') or run.get('error')} |")
            continue
        ideal = run["ideal_bytes"] / 2**30 if "ideal_bytes" in run else run["ideal_gib"]
        for p in run["phases"]:
            note = ""
            if p["phase"] == "add":
                note = (
                    f"ideal {ideal:.3f} GiB, capacity {p['capacity']:,} rows ({p['capacity_gib']:.3f} GiB), "
                    f"{p['facts_per_s']:,} facts/s (add only)"
                )
            elif p["phase"] == "delete":
                note = f"{p['deleted']:,} ids"
            elif p["phase"] == "save":
                note = f"file {p['file_gib']:.3f} GiB"
            lines.append(
                f"| {run['m']:,} | {p['phase']} | {p['seconds']:.2f} | {p['rss_gib']:.3f} | "
                f"{p['peak_rss_gib']:.3f} | {p['peak_anon_gib']:.3f} | {p['peak_anon_gib'] / ideal:.2f}x | "
                f"{note} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
