"""Latency overhead of a patched model (the paper's Table 1): patched vs unpatched forward, same run, interleaved.

    python benchmarks/bench_overhead.py --threads 1                       # SmolLM2-135M, CPU, m = 0 .. 1M, all
    python benchmarks/bench_overhead.py --m 0,10000,100000 --scenarios decode_b1 --reps 60
    python benchmarks/bench_overhead.py --threads 1 --m 0,10000,100000 --scenarios decode_b1 --prefilter all
    python benchmarks/bench_overhead.py --model llama3-8b-shape --device cuda          # GPU session: 8B shapes, fp16
    python benchmarks/bench_overhead.py --model llama3-8b-shape --device cuda --scenarios decode_b1,decode_b8 \\
        --backend triton,cuda,auto                                                     # the backends, paired
    python benchmarks/bench_overhead.py --model llama3-8b-shape --device cuda --scenarios graph_b1,graph_b8 \\
        --m 0,2000,10000,20000,100000,1000000                                         # decode in CUDA graphs
    python benchmarks/bench_overhead.py --model llama3-8b-shape --layers 1 --vocab 512 --device cpu \\
        --dtype float32 --m 0,2000 --reps 2 --tag smoke                                # CPU smoke of the 8B path

Scenarios: ``prefill_128`` / ``prefill_512`` (one sequence, the cache built, only the last position's logits, as in
``generate``), ``decode_b1`` / ``decode_b8`` (one new token per sequence on a KV cache of ``--context`` tokens; the
cache is cropped back after every step), and on CUDA ``graph_b1`` / ``graph_b8`` (the decode step captured in a
CUDA graph on a static cache and replayed, one graph per patched variant: no host time, only the kernels'; named
explicitly, not in the default list). For each database size m (random unit keys of the patched layer's key
dimension, random residuals, added through ``NeuralKVDatabase.add``), every repetition runs the unpatched and the
patched forward twice each, back to back, in alternating order, and times the second of each two (the patch removed
and put back between states, outside the timed region; each variant's patch is built once, so its one-off
first-forward work is not timed): load from other processes hits both alike, and each timed forward finds the
caches as a model served in its state leaves them. Reported per (scenario, m):

- ``added_pct``: median of the per-repetition differences (patched - unpatched) over the unpatched median;
- ``op_ms``: the op alone on the same number of queries (what the kernel costs, without the model around it);
- ``hook_ms``: the patch's forward hook timed inside patched forwards (median per forward; as many forwards as
  repetitions, run after the pairs so that the timers do not count in ``added_pct``): the op where it runs
  in the model, with the caches as the model leaves them, plus the hook's own host time and the add. It does not
  difference two forwards, so it resolves what ``added_pct`` cannot on a noisy machine; it misses only what the op
  does to the rest of the forward (caches it evicts). On a GPU it is host time (no synchronisation inside), the part
  a launch-bound decode step adds; ``hook_pct`` = hook_ms over the unpatched median;
- ``floor_ms``: key bytes / read bandwidth measured in the same run on the database's own key buffer (the least time
  any exact scan of the keys can take), and ``added_over_floor`` = added time / floor.

``--prefilter both`` times the patched forward with and without the database's key sketches (which serve decode
steps of one query row on CPU, see ``NeuralKVDatabase.retrieve_residuals``) in the same repetitions, next to the
unpatched one; ``--prefilter all`` adds the int4 sketch alone (without the 1-bit first stage). The op alone is then
``retrieve_residuals`` with that setting. (Results before the 1-bit stage call the int4 variant "prefilter".)
Likewise ``--backend a,b`` times one patched variant per backend in the same repetitions (label "<sketch> <backend>";
off the CPU the sketch is always "plain").

Random keys never open the gate (max cosine ~0.1 << gamma), so the residual gather is skipped; that is the common
case at inference time, where most tokens match no fact. Results: ``benchmarks/results/overhead_<model>_<device>[_<tag>]
.json`` (with the machine description and the load average before/after); ``benchmarks/plot.py`` draws one.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import neuraldb
import torch
from _common import (
    RESULTS,
    load_average,
    machine_description,
    median,
    read_bandwidth,
    timed_both,
    write_json,
)
from neuraldb import NeuralKVDatabase, patch_model, patching, unpatch_model
from neuraldb import architectures as arch
from neuraldb.patching import Patch
from overhead_scenarios import (
    GRAPH_SCENARIOS,
    SCENARIOS,
    Scenario,
    capture_graph,
    grow,
    llama3_8b_shape,
    load_smollm2,
)

import neuraldb_kernels

# --prefilter: the patched variants timed against the unpatched forward in the same repetitions.
_VARIANTS = {
    "on": ("1bit+int4",),
    "off": ("plain",),
    "both": ("plain", "1bit+int4"),
    "all": ("plain", "int4", "1bit+int4"),
    # the default cascade with and without per-row gate thresholds (0.99 on every row: tested where a gate opens)
    "thresholds": ("1bit+int4", "1bit+int4+thr"),
    # the default cascade without and with the subject gate (random previous-token keys: a decode step checks none)
    "subject-gate": ("1bit+int4", "1bit+int4+subject"),
}
_SUBJECT_GATE = {"rho": 0.3, "window": 0, "offset": -1}
DEFAULT_M = (0, 2_000, 10_000, 20_000, 100_000, 1_000_000)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _use_sketch(db, variant: str) -> None:
    """Route the database's decode steps to the cascade ("1bit+int4", the default), the int4 sketch alone ("int4")
    or the plain scan ("plain"). ``db.prefilter = False`` would free the sketches, so each pre-filtered repetition
    after a plain one would rebuild them inside the timed forward; a key threshold no database reaches selects the
    plain scan and keeps them."""
    min_keys = sys.maxsize if variant == "plain" else neuraldb_kernels.DEFAULT_POLICY.min_keys
    signs = variant.startswith("1bit+int4")
    db.prefilter_policy = dataclasses.replace(db.prefilter_policy, min_keys=min_keys, signs=signs)
    want = 0.99 if variant.endswith("+thr") else -1.0
    if len(db) and float(db.thresholds[0]) != want:
        db.set_thresholds(db.ids(), want)
    gate = _SUBJECT_GATE if variant.endswith("+subject") else None
    if gate is not None and db.relation_keys is None and len(db):
        g = torch.Generator().manual_seed(0)
        db.update(db.ids(), relation_keys=torch.randn(len(db), db.key_dim, generator=g).to(db.device))
    if db.relation_gate != gate:
        db.relation_gate = gate


def variant_label(sketch: str, backend: str | None, several_backends: bool) -> str:
    """A patched variant's name: its sketch setting, and its backend where a run compares several."""
    return f"{sketch} {backend or 'auto'}" if several_backends else sketch


def measure(
    model,
    db,
    scenario: Scenario,
    layer: int,
    reps: int,
    warmup: int,
    device: str,
    gamma: float,
    variants: dict[str, tuple[str, str | None]],
) -> list[dict]:
    """Interleaved repetitions of one scenario at the database's current size: unpatched and one patched forward per
    variant, in rotating order. ``variants`` maps a label to (sketch setting, backend): "1bit+int4" is the database's
    default, the key sketches where they apply, built by the warm-up; "int4" the int4 sketch alone; "plain" the plain
    scan. One row per variant, each against the unpatched forwards of the same repetitions."""
    states = ("unpatched", *variants)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in states}
    hooks: dict[str, list[tuple[float, float]]] = {s: [] for s in variants}
    path, module = arch.down_proj_module(model, layer)

    # One patch per variant, built once and put back for each of its forwards: a patch built anew every repetition
    # would pay its first forward's one-off work (resolving the backend, binding the eager plan; ~0.1 ms at 10k on
    # this CPU) in every timed step, which a served model pays once.
    patches: dict[str, Patch] = {}

    def patch(label: str) -> None:
        sketch, backend = variants[label]
        _use_sketch(db, sketch)
        if neuraldb.patch_info(model) is not None:
            unpatch_model(model)
        if label in patches:
            patching._install(model, module, patches[label])
        else:
            patch_model(model, db, module=path, gamma=gamma, backend=backend)
            patches[label] = neuraldb.patch_info(model)

    def set_state(state: str) -> None:
        if state == "unpatched":
            if neuraldb.patch_info(model) is not None:
                unpatch_model(model)
        else:
            patch(state)

    # A captured scenario replays one graph per state, captured under that state's patch and this database; nothing
    # in a replay reads the patch state again, which run() still sets so that both kinds of scenario do the same.
    graphs = {}
    if scenario.captured:
        for s in states:
            set_state(s)
            graphs[s] = capture_graph(scenario.step)

    def run(state: str) -> tuple[float, float]:
        set_state(state)
        return timed_both(graphs[state].replay if graphs else scenario.step, device)

    for _ in range(warmup):
        for s in states:
            run(s)
    # Each timed forward comes right after an untimed one in the same state, so it finds the caches as a model served
    # in that state leaves them. Timed right after the other state, every patched forward would follow an unpatched one
    # and vice versa: the cost a patched forward leaves to the next (the weights its scan evicted; at 1M facts the
    # unpatched step read 2.5x its time) would land on the unpatched side and be subtracted instead of added.
    n = len(states)
    for r in range(reps):
        order = states[r % n :] + states[: r % n]
        order = order if (r // n) % 2 == 0 else order[::-1]  # rotated, and reversed every other round
        for s in order:
            run(s)
            times[s].append(run(s))
    graphs.clear()  # their memory pools, before the database grows
    # The hook is timed in forwards of its own, so the timers' cost stays out of the paired differences. A replayed
    # graph runs no hook.
    for v in variants if not scenario.captured else ():
        patch(v)
        handles = time_patch_hook(module, hooks[v])
        for _ in range(reps):
            scenario.step()
        for h in handles:
            h.remove()
    if neuraldb.patch_info(model) is not None:
        unpatch_model(model)
    _use_sketch(db, "1bit+int4")
    qdtype = next(model.parameters()).dtype
    rows = [
        _row(scenario, db, reps, device, qdtype, gamma, *variants[v], times["unpatched"], times[v], v) for v in variants
    ]
    for row, v in zip(rows, variants):
        if scenario.captured:
            row.update(hook_ms=None, hook_pct=None, cpu_hook_ms=None, cpu_hook_pct=None, hook_ms_all=[])
            continue
        cpu = row["cpu_added_ms"] is not None
        row["hook_ms"] = median([w for w, _ in hooks[v]]) * 1e3
        row["hook_pct"] = 100 * row["hook_ms"] / row["unpatched_ms"]
        row["cpu_hook_ms"] = median([c for _, c in hooks[v]]) * 1e3 if cpu else None
        row["cpu_hook_pct"] = 100 * row["cpu_hook_ms"] / row["cpu_unpatched_ms"] if cpu else None
        row["hook_ms_all"] = [round(w * 1e3, 4) for w, _ in hooks[v]]
    return rows


def time_patch_hook(module: torch.nn.Module, sink: list[tuple[float, float]]) -> list:
    """Hooks around the patch's forward hook on ``module`` (one first, one last) that append its (wall, process CPU)
    seconds per call to ``sink``; returns their handles. Wall time has no device synchronisation in it."""
    start: list[tuple[float, float]] = []

    def before(mod, args, output):
        start.append((time.perf_counter(), time.process_time()))

    def after(mod, args, output):
        w0, c0 = start.pop()
        sink.append((time.perf_counter() - w0, time.process_time() - c0))

    return [module.register_forward_hook(before, prepend=True), module.register_forward_hook(after)]


def _row(
    scenario: Scenario,
    db,
    reps: int,
    device: str,
    qdtype: torch.dtype,
    gamma: float,
    sketch: str,
    backend: str | None,
    base: list,
    pat: list,
    variant: str,
) -> dict:
    unpatched, patched = [w for w, _ in base], [w for w, _ in pat]
    diffs = [p - u for u, p in zip(unpatched, patched)]
    cpu_u = [c for _, c in base]
    cpu_d = [p - u for (_, u), (_, p) in zip(base, pat)]
    # The op alone on as many queries as the layer sends it (the hidden activation's dtype and width), through the
    # database method the patch calls, with this variant's setting.
    q = torch.randn(scenario.queries, db.key_dim, device=device, dtype=qdtype)
    op_reps = max(3, min(reps, 20))
    _use_sketch(db, sketch)
    db.retrieve_residuals(q, gamma, backend=backend)
    op = [timed_both(lambda: db.retrieve_residuals(q, gamma, backend=backend), device) for _ in range(op_reps)]
    _use_sketch(db, "1bit+int4")
    u, p, d = median(unpatched), median(patched), median(diffs)
    cu, cd = median(cpu_u), median(cpu_d)
    cpu = torch.device(device).type == "cpu"
    return {
        "scenario": scenario.name,
        "variant": variant,
        "backend": backend,
        "sketch_bytes": 0 if db.sketch is None else db.sketch.numel(),
        "sign_bytes": 0 if db.signs is None else db.signs.numel(),
        "queries": scenario.queries,
        "reps": reps,
        "unpatched_ms": u * 1e3,
        "patched_ms": p * 1e3,
        "added_ms": d * 1e3,
        "added_pct": 100 * d / u,
        "added_pct_of_medians": 100 * (p / u - 1),
        "op_ms": median([w for w, _ in op]) * 1e3,
        # CPU time (process): immune to other jobs' time slices; meaningful on the CPU with one torch thread.
        "cpu_unpatched_ms": cu * 1e3 if cpu else None,
        "cpu_added_ms": cd * 1e3 if cpu else None,
        "cpu_added_pct": 100 * cd / cu if cpu else None,
        "cpu_op_ms": median([c for _, c in op]) * 1e3 if cpu else None,
        "unpatched_ms_all": [round(x * 1e3, 3) for x in unpatched],
        "patched_ms_all": [round(x * 1e3, 3) for x in patched],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def _fmt_m(m: int) -> str:
    return f"{m // 1_000_000}M" if m >= 1_000_000 and m % 1_000_000 == 0 else f"{m // 1000}k" if m >= 1000 else str(m)


def _label(r: dict, rows: list[dict]) -> str:
    """The scenario, and the variant where a run compares several (older results have no variant)."""
    several = len({x.get("variant") for x in rows}) > 1
    return f"{r['scenario']} {r['variant']}" if several else r["scenario"]


def tables(result: dict) -> str:
    rows = result["rows"]
    scen = list(dict.fromkeys(_label(r, rows) for s in SCENARIOS + GRAPH_SCENARIOS for r in rows if r["scenario"] == s))
    ms = sorted({r["m"] for r in rows})
    by = {(_label(r, rows), r["m"]): r for r in rows}
    has_cpu = any(r.get("cpu_added_pct") is not None for r in rows)

    def pct(r: dict, key: str = "added_pct") -> str:
        cell = f"{r[key]:+.2f}%"
        return cell + (f" / {r['cpu_' + key]:+.2f}%" if r.get("cpu_" + key) is not None else "")

    head = "wall / CPU time" if has_cpu else "wall time"
    out = [f"Added latency, % of the unpatched forward (median of paired differences; {head}):", ""]
    out.append("| m | " + " | ".join(scen) + " |")
    out.append("|---:|" + "---:|" * len(scen))
    for m in ms:
        cells = [pct(by[(s, m)]) if (s, m) in by else "" for s in scen]
        out.append(f"| {_fmt_m(m)} | " + " | ".join(cells) + " |")
    if any(r.get("hook_pct") is not None for r in rows):
        out += [
            "",
            f"The patch's hook timed inside the patched forwards, % of the unpatched forward (median; {head}):",
            "",
        ]
        out.append("| m | " + " | ".join(scen) + " |")
        out.append("|---:|" + "---:|" * len(scen))
        for m in ms:
            cells = [
                pct(by[(s, m)], "hook_pct") if by.get((s, m), {}).get("hook_pct") is not None else "" for s in scen
            ]
            out.append(f"| {_fmt_m(m)} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Per scenario, ms; floor = key bytes / read bandwidth measured in the same run over the keys"
        + (" (CPU-time columns: the same with process CPU time)" if has_cpu else "")
        + ":",
        "",
    ]
    cols = "| scenario | m | unpatched | added | hook | op alone | floor | added/floor | read GB/s |"
    if has_cpu:
        cols += " CPU: unpatched | added | hook | op alone | floor | added/floor |"
    out.append(cols)
    out.append("|---|---:|" + "---:|" * (cols.count("|") - 3))

    def f(x, spec=".3f", suffix=""):
        return "" if x is None else f"{x:{spec}}{suffix}"

    for s in scen:
        for m in ms:
            r = by.get((s, m))
            if r is None:
                continue
            line = (
                f"| {s} | {_fmt_m(m)} | {r['unpatched_ms']:.2f} | {r['added_ms']:+.3f} | {f(r.get('hook_ms'))} | "
                f"{r['op_ms']:.3f} | "
                f"{f(r.get('floor_ms'))} | {f(r.get('added_over_floor'), '.2f', 'x')} | "
                f"{f(r.get('read_gb_s'), '.1f')} |"
            )
            if has_cpu:
                line += (
                    f" {f(r.get('cpu_unpatched_ms'), '.2f')} | {f(r.get('cpu_added_ms'), '+.3f')} | "
                    f"{f(r.get('cpu_hook_ms'))} | {f(r.get('cpu_op_ms'))} | {f(r.get('cpu_floor_ms'))} | "
                    f"{f(r.get('cpu_added_over_floor'), '.2f', 'x')} |"
                )
            out.append(line)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama3-8b-shape"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: float32 on CPU, float16 on CUDA")
    ap.add_argument("--layers", type=int, default=None, help="llama3-8b-shape: fewer layers (smoke runs)")
    ap.add_argument("--layer", type=int, default=None, help="the patched layer (default: the model's default layer)")
    ap.add_argument("--vocab", type=int, default=None, help="llama3-8b-shape: smaller vocabulary (smoke runs)")
    ap.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="comma-separated database sizes, ascending")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--reps", type=int, default=30, help="paired repetitions per decode point (prefill: a third)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--context", type=int, default=128, help="KV-cache length for the decode scenarios")
    ap.add_argument("--gamma", type=float, default=None)
    ap.add_argument(
        "--backend",
        default=None,
        help="the op's backend (default: auto); comma-separated names are timed as variants of one run, "
        "in the same interleaved repetitions (e.g. triton,cuda)",
    )
    ap.add_argument(
        "--prefilter",
        default="on",
        choices=list(_VARIANTS),
        help="the database's key sketches for decode steps (on: its default, 1-bit + int4; both: patched "
        "with and without them in the same interleaved repetitions; all: also the int4 sketch alone; thresholds: "
        "the default with and without per-row gate thresholds; subject-gate: without and with the subject gate)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's). On a CPU shared with other jobs, 1 avoids OpenMP barriers "
        "waiting for a time slice, which otherwise dominate every timing",
    )
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    ms = sorted(int(x) for x in args.m.split(",") if x)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS + GRAPH_SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS + GRAPH_SCENARIOS}")
    graphed = [s for s in scenarios if s in GRAPH_SCENARIOS]
    if graphed and torch.device(args.device).type != "cuda":
        ap.error(f"scenarios {graphed} capture CUDA graphs: they need --device cuda")

    backend_names = [b or None for b in (args.backend or "").split(",")]
    # The key sketches serve CPU databases only (``to`` a GPU drops them): elsewhere every variant is the plain scan.
    sketches = _VARIANTS[args.prefilter] if torch.device(args.device).type == "cpu" else ("plain",)
    several = len(backend_names) > 1
    variants = {variant_label(v, b, several): (v, b) for b in backend_names for v in sketches}

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if args.model == "smollm2":
        model = load_smollm2(args.device, dtype)
    else:
        model = llama3_8b_shape(args.device, dtype, args.layers, args.vocab)
    layer = arch.default_layer(model) if args.layer is None else arch.check_layer(model, args.layer)
    path, module = arch.down_proj_module(model, layer)
    key_dim, value_dim = arch.down_proj_dims(module)
    gamma = args.gamma if args.gamma is not None else arch.default_gamma(model)
    db = NeuralKVDatabase(key_dim, value_dim, device=args.device)
    dgen = torch.Generator(device=args.device).manual_seed(1)

    name = f"overhead_{args.model}_{torch.device(args.device).type}" + (f"_{args.tag}" if args.tag else "")
    out = args.out or RESULTS / f"{name}.json"
    result = {
        "benchmark": "bench_overhead",
        "argv": sys.argv[1:] if argv is None else argv,
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "layer": layer,
        "module": path,
        "key_dim": key_dim,
        "value_dim": value_dim,
        "gamma": gamma,
        "context": args.context,
        "machine": machine_description(args.device),
        "rows": [],
    }
    print(
        f"{args.model} {result['dtype']} on {args.device}: patching {path} ({key_dim} -> {value_dim}), gamma {gamma}",
        flush=True,
    )
    built = {s: Scenario(s, model, args.device, args.context, gen) for s in scenarios}
    for m in ms:
        secs = grow(db, m, dgen)
        bw = read_bandwidth(db.keys) if m else None
        key_bytes = db.keys.numel() * db.keys.element_size()
        print(
            f"m={m}: database built in {secs:.1f}s" + (f", read {bw['bytes_per_s'] / 1e9:.1f} GB/s" if bw else ""),
            flush=True,
        )
        for s in scenarios:
            reps = args.reps if s.startswith("decode") else max(3, args.reps // 3)
            for row in measure(model, db, built[s], layer, reps, args.warmup, args.device, gamma, variants):
                add_row(result, row, s, m, key_bytes, bw)
        result["machine"]["load_average_after"] = load_average()
        write_json(out, result)  # after every m, so a killed run keeps what it measured
    print()
    print(tables(result))
    print(f"\nwrote {out} (python benchmarks/plot.py {out} draws it)")
    return result


def _ms(x: float | None) -> str:
    return f"{x:8.3f} ms" if x is not None else "       - ms"


def add_row(result: dict, row: dict, s: str, m: int, key_bytes: int, bw: dict | None) -> None:
    """Complete a measured row with the floor (same-run read bandwidth over the keys), store and print it."""
    row["m"] = m
    row["key_bytes"] = key_bytes
    if bw is not None:
        row["read_gb_s"] = bw["bytes_per_s"] / 1e9
        row["floor_ms"] = key_bytes / bw["bytes_per_s"] * 1e3
        row["added_over_floor"] = row["added_ms"] / row["floor_ms"]
        row["op_over_floor"] = row["op_ms"] / row["floor_ms"]
        if row["cpu_added_ms"] is not None:
            row["cpu_read_gb_s"] = bw["bytes_per_cpu_s"] / 1e9
            row["cpu_floor_ms"] = key_bytes / bw["bytes_per_cpu_s"] * 1e3
            row["cpu_added_over_floor"] = row["cpu_added_ms"] / row["cpu_floor_ms"]
    result["rows"].append(row)
    label = f"{s} {row['variant']}"
    print(
        f"  {label:22s} unpatched {row['unpatched_ms']:9.2f} ms  added {row['added_ms']:+8.3f} ms "
        f"({row['added_pct']:+6.2f}%)  hook {_ms(row['hook_ms'])}  op {row['op_ms']:8.3f} ms"
        + (f"  floor {row['floor_ms']:7.3f} ms ({row['added_over_floor']:.2f}x)" if bw else ""),
        flush=True,
    )
    if row["cpu_added_ms"] is not None:
        print(
            f"  {'':22s} CPU time: unpatched {row['cpu_unpatched_ms']:9.2f} ms  "
            f"added {row['cpu_added_ms']:+8.3f} ms "
            f"({row['cpu_added_pct']:+6.2f}%)  hook {_ms(row['cpu_hook_ms'])}  op {row['cpu_op_ms']:8.3f} ms"
            + (f"  floor {row['cpu_floor_ms']:7.3f} ms ({row['cpu_added_over_floor']:.2f}x)" if bw else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
