"""Weights in pages mapped from the model file against weights in memory of their own: SmolLM2 loaded twice in one
process, once as ``from_pretrained`` leaves it (file-backed) and once as ``neuraldb.load_model`` returns it (copied),
timed in alternating rounds.

    python benchmarks/bench_loaded_weights.py --threads 1 --batch 8

A batched decode step (``--batch`` sequences of ``--prompt`` tokens, then ``--steps`` greedy steps with the KV cache)
and the prefill; medians over ``--rounds`` rounds. Prints a table; writes JSON (``--out``, default
benchmarks/results/loaded_weights.json) with the machine's description.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]

from _common import machine_description, write_json


def timed(model, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill ms, ms per decode step)."""
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - t
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return 1e3 * prefill, 1e3 * (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=40)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loaded_weights.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import neuraldb
    from neuraldb import models

    own_memory = models._own_memory
    models._own_memory = lambda model: None  # as from_pretrained leaves it
    try:
        mapped, _ = neuraldb.load_model("smollm2")
    finally:
        models._own_memory = own_memory
    copied, _ = neuraldb.load_model("smollm2")
    ids = torch.randint(100, 20000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    timed(mapped, ids, 2), timed(copied, ids, 2)  # warm-up
    got: dict[str, list[tuple[float, float]]] = {"file-backed": [], "copied (load_model)": []}
    for r in range(args.rounds):
        for name, m in (("file-backed", mapped), ("copied (load_model)", copied))[:: 1 if r % 2 == 0 else -1]:
            got[name].append(timed(m, ids, args.steps))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in got.items()}
    print(f"| weights | prefill ms ({args.batch} x {args.prompt}) | decode ms / step (batch {args.batch}) |")
    print("|---|---:|---:|")
    for k, (a, b) in med.items():
        print(f"| {k} | {a:.1f} | {b:.2f} |")
    ratio = med["copied (load_model)"][1] / med["file-backed"][1]
    print(f"decode: copied / file-backed = {ratio:.3f}")
    write_json(args.out, {"machine": machine_description(), "argv": sys.argv[1:], "rounds": got, "median": med,
                          "decode_ratio_copied_over_file_backed": ratio})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
