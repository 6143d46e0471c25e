"""Host time per call of each layer of the patched path, at sizes where the device work is negligible.

On a GPU an eager decode step is launch-bound: what the patch adds there is mostly Python and launch time, which the
op table (pipelined CUDA-event timing) hides. This script takes the path apart, innermost first, with a tiny database
(``--m`` keys, ``--d1`` wide), each call enqueued back to back and the device synchronised only around the loop:

  kernel              the backend's kernel function itself (Triton's host code, or the C++/CUDA binding)
  op                  ``torch.ops.neuraldb.gated_retrieval`` (custom-op dispatch around the kernel)
  gated_retrieval     the public entry point (argument checks, backend choice, reshapes)
  retrieve_residuals  ``NeuralKVDatabase.retrieve_residuals`` (lock, pre-filter choice)
  patched - plain     a patched ``nn.Linear`` minus the plain one: the forward hook, the outer custom op, the add

    python benchmarks/experiments/host_overhead.py                   # CPU
    python benchmarks/experiments/host_overhead.py --device cuda     # GPU: Triton and CUDA backends
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # siblings, benchmarks/

import torch
from _common import RESULTS, machine_description, sync, write_json


def per_call_us(fn, device: str, calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean wall time per call of ``calls`` back-to-back calls."""
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(samples)[len(samples) // 2]


def layers(backend: str, device: str, m: int, d1: int, d2: int, calls: int) -> dict[str, float]:
    from neuraldb import NeuralKVDatabase, patch_model, unpatch_model

    import neuraldb_kernels
    from neuraldb_kernels import backends, config

    gamma = 0.65
    db = NeuralKVDatabase(d1, d2, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    db.add(torch.randn(m, d1, generator=g, device=device), torch.randn(m, d2, generator=g, device=device))
    db.prefilter = False  # the plain scan on every backend; the CPU pre-filter has its own benchmark
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, 1, d1, generator=g, device=device).to(dtype)
    q2, keys, values = q.reshape(1, d1), db.keys, db.values
    kernel = backends.kernel(backend)
    model = torch.nn.Sequential(torch.nn.Linear(d1, d2, bias=False)).to(device=device, dtype=dtype).eval()

    # The op's schema has no backend: the configuration picks it for the device.
    with config.override(backend=backend):
        op_us = per_call_us(lambda: torch.ops.neuraldb.gated_retrieval(q2, keys, values, gamma), device, calls)
    out = {
        "kernel": per_call_us(lambda: kernel(q2, keys, values, gamma), device, calls),
        "op": op_us,
        "gated_retrieval": per_call_us(
            lambda: neuraldb_kernels.gated_retrieval(q, keys, values, gamma, backend=backend), device, calls
        ),
        "retrieve_residuals": per_call_us(lambda: db.retrieve_residuals(q, gamma, backend=backend), device, calls),
    }
    with torch.inference_mode():
        plain = per_call_us(lambda: model(q), device, calls)
        patch_model(model, db, module=model[0], gamma=gamma, backend=backend)
        patched = per_call_us(lambda: model(q), device, calls)
        unpatch_model(model)
    out["plain_linear"] = plain
    out["patched - plain"] = patched - plain
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--d1", type=int, default=256)
    ap.add_argument("--d2", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from neuraldb_kernels import backends

    names = [b for b in backends.available_backends(args.device) if b != "torch"] + ["torch"]
    rows = {b: layers(b, args.device, args.m, args.d1, args.d2, args.calls) for b in names}
    cols = list(next(iter(rows.values())))
    print(f"host us per call, m={args.m} d1={args.d1} d2={args.d2} on {args.device}")
    print(f"{'backend':10}" + "".join(f"{c:>20}" for c in cols))
    for b, r in rows.items():
        print(f"{b:10}" + "".join(f"{r[c]:20.1f}" for c in cols))
    result = {
        "benchmark": "host_overhead",
        "argv": sys.argv[1:],
        "machine": machine_description(args.device),
        "m": args.m,
        "d1": args.d1,
        "d2": args.d2,
        "us_per_call": rows,
    }
    path = write_json(args.out or RESULTS / f"host_overhead_{args.device}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
