"""gated_retrieval on this CPU: every backend against eager PyTorch and against a same-run read-bandwidth probe.

    python benchmarks/op_table.py            # T in {1, 8, 128} x m in {10k, 100k, 1M} x d1 in {1536, 4096, 14336}
    python benchmarks/op_table.py --quick    # m = 100k, d1 = 1536 only

Per (T, m, d1) it times, interleaved round-robin (``--reps`` rounds, medians reported):

* every available CPU backend of the op (``cpu`` = the C++ kernel, auto-chosen ISA; ``torch`` = the eager
  reference, which is the chunked PyTorch spec in ``neuraldb_kernels/reference.py``);
* ``prefiltered``: the C++ kernel behind the exact int4 key sketch (``gated_retrieval_prefiltered``; its ``out`` is
  checked to equal ``cpu``'s bitwise; building the sketch is timed once, outside the rounds);
* ``cascade``: the same behind the exact 1-bit first stage as well (``build_signs``; checked and timed likewise);
* eager peers: ``fp16_mm`` = ``queries.half() @ keys.T`` (scores only: no normalisation, argmax or gather) and
  ``fp32_mm`` = ``queries.float() @ keys.float().T`` (the fp32 upcast of the keys included; skipped where the
  fp32 copy would not fit in memory);
* ``read``: the read-bandwidth probe, ``neuraldb_kernels.probe.read_probe(keys)``, a C++ loop that XORs every
  64-byte line of the key tensor (512-bit loads and a software prefetch 1 KB ahead where AVX-512 exists) with
  the kernel's own threading (256 KB chunks taken in turn by torch.get_num_threads() threads); ``keys.sum()``
  is timed too, for reference. "% read" is read time / kernel time, from the same interleaved run.

``--cold-mb N`` reads an N MB buffer before every timed call (the read probe's loop), so each call starts with the
caches as a model's forward leaves them (its weights streamed past), rather than holding the keys from the previous
call: 600 MB is about a SmolLM2-135M fp32 decode step.

Keys are fp16 unit rows, values fp16 (m, 256), queries fp32; gamma 0.5 (``--gamma``). Configurations whose tensors would not fit
in the available memory are skipped. Results go to stdout (a table) and to benchmarks/results/op_table-*.json
with the CPU model, thread count, torch version, load average before/after, and every raw timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import RESULTS, cpu_flags, cpu_model, mem_available_bytes, write_json

import neuraldb_kernels
from neuraldb_kernels import extension
from neuraldb_kernels.probe import probe_built, read_probe

D2 = 256


def make_keys(m: int, d1: int, seed: int = 0) -> torch.Tensor:
    """fp16 unit rows, generated in chunks (no fp32 copy of the whole matrix)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.empty(m, d1, dtype=torch.float16)
    step = max(1, (64 << 20) // (4 * d1))
    for s in range(0, m, step):
        keys[s : s + step] = torch.nn.functional.normalize(torch.randn(min(step, m - s), d1, generator=g), dim=1)
    return keys


def variants(t: int, m: int, d1: int, queries, keys, values, sketch, signs, budget: int, gamma: float) -> dict:
    v = {}
    for name in neuraldb_kernels.available_backends("cpu"):
        if name == "triton":
            continue
        v[name] = lambda n=name: neuraldb_kernels.gated_retrieval(queries, keys, values, gamma, backend=n)
    if "cpu" in v:
        v["prefiltered"] = lambda: neuraldb_kernels.gated_retrieval_prefiltered(
            queries, keys, values, gamma, sketch, backend="cpu"
        )
        v["cascade"] = lambda: neuraldb_kernels.gated_retrieval_prefiltered(
            queries, keys, values, gamma, sketch, signs, backend="cpu"
        )
    v["fp16_mm"] = lambda: queries.half() @ keys.T
    if m * d1 * 4 + t * m * 4 < budget:
        v["fp32_mm"] = lambda: queries.float() @ keys.float().T
    if probe_built():
        v["read"] = lambda: read_probe(keys)
    v["sum"] = lambda: keys.sum()
    return v


def bench_config(t: int, m: int, d1: int, reps: int, budget: int, gamma: float = 0.5, cold_mb: int = 0) -> dict:
    keys = make_keys(m, d1)
    g = torch.Generator().manual_seed(1)
    values = torch.randn(m, D2, generator=g).half()
    # Half the queries are noisy copies of keys (their gate opens), half are random.
    queries = torch.randn(t, d1, generator=g)
    queries[: (t + 1) // 2] += 2 * d1**0.5 * keys[torch.randint(0, m, ((t + 1) // 2,), generator=g)].float()
    t0 = time.perf_counter()
    sketch = neuraldb_kernels.build_sketch(keys)
    sketch_build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    signs = neuraldb_kernels.build_signs(keys)
    signs_build_s = time.perf_counter() - t0
    fns = variants(t, m, d1, queries, keys, values, sketch, signs, budget, gamma)
    times: dict[str, list[float]] = {n: [] for n in fns}
    # Process CPU time beside the wall time: on a CPU shared with other jobs it counts only this process's work.
    cpu_times: dict[str, list[float]] = {n: [] for n in fns}
    # The reference's answer, for a correctness check of every backend (its time counts as a "torch" rep).
    t0 = time.perf_counter()
    ref = neuraldb_kernels.gated_retrieval(queries, keys, values, gamma, backend="torch")
    times["torch"].append(time.perf_counter() - t0)
    for name in fns:
        if name in ("torch", "fp16_mm", "fp32_mm", "read", "sum"):
            continue
        out, idx, _score = fns[name]()  # also the warm-up (thread pool, allocator, first touch)
        if name in ("prefiltered", "cascade"):
            assert torch.equal(out, fns["cpu"]()[0]), f"the {name} kernel's out differs from the plain kernel's"
            continue
        agree = float((idx == ref[1]).float().mean())
        if agree < 1.0:
            print(f"  note: {name} idx agrees with the reference on {agree:.3f} of rows (near-ties allowed)")
    for n in ("fp16_mm", "fp32_mm", "read", "sum"):
        if n in fns:
            fns[n]()  # warm-up
    flush = _cache_flusher(cold_mb)
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # interleaved, alternating order
        for n in order:
            if n == "torch" and r == reps - 1:
                continue  # it already has one rep from the correctness check
            flush()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            cpu_times[n].append(time.process_time() - c0)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    key_bytes = keys.numel() * keys.element_size()
    read = med.get("read", med["sum"])
    eager = {n: med[n] for n in ("torch", "fp16_mm", "fp32_mm") if n in med}
    best_eager = min(eager, key=eager.get)
    row = {
        "T": t,
        "m": m,
        "d1": d1,
        "d2": D2,
        "gamma": gamma,
        "key_bytes": key_bytes,
        "reps": reps,
        "cold_mb": cold_mb,
        "median_s": med,
        "times_s": times,
        "median_cpu_s": {n: statistics.median(ts) for n, ts in cpu_times.items() if ts},
        "cpu_times_s": cpu_times,
        "read_GBps": key_bytes / read / 1e9,
        "sum_GBps": key_bytes / med["sum"] / 1e9,
        "best_eager": best_eager,
        "sketch_bytes": sketch.numel(),
        "sketch_build_s": sketch_build_s,
        "signs_bytes": signs.numel(),
        "signs_build_s": signs_build_s,
    }
    for n in fns:
        if n in ("read", "sum", "fp16_mm", "fp32_mm") or n == "torch":
            continue
        row[n] = {
            "GBps": key_bytes / med[n] / 1e9,
            "frac_of_read_bw": read / med[n],
            "speedup_vs_eager_ref": med["torch"] / med[n],
            "speedup_vs_fp16_mm": med["fp16_mm"] / med[n],
            "speedup_vs_fp32_mm": med["fp32_mm"] / med[n] if "fp32_mm" in med else None,
            "speedup_vs_best_eager": med[best_eager] / med[n],
            "speedup_vs_cpu": med["cpu"] / med[n] if "cpu" in med else None,
        }
    del keys, values, sketch, signs
    return row


def _cache_flusher(mb: int):
    """A callable that streams ``mb`` MB through the caches (a no-op for 0)."""
    if mb <= 0:
        return lambda: None
    junk = torch.ones(mb << 20, dtype=torch.uint8)
    return (lambda: read_probe(junk)) if probe_built() else (lambda: junk.sum())


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:9.2f}"


def print_table(rows: list[dict], header: bool = True) -> None:
    head = (
        f"{'T':>4} {'m':>8} {'d1':>6} | {'cpu ms':>9} {'torch ms':>9} {'fp16mm ms':>9} {'fp32mm ms':>9} "
        f"{'read ms':>9} {'sum ms':>9} | {'read GB/s':>9} {'cpu GB/s':>8} {'%read':>6} {'x ref':>6} "
        f"{'x fp16mm':>8} {'x best':>7} {'pre ms':>9} {'x cpu':>6} {'1bit ms':>9} {'x cpu':>6} | CPU time: "
        f"{'cpu ms':>7} {'pre ms':>7} {'x cpu':>6} {'1bit ms':>7} {'x cpu':>6} | best eager"
    )
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        med = r["median_s"]
        c = r.get("cpu")
        print(
            f"{r['T']:>4} {r['m']:>8} {r['d1']:>6} | {fmt_ms(med.get('cpu'))} {fmt_ms(med.get('torch'))} "
            f"{fmt_ms(med.get('fp16_mm'))} {fmt_ms(med.get('fp32_mm'))} {fmt_ms(med.get('read'))} "
            f"{fmt_ms(med.get('sum'))} | {r['read_GBps']:9.2f} "
            + (
                f"{c['GBps']:8.2f} {100 * c['frac_of_read_bw']:5.0f}% {c['speedup_vs_eager_ref']:6.1f} "
                f"{c['speedup_vs_fp16_mm']:8.2f} {c['speedup_vs_best_eager']:7.2f}"
                if c
                else " (no cpu backend)"
            )
            + "".join(
                f" {fmt_ms(med[n])} {r[n]['speedup_vs_cpu']:6.2f}" for n in ("prefiltered", "cascade") if n in med
            )
            + (f" | {'':9} {cpu['cpu'] * 1e3:7.2f}" if "cpu" in (cpu := r.get("median_cpu_s", {})) else "")
            + "".join(
                f" {cpu[n] * 1e3:7.2f} {cpu['cpu'] / cpu[n]:6.2f}" for n in ("prefiltered", "cascade") if n in cpu
            )
            + f" | {r['best_eager']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="m = 100k, d1 = 1536 only (T = 1, 8, 128)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds per configuration (median reported)")
    ap.add_argument("--T", type=int, nargs="*", default=[1, 8, 128])
    ap.add_argument("--m", type=int, nargs="*", default=None)
    ap.add_argument("--d1", type=int, nargs="*", default=None)
    ap.add_argument("--gamma", type=float, default=0.5, help="the gate (the pre-filters' pass rates depend on it)")
    ap.add_argument(
        "--cold-mb",
        type=int,
        default=0,
        help="stream this many MB through the caches before every timed call (0: warm, the default)",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/op_table-<time>.json)"
    )
    args = ap.parse_args(argv)
    ms = args.m or ([100_000] if args.quick else [10_000, 100_000, 1_000_000])
    d1s = args.d1 or ([1536] if args.quick else [1536, 4096, 14336])

    ext = extension.load()
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backends": [b for b in neuraldb_kernels.available_backends("cpu") if b != "triton"],
        "cpu_kernels": list(ext.cpu_isas()) if ext is not None else [],
        "env": {k: v for k, v in os.environ.items() if k.startswith("NEURALDB_")},
        "loadavg_before": os.getloadavg(),
        "read_probe": "neuraldb_kernels.probe.read_probe(keys): C++ XOR of every 64-byte line (AVX-512 loads, "
        "prefetch 1 KB ahead), the kernels' threading",
        "quick": args.quick,
        "cold_mb": args.cold_mb,
    }
    print(
        f"# {meta['cpu_model']} | {meta['threads']} threads | torch {meta['torch']} | kernels {meta['cpu_kernels']}"
        f" | load {meta['loadavg_before'][0]:.1f}"
        + (f" | cold: {args.cold_mb} MB read before each call" if args.cold_mb else "")
    )
    rows = []
    avail = mem_available_bytes() or 8 << 30
    for d1 in d1s:
        for m in ms:
            need = m * d1 * 2 + m * D2 * 2
            if need > 0.6 * avail:
                print(f"# skip m={m} d1={d1}: {need / 2**30:.1f} GiB of keys+values, {avail / 2**30:.1f} GiB available")
                continue
            for t in args.T:
                budget = int(0.6 * avail) - need
                rows.append(bench_config(t, m, d1, args.reps, budget - (args.cold_mb << 20), args.gamma, args.cold_mb))
                print_table(rows[-1:], header=len(rows) == 1)
    meta["loadavg_after"] = os.getloadavg()
    print()
    print_table(rows)
    out = args.out or RESULTS / f"op_table-{dt.datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.json"
    write_json(out, {"meta": meta, "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
