"""Times every Triton scan config the autotuner may pick, plus extra candidates, at one or more GPU shapes; shows
which one the autotuner chose and checks each config's argmax against the reference. Used to choose the config
lists in ``neuraldb_kernels.triton_kernel``; writes JSON under benchmarks/results/.

    python benchmarks/experiments/triton_config_sweep.py --T 2048 512 --m 100000 --d1 14336
    python benchmarks/experiments/triton_config_sweep.py --T 2048 --extra 128,256,64,8,3 128,128,128,8,3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # siblings, benchmarks/

import torch
from _common import RESULTS, write_json
from gpu_op_table import build_db, nominal_peak, time_cuda


def parse_config(text: str) -> tuple[int, ...]:
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"a config is BLOCK_T,BLOCK_N,BLOCK_D,num_warps,num_stages; got {text!r}")
    return parts


def sweep(t: int, keys: torch.Tensor, values: torch.Tensor, extra: list[tuple[int, ...]], gamma: float) -> dict:
    import neuraldb_kernels
    from neuraldb_kernels import triton_kernel as tk
    from neuraldb_kernels.reference import gated_retrieval_reference

    m, d1 = keys.shape
    g = torch.Generator(device="cuda").manual_seed(t)
    pick = torch.randint(0, m, (t,), device="cuda", generator=g)
    q = (3 * (keys[pick].float() + 0.5 * torch.randn(t, d1, device="cuda", generator=g) / d1**0.5)).half()
    want = gated_retrieval_reference(q, keys, values, gamma)[1]
    kind = tk._kind(t)
    consts = {"T_BUCKET": tk.t_bucket(t), "SPLIT_Q": tk._split_q(q.dtype, keys.dtype), "IEEE": False}
    configs = tk._prune(tk._CONFIGS[kind], {}, **consts)
    candidates = [
        (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) for c in configs
    ]
    candidates += [c for c in extra if c not in candidates]

    auto_ms = time_cuda(lambda: neuraldb_kernels.gated_retrieval(q, keys, values, gamma, backend="triton"))
    best = tk._tuned_scan(kind).best_config
    rows = []
    for bt, bn, bd, w, s in candidates:
        cfg = {"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_D": bd, "num_warps": w, "num_stages": s}
        row = {"config": [bt, bn, bd, w, s], "listed": (bt, bn, bd, w, s) not in extra}
        try:
            agree = (tk.gated_retrieval_triton(q, keys, values, gamma, config=cfg)[1] == want).float().mean().item()
            ms = time_cuda(lambda cfg=cfg: tk.gated_retrieval_triton(q, keys, values, gamma, config=cfg))
            row.update(ms=ms, tflops=2 * t * m * d1 / ms / 1e9, idx_agree=agree)
        except Exception as exc:
            row["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(t, row, flush=True)
    return {
        "t": t,
        "m": m,
        "d1": d1,
        "auto_ms": auto_ms,
        "auto_tflops": 2 * t * m * d1 / auto_ms / 1e9,
        "autotuned": str(best),
        "configs": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[2048])
    ap.add_argument("--m", type=int, default=100_000)
    ap.add_argument("--d1", type=int, default=14_336)
    ap.add_argument("--gamma", type=float, default=0.65)
    ap.add_argument("--extra", type=parse_config, nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sweep", file=sys.stderr)
        return 2
    keys, values = build_db(args.m, args.d1, 64)
    name = torch.cuda.get_device_name()
    result = {
        "device": name,
        "torch": torch.__version__,
        "nominal_fp16_tflops": nominal_peak(name),
        "shapes": [sweep(t, keys, values, args.extra, args.gamma) for t in args.T],
    }
    for shape in result["shapes"]:
        print(
            f"\nT={shape['t']} m={shape['m']} d1={shape['d1']}: autotuned {shape['autotuned']} "
            f"{shape['auto_ms']:.3f} ms ({shape['auto_tflops']:.0f} TFLOP/s)"
        )
        for r in sorted(shape["configs"], key=lambda r: r.get("ms", float("inf"))):
            tail = (
                f"{r['ms']:8.3f} ms {r['tflops']:6.0f} TFLOP/s agree {r['idx_agree']:.3f}" if "ms" in r else r["failed"]
            )
            print(f"  {r['config']!s:24} {'listed' if r['listed'] else 'extra ':6} {tail}")
    stamp = name.replace(" ", "_")
    path = write_json(args.out or RESULTS / f"triton_config_sweep_{stamp}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
