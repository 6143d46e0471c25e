"""Two builds of the CPU kernel in one patched SmolLM2 decode loop: what a kernel change is worth inside the model.

    cp neuraldb_kernels/_C*.so /tmp/C_before.so       # before the change; then rebuild, then:
    python benchmarks/experiments/ab_builds.py --baseline /tmp/C_before.so --m 10000 --pairs 150

Runs on this VM differ by more than a small kernel change (the unpatched SmolLM2 step has read 56 to 83 ms on this VM
within a day), so two ``bench_overhead.py`` runs cannot compare builds. Here both builds are loaded into one process
and a decode step (batch 1, the cascade's path) alternates between them: per pair and build (order alternating), three
steps in a row, one untimed, one timed and one under the hook timer of ``bench_overhead.time_patch_hook``, so that
each timed step follows one of its own build. Reported: the median of the paired differences (this build minus the
baseline) of the whole step and of the patch's hook, with bootstrap 95% intervals of those medians. The hook's
difference resolves what the step's cannot; the step's says whether anything outside the hook moved. Results:
``benchmarks/results/ab_builds[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # siblings, benchmarks/

import bench_overhead as bo
import neuraldb
import torch
from _common import RESULTS, machine_description, write_json
from neuraldb import NeuralKVDatabase, patch_model
from neuraldb import architectures as arch

from neuraldb_kernels import extension

# The entry a patched CPU decode step reaches. The patch binds it once per database state
# (neuraldb_kernels.op.bind_cpu_residuals), so switching builds also swaps the patch's bound plan. Builds from before
# this entry existed cannot be compared.
_OP = "gated_residuals_cpu"


def load_baseline(path: Path):
    """The extension module at ``path`` (a ``_C*.so`` copied from another build), beside the installed one."""
    spec = importlib.util.spec_from_file_location("neuraldb_baseline._C", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: cannot load an extension module from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def median_interval(xs: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds)]


def summary(diffs_s: list[float]) -> dict:
    lo, hi = median_interval(diffs_s)
    return {"median_ms": statistics.median(diffs_s) * 1e3, "ci95_ms": [lo * 1e3, hi * 1e3]}


def paired_steps(
    scenario, module: torch.nn.Module, variants: dict[str, Callable[[], None]], pairs: int, warmup: int = 3
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Decode steps of ``scenario`` alternating between two ``variants`` (each a function that switches the model to
    it): per pair and variant (order alternating), three steps in a row: one untimed, one timed, one under the hook
    timer on ``module``. The timed ones thus follow a step of their own variant, as in a model served with it: what a
    step leaves in the caches is charged to its own variant, not to the other. Returns the step and hook wall times
    (seconds) per variant, index-aligned by pair."""
    step: dict[str, list[float]] = {v: [] for v in variants}
    hook: dict[str, list[float]] = {v: [] for v in variants}
    for activate in variants.values():  # warm-up: builds the key sketches, touches both variants' code
        activate()
        for _ in range(warmup):
            scenario.step()
    for r in range(pairs):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            variants[v]()
            scenario.step()
            t0 = time.perf_counter()
            scenario.step()
            step[v].append(time.perf_counter() - t0)
            sink: list[tuple[float, float]] = []
            handles = bo.time_patch_hook(module, sink)
            scenario.step()
            for h in handles:
                h.remove()
            hook[v].append(sink[-1][0])
    return step, hook


def parser(doc: str) -> argparse.ArgumentParser:
    """The options of a paired decode-loop comparison (this script's and ``ab_paths.py``'s)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=10_000, help="facts in the database (random unit keys)")
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--context", type=int, default=128, help="KV-cache length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    return ap


def patched_decode(args: argparse.Namespace):
    """``(scenario, module, db, patch)``: SmolLM2 patched at ``args.layer`` with ``args.m`` random facts, decoding
    one token at a time on a KV cache of ``args.context`` tokens."""
    torch.set_num_threads(args.threads)
    model = bo.load_smollm2("cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    _, module = arch.down_proj_module(model, args.layer)
    db = NeuralKVDatabase(key_dim=module.in_features, value_dim=module.out_features)
    bo.grow(db, args.m, gen)
    scenario = bo.Scenario("decode_b1", model, "cpu", args.context, gen)
    patch_model(model, db, layer=args.layer)
    return scenario, module, db, neuraldb.patch_info(model)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--baseline", type=Path, required=True, help="a _C*.so of the build to compare against")
    args = ap.parse_args(argv)
    ext = extension.load()
    if ext is None:
        raise SystemExit("the installed neuraldb_kernels._C could not be loaded")
    fns = {"this": getattr(ext, _OP), "baseline": getattr(load_baseline(args.baseline), _OP)}
    scenario, module, db, patch = patched_decode(args)
    scenario.step()  # builds the key sketches
    plans = {}
    for v, fn in fns.items():
        setattr(ext, _OP, fn)
        with db.lock:
            token, plan = db.eager_plan(patch.gamma, 1)  # binds the kernel function set just above
            plans[v] = (token, plan.residuals)

    def use(v: str):
        def activate() -> None:
            setattr(ext, _OP, fns[v])
            patch._fast = plans[v]

        return activate

    try:
        step, hook = paired_steps(scenario, module, {v: use(v) for v in fns}, args.pairs)
    finally:
        setattr(ext, _OP, fns["this"])

    return report("ab_builds", argv, args, step, hook, {"baseline": str(args.baseline)})


def report(
    name: str,
    argv: list[str] | None,
    args: argparse.Namespace,
    step: dict[str, list[float]],
    hook: dict[str, list[float]],
    extra: dict,
) -> dict:
    """Print and save (``benchmarks/results/<name>[_<tag>].json``, or ``args.out``) the paired comparison of
    :func:`paired_steps`' two variants: the first named minus the second."""
    a, b = list(step)
    result = {
        "benchmark": name,
        "argv": sys.argv[1:] if argv is None else argv,
        **extra,
        "m": args.m,
        "pairs": args.pairs,
        "machine": machine_description("cpu"),
        "step_ms": {v: statistics.median(ts) * 1e3 for v, ts in step.items()},
        "hook_ms": {v: statistics.median(ts) * 1e3 for v, ts in hook.items()},
        "step_diff": summary([x - y for x, y in zip(step[a], step[b])]),
        "hook_diff": summary([x - y for x, y in zip(hook[a], hook[b])]),
        "raw_s": {"step": step, "hook": hook},
    }
    s, h = result["step_diff"], result["hook_diff"]
    print(
        f"m = {args.m}, {args.pairs} pairs | step: {a} {result['step_ms'][a]:.2f} ms, {b} "
        f"{result['step_ms'][b]:.2f} ms, paired {s['median_ms']:+.3f} ms "
        f"({s['ci95_ms'][0]:+.3f} to {s['ci95_ms'][1]:+.3f}) | hook: {a} {result['hook_ms'][a]:.3f} ms, "
        f"{b} {result['hook_ms'][b]:.3f} ms, paired {h['median_ms']:+.3f} ms "
        f"({h['ci95_ms'][0]:+.3f} to {h['ci95_ms'][1]:+.3f})"
    )
    path = write_json(args.out or RESULTS / f"{name}{'_' + args.tag if args.tag else ''}.json", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
