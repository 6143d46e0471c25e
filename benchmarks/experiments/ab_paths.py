"""The patch's eager CPU plan against its general path, alternated in one patched SmolLM2 decode loop.

    python benchmarks/experiments/ab_paths.py --m 10000 --pairs 150

An eager CPU forward of a patched model runs a plan bound once per database state: one call into C++, which returns
None where no gate opens, so the hook returns the module's output untouched (``Patch._retrieve``). The general path
(what every eager call took before the plan, and what tracers and other backends still take) resolves the backend,
picks the sketch, checks the tensors and adds a zero residual on every call. Both give the same output; this script
measures what the plan saves inside the model, where the hook runs with caches cold from the weights, using
``ab_builds.paired_steps``: paired whole steps and paired hook spans, with bootstrap 95% intervals of the medians of
the differences (plan minus general). Results: ``benchmarks/results/ab_paths[_<tag>].json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # siblings, benchmarks/

from ab_builds import paired_steps, parser, patched_decode, report
from neuraldb.patching import Patch


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    scenario, module, _, patch = patched_decode(args)

    def plan() -> None:
        patch.__dict__.pop("_retrieve", None)

    def general() -> None:
        patch._retrieve = lambda queries, eager: Patch._retrieve(patch, queries, False)

    try:
        step, hook = paired_steps(scenario, module, {"plan": plan, "general": general}, args.pairs)
    finally:
        plan()

    return report("ab_paths", argv, args, step, hook, {})


if __name__ == "__main__":
    main()
