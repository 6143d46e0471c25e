"""GPU op table of ``gated_retrieval``: the Triton and CUDA kernels against the eager reference,
``torch.compile(reference)`` and two same-run probes, timed with CUDA events; writes JSON under benchmarks/results/.

    python benchmarks/gpu_op_table.py                                    # the full table (about 10-20 minutes)
    python benchmarks/gpu_op_table.py --T 1 8 16 --m 100000 --d1 14336  # the decode target (issue 7)
    python benchmarks/gpu_op_table.py --dry-run                          # the plan and memory needs; no GPU needed
    python benchmarks/gpu_op_table.py --T 1 8 --m 2000 10000 100000 1000000 --d1 14336 \
        --peers triton cascade read_probe                                # the exact cascade against the plain scan

Peers, per (T, m, d1), fp16 keys (unit rows), fp16 values (m, d2), fp16 queries:
  triton, cuda       the backends, called through ``neuraldb_kernels.gated_retrieval`` (the op's full path);
                     ``first_call_s`` records Triton's autotuning on the first call of each shape key
  cascade            ``gated_retrieval_prefiltered`` on the Triton backend (signs, int4 sketch, exact rescoring;
                     T <= 16 only), its sketches built once per database; ``cascade_matches_triton`` is the share of
                     rows equal to the plain Triton output bitwise (closed gates as -1/-inf), ``cascade_x_read``
                     its time over the read probe's (the fp16 key-read floor)
  eager              ``gated_retrieval_torch`` (chunked fp32 matmuls, argmax, gather)
  compiled           ``torch.compile`` of the reference: the whole function where its key loop has at most
                     ``--max-unrolled-chunks`` chunks, else of one chunk step with the loop in Python (dynamo would
                     unroll hundreds of chunks); the row says which
  read_probe         ``keys.sum(dtype=float32)``: one plain read of the key tensor, the bandwidth bar
  gemm_probe         an fp16 ``queries @ keys.T`` (chunked, fp16 out) for T >= 16: the tensor-core bar
Derived: key_gbps (key bytes / time), pct_read_probe (key_gbps / read probe's GB/s), tflops (2 T m d1 / time),
pct_gemm_probe, pct_nominal (of the card's dense fp16 peak where the name is known), speedups vs eager/compiled.
Targets (issue 7, H100): T <= 16, m = 100k, d1 = 14336: >= 85% of the read probe, >= 1.5x eager, faster than
compiled; T = 2048: >= 50% of dense fp16 tensor-core throughput.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import RESULTS
from _common import write_json as _write_json

DEFAULT_T = (1, 8, 16, 128, 2048)
DEFAULT_M = (10_000, 100_000, 1_000_000)
DEFAULT_D1 = (4096, 14336)
PEERS = ("triton", "cascade", "cuda", "eager", "compiled", "read_probe", "gemm_probe")
# Dense fp16/bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
NOMINAL_FP16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "B200": 2250.0,
}
# The reference's chunk bound (neuraldb_kernels.reference._SCORE_CHUNK_BYTES) for the memory estimate.
REF_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Shape:
    t: int
    m: int
    d1: int


@dataclass
class Row:
    t: int
    m: int
    d1: int
    d2: int
    times_ms: dict[str, float] = field(default_factory=dict)  # median per call
    first_call_s: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    derived: dict[str, float] = field(default_factory=dict)


# ---- planning (no GPU) ----------------------------------------------------------------------------------------------


def plan(ts, ms, d1s) -> list[Shape]:
    """Shapes ordered so that each (d1, m) database is built once and reused for every T."""
    return [Shape(t, m, d1) for d1 in sorted(set(d1s)) for m in sorted(set(ms)) for t in sorted(set(ts))]


def bytes_needed(m: int, d1: int, d2: int, t: int, elem: int = 2, sketches: bool = False) -> int:
    """Peak device bytes of one shape: keys, values (and the cascade's sketches), queries/outputs and the largest
    peer's workspace."""
    from neuraldb_kernels import sign_row_bytes, sketch_row_bytes

    keys, values = m * d1 * elem, m * d2 * elem
    if sketches:
        keys += m * (sketch_row_bytes(d1) + sign_row_bytes(d1))
    ref_chunk = max(1, REF_CHUNK_BYTES // (4 * (t + d1)))
    ref_ws = min(m, ref_chunk) * (4 * d1 + 4 * t)  # fp32 key chunk + fp32 scores
    gemm_ws = min(m, 65_536) * (d1 * elem + t * elem)
    probe_ws = 64 * 2**20
    io = t * (d1 + d2) * 4 * 3
    return keys + values + max(ref_ws, gemm_ws, probe_ws) + io


def fits(need: int, free: int, margin: float = 0.85) -> bool:
    return need <= margin * free


def derive(row: Row, nominal_tflops: float | None) -> dict[str, float]:
    """Bandwidth, throughput and speedup columns from the measured times."""
    out: dict[str, float] = {}
    key_bytes = row.m * row.d1 * 2
    flops = 2.0 * row.t * row.m * row.d1
    tm = row.times_ms
    probe_gbps = key_bytes / (tm["read_probe"] * 1e-3) / 1e9 if "read_probe" in tm else None
    gemm_tflops = flops / (tm["gemm_probe"] * 1e-3) / 1e12 if "gemm_probe" in tm else None
    if probe_gbps:
        out["read_probe_gbps"] = probe_gbps
    if gemm_tflops:
        out["gemm_probe_tflops"] = gemm_tflops
    if "cascade" in tm and "read_probe" in tm:
        out["cascade_x_read"] = tm["cascade"] / tm["read_probe"]
    for peer in ("triton", "cascade", "cuda", "eager", "compiled"):
        if peer not in tm:
            continue
        secs = tm[peer] * 1e-3
        gbps, tflops = key_bytes / secs / 1e9, flops / secs / 1e12
        out[f"{peer}_key_gbps"] = gbps
        out[f"{peer}_tflops"] = tflops
        if probe_gbps:
            out[f"{peer}_pct_read_probe"] = 100.0 * gbps / probe_gbps
        if gemm_tflops:
            out[f"{peer}_pct_gemm_probe"] = 100.0 * tflops / gemm_tflops
        if nominal_tflops:
            out[f"{peer}_pct_nominal"] = 100.0 * tflops / nominal_tflops
        if peer == "cascade" and "triton" in tm:
            out["cascade_speedup_vs_triton"] = tm["triton"] / tm["cascade"]
        for base in ("eager", "compiled"):
            if base in tm and base != peer:
                out[f"{peer}_speedup_vs_{base}"] = tm[base] / tm[peer]
    return out


def nominal_peak(device_name: str) -> float | None:
    for key, tflops in NOMINAL_FP16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return tflops
    return None


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'T':>5} {'m':>9} {'d1':>6} | "
        + " ".join(f"{p:>10}" for p in PEERS)
        + " | triton%rd  cuda%rd  tri/eag  tri/cmp  tri%gemm  cas/rd  tri/cas"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r.times_ms[p]:10.3f}" if p in r.times_ms else f"{'-':>10}" for p in PEERS)
        d = r.derived

        def f(key, fmt="{:8.1f}"):
            return fmt.format(d[key]) if key in d else f"{'-':>8}"

        lines.append(
            f"{r.t:>5} {r.m:>9} {r.d1:>6} | {cells} | {f('triton_pct_read_probe')} "
            f"{f('cuda_pct_read_probe')} {f('triton_speedup_vs_eager', '{:8.2f}')} "
            f"{f('triton_speedup_vs_compiled', '{:8.2f}')} {f('triton_pct_gemm_probe')} "
            f"{f('cascade_x_read', '{:7.3f}')} {f('cascade_speedup_vs_triton', '{:7.2f}')}"
        )
    lines.append("times in ms per call (median); %rd = % of the same-run key read; tri/eag, tri/cmp = speedups")
    lines.append("cas/rd = cascade time / key-read time (below 1: under the fp16 floor); tri/cas = its speedup")
    return "\n".join(lines)


def result_path(device_name: str, stamp: str | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "device"
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    return RESULTS / f"gpu_op_table_{slug}_{stamp}.json"


def write_json(path: Path, meta: dict, rows: list[Row]) -> Path:
    return _write_json(path, {**meta, "rows": [asdict(r) for r in rows]}, sort_keys=True)


# ---- measuring (GPU) ------------------------------------------------------------------------------------------------


def time_cuda(fn, *, min_total_s: float = 0.2, max_iters: int = 200, repeats: int = 5) -> float:
    """Median milliseconds per call over ``repeats`` batches of CUDA-event-timed calls (after one warm call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    iters = max(1, min(max_iters, int(min_total_s * 1e3 / repeats / one)))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def build_db(m: int, d1: int, d2: int, seed: int = 0, chunk: int = 1 << 16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.empty(m, d1, dtype=torch.float16, device="cuda")
    for s in range(0, m, chunk):
        n = min(chunk, m - s)
        keys[s : s + n] = torch.nn.functional.normalize(torch.randn(n, d1, device="cuda", generator=g), dim=1)
    values = torch.randn(m, d2, device="cuda", generator=g, dtype=torch.float16)
    return keys, values


def compiled_reference(t: int, m: int, d1: int, max_unrolled: int):
    """``torch.compile`` of the reference, whole where its chunk loop is short, else of one chunk step."""
    from neuraldb_kernels import reference as ref

    step = ref._chunk_rows(t, d1)
    if math.ceil(m / step) <= max_unrolled:
        return torch.compile(ref.gated_retrieval_torch, fullgraph=True, dynamic=False), "whole"

    @torch.compile(fullgraph=True, dynamic=False)
    def chunk_step(qn, keys_chunk, start, best, best_idx):
        scores = qn @ keys_chunk.float().T
        chunk_idx = scores.argmax(dim=1)
        chunk_best = scores.gather(1, chunk_idx[:, None]).squeeze(1)
        better = chunk_best > best
        return torch.where(better, chunk_best, best), torch.where(better, chunk_idx + start, best_idx)

    @torch.compile(fullgraph=True, dynamic=False)
    def finish(queries, values, score, idx, gamma: float):
        rows = values[idx.clamp_min(0)].to(queries.dtype)
        return torch.where((score > gamma)[:, None], rows, torch.zeros_like(rows)), idx, score

    def run(queries, keys, values, gamma):
        qn = ref.normalize_queries(queries)
        best = torch.full((queries.shape[0],), float("-inf"), device=queries.device)
        best_idx = torch.full((queries.shape[0],), -1, dtype=torch.int64, device=queries.device)
        for s in range(0, keys.shape[0], step):
            start = torch.tensor(s, device=queries.device)
            best, best_idx = chunk_step(qn, keys[s : s + step], start, best, best_idx)
        return finish(queries, values, best, best_idx, gamma)

    return run, "chunk-step"


def gemm_probe(q16: torch.Tensor, keys: torch.Tensor, chunk: int = 65_536):
    outs = [torch.empty(q16.shape[0], min(chunk, keys.shape[0]), dtype=torch.float16, device="cuda")]

    def run():
        for s in range(0, keys.shape[0], chunk):
            k = keys[s : s + chunk]
            torch.matmul(q16, k.T, out=outs[0][:, : k.shape[0]])

    return run


def measure(shapes, d2, peers, gamma, max_unrolled, log=print) -> tuple[dict, list[Row]]:
    import neuraldb_kernels
    from neuraldb_kernels import backends
    from neuraldb_kernels.reference import gated_retrieval_torch

    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    meta = {
        "device": name,
        "capability": list(torch.cuda.get_device_capability()),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nominal_fp16_tflops": nominal_peak(name),
        "d2": d2,
        "gamma": gamma,
        "dtypes": {"queries": "float16", "keys": "float16", "values": "float16"},
    }
    avail = {p: backends.BACKENDS[p].unavailable_reason("cuda") for p in ("triton", "cuda")}
    meta["unavailable"] = {p: r for p, r in avail.items() if r}
    rows: list[Row] = []
    db_key, keys, values, sketches = None, None, None, None
    for shp in shapes:
        if db_key != (shp.m, shp.d1):
            keys = values = sketches = None
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info()
            t_max = max(s.t for s in shapes if (s.m, s.d1) == (shp.m, shp.d1))
            need = bytes_needed(shp.m, shp.d1, d2, t_max, sketches="cascade" in peers)
            if not fits(need, free):
                log(f"skip m={shp.m} d1={shp.d1}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
                db_key = (shp.m, shp.d1)
                continue
            keys, values = build_db(shp.m, shp.d1, d2)
            if "cascade" in peers:
                sketches = (neuraldb_kernels.build_sketch(keys), neuraldb_kernels.build_signs(keys))
            db_key = (shp.m, shp.d1)
        if keys is None:
            continue
        row = Row(shp.t, shp.m, shp.d1, d2)
        g = torch.Generator(device="cuda").manual_seed(shp.t)
        pick = torch.randint(0, shp.m, (shp.t,), device="cuda", generator=g)
        q = keys[pick].float() + 0.5 * torch.randn(shp.t, shp.d1, device="cuda", generator=g) / shp.d1**0.5
        q = (3 * q).half()
        results = {}
        for peer in peers:
            if avail.get(peer):
                row.notes[peer] = f"unavailable: {avail[peer]}"
                continue
            if (peer == "gemm_probe" and shp.t < 16) or (peer == "cascade" and shp.t > 16):
                continue
            try:
                if peer in ("triton", "cuda"):
                    fn = lambda p=peer: neuraldb_kernels.gated_retrieval(q, keys, values, gamma, backend=p)
                    t0 = time.perf_counter()
                    results[peer] = fn()
                    torch.cuda.synchronize()
                    row.first_call_s[peer] = time.perf_counter() - t0
                elif peer == "cascade":
                    fn = lambda: neuraldb_kernels.gated_retrieval_prefiltered(
                        q, keys, values, gamma, *sketches, backend="triton"
                    )
                    t0 = time.perf_counter()
                    results[peer] = fn()
                    torch.cuda.synchronize()
                    row.first_call_s[peer] = time.perf_counter() - t0
                elif peer == "eager":
                    fn = lambda: gated_retrieval_torch(q, keys, values, gamma)
                    results[peer] = fn()
                elif peer == "compiled":
                    torch._dynamo.reset()  # a fresh cache per shape: no silent fallback past the recompile limit
                    cfn, how = compiled_reference(shp.t, shp.m, shp.d1, max_unrolled)
                    row.notes[peer] = how
                    fn = lambda cfn=cfn: cfn(q, keys, values, gamma)
                    t0 = time.perf_counter()
                    results[peer] = fn()
                    torch.cuda.synchronize()
                    row.first_call_s[peer] = time.perf_counter() - t0
                elif peer == "read_probe":
                    fn = lambda: keys.sum(dtype=torch.float32)
                else:
                    fn = gemm_probe(q, keys)
                row.times_ms[peer] = time_cuda(fn)
            except Exception as exc:  # a peer failing (OOM, compile error) must not lose the rest of the table
                row.notes[peer] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                torch.cuda.empty_cache()
        if "cascade" in results and "triton" in results:
            row.derived["cascade_matches_triton"] = matches_plain(results["cascade"], results["triton"], gamma)
        if "eager" in results:
            ref_idx = results["eager"][1]
            for peer in ("triton", "cuda", "compiled"):
                if peer in results:
                    row.derived[f"{peer}_idx_agree"] = (results[peer][1] == ref_idx).float().mean().item()
        row.derived.update(derive(row, meta["nominal_fp16_tflops"]))
        rows.append(row)
        log(format_table([row]).splitlines()[2])
        del results
    return meta, rows


def matches_plain(cascade, plain, gamma: float) -> float:
    """Share of rows where the cascade's (out, idx, score) is the plain op's bitwise, its closed gates as the
    pre-filtered contract reports them (-1, -inf, zeros)."""
    out, idx, score = plain
    open_ = (score > gamma) & (idx >= 0)
    want_idx, want_score = torch.where(open_, idx, -1), torch.where(open_, score, float("-inf"))
    same = (cascade[1] == want_idx) & (cascade[2] == want_score) & (cascade[0] == out).all(dim=1)
    return same.float().mean().item()


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_T))
    ap.add_argument("--m", type=int, nargs="+", default=list(DEFAULT_M))
    ap.add_argument("--d1", type=int, nargs="+", default=list(DEFAULT_D1))
    ap.add_argument("--d2", type=int, default=4096, help="residual width (Llama-3-8B hidden size)")
    ap.add_argument("--gamma", type=float, default=0.65)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--max-unrolled-chunks", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and memory needs, measure nothing")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes = plan(args.T, args.m, args.d1)
    if args.dry_run:
        for s in shapes:
            need = bytes_needed(s.m, s.d1, args.d2, s.t, sketches="cascade" in args.peers)
            print(f"T={s.t:>5} m={s.m:>9} d1={s.d1:>6}: {need / 2**30:6.2f} GiB")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    meta, rows = measure(shapes, args.d2, args.peers, args.gamma, args.max_unrolled_chunks)
    meta["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"\n{meta['device']} ({meta['sm_count']} SMs), torch {meta['torch']}, triton {meta['triton']}")
    print(format_table(rows))
    path = write_json(args.out or result_path(meta["device"]), meta, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
