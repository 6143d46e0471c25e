"""How the scan's split of the keys into programs (Triton) or blocks (CUDA) sets its device time at decode sizes: the
op replayed in a CUDA graph (no host time, as a serving engine runs it) for several split counts, beside the plan's
own choice, the plan before key-byte minimums (64-key splits at any width), the CUDA kernel and a plain read of the
keys in the same kind of graph. Used to choose ``_MIN_SPLIT_BYTES`` / ``kMinSplitBytes``; writes JSON under
benchmarks/results/.

    python benchmarks/experiments/split_sweep.py                                     # Llama-3-8B's d1, T = 1 and 8, 2k-100k keys
    python benchmarks/experiments/split_sweep.py --T 1 --m 10000 --d1 4096 --splits 132 264 528
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # siblings, benchmarks/

import torch
from _common import RESULTS, machine_description, median, read_bandwidth, write_json
from gpu_op_table import build_db

# The plan before 2026-11-27: every split at least 64 keys, whatever their width.
_OLD_MIN_KEYS = 64


def old_plan_splits(t: int, m: int, sms: int) -> int:
    """The split count ``plan_splits`` chose before its minimum went by key bytes."""
    from neuraldb_kernels import triton_kernel as tk

    rows_per_block = 1 if t == 1 else 16 if t <= 16 else 128
    want = -(-(tk._WAVES * sms) // -(-t // rows_per_block))
    splits = max(1, min(want, -(-m // _OLD_MIN_KEYS), tk._MAX_SPLITS))
    per_split = -(-m // splits)  # ceil(m / splits), rounded up to a multiple of _SPLIT_ROUND below
    per = -(-per_split // tk._SPLIT_ROUND) * tk._SPLIT_ROUND
    return -(-m // per)


def candidates(t: int, m: int, sms: int, key_bytes: int, extra: list[int]) -> dict[str, int]:
    """Label -> split count: the plan, the old plan, 1-6 programs per SM and ``extra``; none with under 8 keys."""
    from neuraldb_kernels.triton_kernel import plan_splits

    out = {"plan": plan_splits(t, m, sms, key_bytes)[0], "old plan": old_plan_splits(t, m, sms)}
    for n in [sms * w for w in (1, 2, 3, 4, 6)] + list(extra):
        if n <= max(1, m // 8):
            out.setdefault(f"{n} splits", n)
    return out


def graph_ms(fn, calls: int = 20, reps: int = 15) -> float:
    """Device milliseconds of one ``fn()``: ``calls`` of them captured in one CUDA graph, the replays timed with
    events (median over ``reps``). ``fn`` runs once before the capture (Triton autotunes there)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return median(times)


def sweep(t: int, m: int, d1: int, d2: int, extra: list[int], gamma: float, cuda_kernel: bool) -> list[dict]:
    from neuraldb_kernels import gated_retrieval
    from neuraldb_kernels.triton_kernel import gated_retrieval_triton

    keys, values = build_db(m, d1, d2)
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(t, d1, device="cuda", generator=g).half()  # random: the gate stays closed, as for most tokens
    raw = keys.reshape(-1).view(torch.int64)
    probe_ms = graph_ms(lambda: raw.sum())
    eager_floor_ms = 1e3 * keys.numel() * keys.element_size() / read_bandwidth(keys)["bytes_per_s"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    runs = {
        label: (n, lambda n=n: gated_retrieval_triton(q, keys, values, gamma, num_splits=n))
        for label, n in candidates(t, m, sms, d1 * keys.element_size(), extra).items()
    }
    if cuda_kernel:
        runs["cuda kernel"] = (None, lambda: gated_retrieval(q, keys, values, gamma, backend="cuda"))
    for label, (n, fn) in runs.items():
        ms = graph_ms(fn)
        rows.append(
            {
                "t": t,
                "m": m,
                "d1": d1,
                "variant": label,
                "splits": n,
                "ms": ms,
                "graph_probe_ms": probe_ms,
                "over_graph_probe": ms / probe_ms,
                "eager_floor_ms": eager_floor_ms,
                "over_eager_floor": ms / eager_floor_ms,
            }
        )
        print(
            f"T={t:<2} m={m:<7} {label:12} splits={n if n is not None else '-':>5} {ms:8.4f} ms  "
            f"{ms / probe_ms:5.2f}x graph probe ({probe_ms:.4f} ms)  {ms / eager_floor_ms:5.2f}x eager floor "
            f"({eager_floor_ms:.4f} ms)",
            flush=True,
        )
    keys = values = None  # frees the keys before the next shape; the closures above have run
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--m", type=int, nargs="+", default=[2000, 10_000, 20_000, 100_000])
    ap.add_argument("--d1", type=int, default=14_336)
    ap.add_argument("--d2", type=int, default=4096)
    ap.add_argument("--gamma", type=float, default=0.65)
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="more split counts to try")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sweep", file=sys.stderr)
        return 2
    from neuraldb_kernels import extension

    ext = extension.load()
    cuda_kernel = ext is not None and hasattr(ext, "gated_retrieval_cuda")
    rows = [
        r for t in args.T for m in args.m for r in sweep(t, m, args.d1, args.d2, args.splits, args.gamma, cuda_kernel)
    ]
    best = {}
    for r in rows:
        if r["splits"] is not None and r["ms"] < best.get((r["t"], r["m"]), {"ms": math.inf})["ms"]:
            best[(r["t"], r["m"])] = r
    for (t, m), r in best.items():
        print(f"T={t} m={m}: fastest Triton split {r['splits']} ({r['ms']:.4f} ms)")
    name = torch.cuda.get_device_name().replace(" ", "_")
    path = write_json(
        args.out or RESULTS / f"split_sweep_{name}.json", {"machine": machine_description("cuda"), "rows": rows}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
