"""Per-token retrieval latency of ``ShardedNeuralKVDatabase`` vs the number of ranks (CPU, gloo), and the projected
figure for a GPU deployment.

Measured, for a fixed total number of facts split over W ranks (W processes, one thread each):

- ``local_ms``: this rank's ``gated_retrieval`` on its shard alone (the key scan);
- ``collective_ms``: the two collectives of one decode token alone (``all_reduce(MAX)`` of 8 bytes and
  ``all_reduce(SUM)`` of one residual row);
- ``shut_ms`` / ``open_ms``: the whole ``retrieve`` for one token whose gate stays shut (one collective) or opens
  (two collectives).

Every number is the median over ``--reps`` rounds (the four cases interleaved, a barrier before each call),
maximum over ranks (the slowest rank sets the pace).

    python benchmarks/bench_sharded.py --facts 4000 40000 --ranks 1 2 4
    python benchmarks/bench_sharded.py --project-only        # the 10M facts / 8 GPUs table, no measurement

Writes ``benchmarks/results/sharded.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import RESULTS, write_json


def project(
    facts: float,
    gpus: int,
    d1: int,
    d2: int,
    bytes_per: int = 2,
    hbm_tb_s: float = 3.35,
    efficiency: float = 0.85,
    collective_us: float = 25.0,
    tensor_parallel: bool = False,
) -> dict:
    """A sizing model: the key scan streams this rank's keys once per decode step (memory-bound below a few
    hundred query rows), then two small collectives (three with tensor-parallel query gathering)."""
    rows = facts / gpus
    key_bytes, value_bytes = rows * d1 * bytes_per, rows * d2 * bytes_per
    scan_ms = key_bytes / (hbm_tb_s * 1e12 * efficiency) * 1e3
    collectives = 0 if gpus == 1 else 3 if tensor_parallel else 2
    per_token_bytes = {
        "all_reduce_max_score_id": 8 if gpus > 1 else 0,
        "all_reduce_sum_residual_if_gate_opens": d2 * bytes_per if gpus > 1 else 0,
        **({"all_gather_query_slices": d1 * bytes_per} if tensor_parallel else {}),
    }
    return {
        "facts": facts,
        "gpus": gpus,
        "d1": d1,
        "d2": d2,
        "dtype_bytes": bytes_per,
        "rows_per_gpu": rows,
        "key_GB_per_gpu": key_bytes / 1e9,
        "value_GB_per_gpu": value_bytes / 1e9,
        "hbm_TB_s": hbm_tb_s,
        "hbm_efficiency": efficiency,
        "scan_ms": scan_ms,
        "collectives": collectives,
        "collective_us_each": collective_us,
        "per_token_ms": scan_ms + collectives * collective_us / 1e3,
        "bytes_per_token": per_token_bytes,
        # Query rows per step above which the scan turns compute-bound: FLOP/s x key bytes / (2 x HBM bytes/s)
        # (H100 dense fp16 ~990 TFLOP/s); below it a batch of decode tokens costs about one token's scan.
        "compute_bound_above_rows": round(990e12 * bytes_per / (2 * hbm_tb_s * 1e12)),
    }


def _worker(rank: int, world: int, init: str, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    import neuraldb
    import torch.distributed as dist

    from neuraldb_kernels import gated_retrieval

    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    d1, d2, n = args["d1"], args["d2"], args["facts"]
    g = torch.Generator().manual_seed(0)
    db = neuraldb.ShardedNeuralKVDatabase(d1, d2)
    for start in range(0, n, 4096):  # the same batches on every rank; each keeps its own rows
        m = min(4096, n - start)
        db.add(torch.randn(m, d1, generator=g), torch.randn(m, d2, generator=g))
    key0 = db.get(0)[0].float()  # an exact stored key: its gate opens
    shut = torch.randn(1, d1, generator=g)
    opened = key0[None]
    reps = args["reps"]
    score = torch.zeros(1, dtype=torch.int64)
    row = torch.zeros(1, d2)

    def collectives():
        dist.all_reduce(score, op=dist.ReduceOp.MAX)
        dist.all_reduce(row)

    cases = {
        "local_ms": lambda: gated_retrieval(shut, db.shard.keys, db.shard.values, 0.5),
        "collective_ms": collectives,
        "shut_ms": lambda: db.retrieve(shut, 0.5),
        "open_ms": lambda: db.retrieve(opened, 0.5),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(reps + 1):  # interleaved, so a change in the machine's load hits every case alike
        for name, fn in cases.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    local, coll, shut_ms, open_ms = (statistics.median(times[n]) * 1e3 for n in cases)
    assert db.retrieve(opened, 0.5)[1].item() == 0
    mine = torch.tensor([local, coll, shut_ms, open_ms], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps(dict(zip(["local_ms", "collective_ms", "shut_ms", "open_ms"], mine.tolist()))))
    dist.destroy_process_group()


def measure(world: int, args: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.start_processes(
            _worker, args=(world, os.path.join(tmp, "store"), args, out), nprocs=world, start_method="spawn"
        )
        return {"ranks": world, "rows_per_rank": -(-args["facts"] // world), **json.loads(Path(out).read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--facts",
        type=int,
        nargs="+",
        default=[4000, 40000],
        help="total facts (one sweep over --ranks each); 4000 x 1536 fp16 stays in this VM's cache",
    )
    p.add_argument("--d1", type=int, default=1536, help="key width (default: SmolLM2-135M's MLP)")
    p.add_argument("--d2", type=int, default=576)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--project-only", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "sharded.json"))
    a = p.parse_args()
    args = {"facts": a.facts, "d1": a.d1, "d2": a.d2, "reps": a.reps, "ranks": a.ranks}
    report: dict = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "config": args,
        "measured": [],
    }
    if not a.project_only:
        for facts, w in [(f, w) for f in a.facts for w in a.ranks]:
            r = {"facts": facts, **measure(w, {**args, "facts": facts})}
            report["measured"].append(r)
            print(
                f"facts={facts:>7}  W={w}  rows/rank={r['rows_per_rank']:>7}  local scan {r['local_ms']:7.3f} ms  collectives "
                f"{r['collective_ms']:6.3f} ms  retrieve: gate shut {r['shut_ms']:7.3f} ms, "
                f"open {r['open_ms']:7.3f} ms",
                flush=True,
            )
        report["load_average_at_end"] = os.getloadavg()
    report["projected"] = [
        project(10e6, 8, 14336, 4096),
        project(10e6, 8, 14336, 4096, tensor_parallel=True),
        project(1e6, 1, 14336, 4096),
        project(10e6, 4, 14336, 4096, hbm_tb_s=4.8),  # H200: 141 GB, 4.8 TB/s
    ]
    for r in report["projected"]:
        print(
            f"projected: {r['facts']:.0e} facts on {r['gpus']} GPU(s) at {r['hbm_TB_s']} TB/s, d1={r['d1']}, "
            f"{r['dtype_bytes']}-byte keys: "
            f"{r['key_GB_per_gpu']:.1f} GB keys + {r['value_GB_per_gpu']:.1f} GB values per GPU, scan "
            f"{r['scan_ms']:.2f} ms + {r['collectives']} x {r['collective_us_each']:.0f} us -> "
            f"{r['per_token_ms']:.2f} ms per decode step"
        )
    write_json(Path(a.out), report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
