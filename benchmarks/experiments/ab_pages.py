"""The database's buffers in 2 MB pages (``neuraldb.host_memory``, the default) against the same rows in 4 KB pages,
alternated in one patched SmolLM2 decode loop.

    python benchmarks/experiments/ab_pages.py --m 10000 --pairs 400

A decode step streams the model's weights in 4 KB pages, so when the patched layer scans the database none of its
pages are in the TLB: each 4 KB page read costs a page walk. Here one database is patched in, and before each step its
buffers (keys, values, both sketches) are switched between the storage ``host_memory.empty`` gave them and copies in
``torch.empty`` memory (4 KB pages where nothing advised otherwise), with the patch's eager plan bound to each. Paired
whole steps and paired hook spans (``ab_builds.paired_steps``), bootstrap 95% intervals of the medians of the
differences (2 MB minus 4 KB). Results: ``benchmarks/results/ab_pages[_<tag>].json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # siblings, benchmarks/

import torch
from ab_builds import paired_steps, parser, patched_decode, report
from neuraldb.host_memory import HUGE_PAGE

# The database's row storage (NeuralKVDatabase._storage): swapped under the patch for this experiment only.
_BUFFERS = ("keys_buf", "values_buf", "sketch_buf", "signs_buf")


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__).parse_args(argv)
    scenario, module, db, patch = patched_decode(args)
    scenario.step()  # builds the sketches
    storage = db._storage
    huge = {name: getattr(storage, name) for name in _BUFFERS}
    if any(b.data_ptr() % HUGE_PAGE for b in huge.values() if b.numel() * b.element_size() >= HUGE_PAGE):
        raise SystemExit("the database's buffers are not in host_memory storage: nothing to compare")
    variants = {"2MB": huge, "4KB": {name: torch.empty_like(b).copy_(b) for name, b in huge.items()}}
    states = {}
    for v, bufs in variants.items():
        with db.lock:
            storage.__dict__.update(bufs)
            storage.cached_views = ()
            token, plan = db.eager_plan(patch.gamma, 1)
            states[v] = (token, plan.residuals)  # the state token it is valid for, the bound op

    def use(v: str):
        def activate() -> None:
            storage.__dict__.update(variants[v])
            storage.cached_views = states[v][0]
            patch._fast = states[v]

        return activate

    try:
        step, hook = paired_steps(scenario, module, {v: use(v) for v in variants}, args.pairs)
    finally:
        use("2MB")()
    return report("ab_pages", argv, args, step, hook, {"hugepages": _thp_setting()})


def _thp_setting() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.read_text().strip() if path.exists() else None


if __name__ == "__main__":
    main()
