"""Draw a ``bench_overhead.py`` result: added latency against the database size, and the added time against the
key-read floor. Prints the result's tables too.

    python benchmarks/plot.py benchmarks/results/overhead_smollm2_cpu.json          # writes overhead_smollm2_cpu.png
    python benchmarks/plot.py RESULT.json --out figure.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import GRAPH_SCENARIOS, SCENARIOS, _fmt_m, _label, tables


def where(machine: dict) -> str:
    """The device a result ran on: the GPU's name, or the CPU's with its kernels' ISAs and torch threads."""
    if machine.get("gpu"):
        return machine["gpu"]
    isas = f" ({', '.join(machine['cpu_isas'])})" if machine.get("cpu_isas") else ""
    return f"{machine['cpu']}{isas}, {machine['torch_threads']} threads"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    scen = list(dict.fromkeys(_label(r, rows) for s in SCENARIOS + GRAPH_SCENARIOS for r in rows if r["scenario"] == s))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    floor: list = []
    for s in scen:
        rs = sorted((r for r in rows if _label(r, rows) == s), key=lambda r: r["m"])
        cpu = all(r.get("cpu_added_pct") is not None for r in rs)
        key, ms_key, floor_key = (
            ("cpu_added_pct", "cpu_added_ms", "cpu_floor_ms") if cpu else ("added_pct", "added_ms", "floor_ms")
        )
        a.plot([r["m"] for r in rs], [r[key] for r in rs], marker="o", label=s)
        rs = [r for r in rs if r["m"] > 0]
        b.plot([r["m"] for r in rs], [max(r[ms_key], 1e-3) for r in rs], marker="o", label=f"{s} added")
        floor = sorted({(r["m"], r[floor_key]) for r in rs if r.get(floor_key)})
    if floor:
        b.plot([x for x, _ in floor], [y for _, y in floor], ls="--", color="black", lw=1, label="key-read floor")
    # symlog, not log: the x axis holds m = 0 (the unpatched baseline) and added latency can be below zero (noise)
    a.set_xscale("symlog", linthresh=1000)
    ticks = sorted({r["m"] for r in rows})
    a.set_xticks(ticks, [_fmt_m(m) for m in ticks], fontsize=8)
    a.set_yscale("symlog", linthresh=1)
    a.axhline(1.0, color="grey", lw=0.8, ls=":")
    a.set_xlabel("facts in the database (m)")
    cpu_time = all(r.get("cpu_added_pct") is not None for r in rows)
    a.set_ylabel("added latency (%)" + (", process CPU time" if cpu_time else ""))
    a.set_title("patched vs unpatched forward")
    a.legend(fontsize=8)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("facts in the database (m)")
    b.set_ylabel("added time per forward (ms)")
    b.set_title("added time vs key-read floor (dashed)")
    b.legend(fontsize=7)
    mach = result["machine"]
    load = mach.get("load_average_1_5_15")
    fig.suptitle(f"{result['model']} ({result['dtype']}), {where(mach)}; load {load}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="a bench_overhead.py JSON result")
    ap.add_argument("--out", type=Path, default=None, help="the figure (default: the result's name, .png)")
    args = ap.parse_args(argv)
    result = json.loads(args.result.read_text())
    out = args.out or args.result.with_suffix(".png")
    print(tables(result))
    plot(result, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
