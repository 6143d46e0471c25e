"""The patch's eager CPU plan against its general path, alternated in one patched SmolLM2 decode loop.

    python benchmarks/ab_paths.py --m 10000 --pairs 150

An eager CPU forward of a patched model runs a plan bound once per database state: one call into C++, which returns
None where no gate opens, so the hook returns the module's output untouched (``Patch._retrieve``). The general path
(what every eager call took before the plan, and what tracers and other backends still take) resolves the backend,
picks the sketch, checks the tensors and adds a zero residual on every call. Both give the same output; this script
measures what the plan saves inside the model, where the hook runs with caches cold from the weights, using
``ab_builds.paired_steps``: paired whole steps and paired hook spans, with bootstrap 95% intervals of the medians of
the differences (plan minus general). Results: ``benchmarks/results/ab_paths[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as bo  # noqa: E402
import torch  # noqa: E402
from _common import RESULTS, machine_description, write_json  # noqa: E402
from ab_builds import paired_steps, summary  # noqa: E402

import neuraldb  # noqa: E402
from neuraldb import NeuralKVDatabase, architectures as arch, patch_model  # noqa: E402
from neuraldb.patching import Patch  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=10_000, help="facts in the database (random unit keys)")
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--context", type=int, default=128, help="KV-cache length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = bo.load_smollm2("cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    _, module = arch.down_proj_module(model, args.layer)
    db = NeuralKVDatabase(key_dim=module.in_features, value_dim=module.out_features)
    bo.grow(db, args.m, gen)
    scenario = bo.Scenario("decode_b1", model, "cpu", args.context, gen)
    patch_model(model, db, layer=args.layer)
    patch = neuraldb.patch_info(model)

    def plan() -> None:
        patch.__dict__.pop("_retrieve", None)

    def general() -> None:
        patch._retrieve = lambda queries, eager: Patch._retrieve(patch, queries, False)

    try:
        step, hook = paired_steps(scenario, module, {"plan": plan, "general": general}, args.pairs)
    finally:
        plan()

    result = {
        "benchmark": "ab_paths",
        "argv": sys.argv[1:] if argv is None else argv,
        "m": args.m,
        "pairs": args.pairs,
        "machine": machine_description("cpu"),
        "step_ms": {v: statistics.median(ts) * 1e3 for v, ts in step.items()},
        "hook_ms": {v: statistics.median(ts) * 1e3 for v, ts in hook.items()},
        "step_diff": summary([a - b for a, b in zip(step["plan"], step["general"])]),
        "hook_diff": summary([a - b for a, b in zip(hook["plan"], hook["general"])]),
        "raw_s": {"step": step, "hook": hook},
    }
    s, h = result["step_diff"], result["hook_diff"]
    print(f"m = {args.m}, {args.pairs} pairs | step: plan {result['step_ms']['plan']:.2f} ms, general "
          f"{result['step_ms']['general']:.2f} ms, paired {s['median_ms']:+.3f} ms "
          f"({s['ci95_ms'][0]:+.3f} to {s['ci95_ms'][1]:+.3f}) | hook: plan {result['hook_ms']['plan']:.3f} ms, "
          f"general {result['hook_ms']['general']:.3f} ms, paired {h['median_ms']:+.3f} ms "
          f"({h['ci95_ms'][0]:+.3f} to {h['ci95_ms'][1]:+.3f})")
    path = write_json(args.out or RESULTS / f"ab_paths{'_' + args.tag if args.tag else ''}.json", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
