"""How many keys each stage of the exact pre-filter passes, on random unit keys and on real keys with real queries.

    python benchmarks/experiments/prefilter_pass.py --threads 1      # real: the CounterFact distractor keys of SmolLM2's layer

For each (keys, queries) pair it reports, over all (query, key) pairs at gamma (default SmolLM2's): the fraction
whose exact score exceeds gamma, the fraction the 1-bit stage passes (``prefilter.sign_bounds``, the C++ kernel's
bound: same int8 query), the fraction the int4 stage alone would pass (``prefilter.int4_bounds``: the float64
query, a little tighter than the kernel's int8 one) and the cascade's; then the C++ kernel's own counts per query
row (``NEURALDB_CPU_DEBUG``: keys past the 1-bit stage, keys rescored exactly), and the bytes read per key.

Real queries are the inputs of SmolLM2's down_proj at ``--layer`` on the first ``--tokens`` tokens of WikiText-2's
test split (``--text``); real keys are a ``distractor-keys-*.pt`` tensor (``--keys``; by default the largest one of
SmolLM2's key width in ``--keys-dir``). Random keys and queries are Gaussian rows, normalised. The result goes to
``benchmarks/results/prefilter_pass.json``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # siblings, benchmarks/

import torch
from _common import RESULTS, load_average, machine_description, write_json

import neuraldb_kernels
from neuraldb_kernels import config, prefilter
from neuraldb_kernels.reference import normalize_queries

_ROWS = 256  # query rows per block of the reference bounds (a few (rows, m) float64 matrices at once)


def real_queries(layer: int, text: Path, tokens: int) -> torch.Tensor:
    from neuraldb import architectures as arch
    from neuraldb.models import load_model

    model, tok = load_model("smollm2")
    _, module = arch.down_proj_module(model, layer)
    rows: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    with gzip.open(text, "rt") if text.suffix == ".gz" else open(text) as f:
        ids = tok(f.read(tokens * 20), return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        for s in range(0, ids.shape[1], 512):
            model(ids[:, s : s + 512])
    hook.remove()
    return torch.cat(rows).float()


def find_keys(keys_dir: Path, d1: int) -> Path:
    """The largest ``distractor-keys-*.pt`` tensor with ``d1`` columns."""
    shapes = {p: torch.load(p, map_location="cpu", mmap=True).shape for p in keys_dir.glob("distractor-keys-*.pt")}
    fits = [p for p, s in shapes.items() if s[-1] == d1]
    if not fits:
        raise FileNotFoundError(f"--keys-dir {keys_dir}: no distractor-keys-*.pt with {d1} columns")
    return max(fits, key=lambda p: shapes[p][0])


def kernel_counts(queries: torch.Tensor, keys: torch.Tensor, sketch, signs, gamma: float) -> dict:
    """The C++ cascade's own per-row counts, read from its NEURALDB_CPU_DEBUG line on stderr."""
    values = torch.zeros(keys.shape[0], 1, dtype=keys.dtype)
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as f, config.override(cpu_debug=True):
        os.dup2(f.fileno(), 2)
        try:
            neuraldb_kernels.gated_retrieval_prefiltered(queries, keys, values, gamma, sketch, signs, backend="cpu")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        line = f.read()
    passed = float(re.search(r"passed signs/query=([\d.]+)", line).group(1))
    rescored = float(re.search(r"rescored/query=([\d.]+)", line).group(1))
    return {"signs_pass_frac": passed / keys.shape[0], "rescored_frac": rescored / keys.shape[0]}


def stage_fractions(name: str, keys: torch.Tensor, queries: torch.Tensor, gamma: float) -> dict:
    d1 = keys.shape[1]
    sketch, signs = prefilter.build_sketch(keys), prefilter.build_signs(keys)
    g32 = float(torch.tensor(gamma, dtype=torch.float32))
    n = {"exact": 0, "signs": 0, "int4": 0, "cascade": 0}
    for s in range(0, queries.shape[0], _ROWS):
        q = queries[s : s + _ROWS]
        exact = normalize_queries(q) @ keys.float().T
        s1 = ~(prefilter.sign_bounds(q, signs, d1) < g32)
        s4 = ~(prefilter.int4_bounds(q, sketch, d1) < g32)
        n["exact"] += int((exact > gamma).sum())
        n["signs"] += int(s1.sum())
        n["int4"] += int(s4.sum())
        n["cascade"] += int((s1 & s4).sum())
    pairs = queries.shape[0] * keys.shape[0]
    row = {"name": name, "m": keys.shape[0], "queries": queries.shape[0], "d1": d1, "gamma": gamma}
    row.update({f"{k}_frac": v / pairs for k, v in n.items()})
    row["kernel"] = kernel_counts(queries, keys, sketch, signs, gamma)
    sb, kb = prefilter.sign_row_bytes(d1), prefilter.sketch_row_bytes(d1)
    row["bytes_per_key"] = {
        "fp16_keys": 2 * d1,
        "int4_sketch": kb,
        "signs": sb,
        # What one decode step reads per key: the 1-bit row, plus the int4 row and the fp16 key of the survivors.
        "cascade_read": sb + row["kernel"]["signs_pass_frac"] * kb + row["kernel"]["rescored_frac"] * 2 * d1,
    }
    print(
        f"{name:34s} exact>{gamma} {row['exact_frac']:.2e}  1-bit {row['signs_frac']:.4f}  int4 {row['int4_frac']:.5f}"
        f"  cascade {row['cascade_frac']:.5f}  kernel: 1-bit {row['kernel']['signs_pass_frac']:.4f}, rescored "
        f"{row['kernel']['rescored_frac']:.5f}  read {row['bytes_per_key']['cascade_read']:.0f} B/key",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=Path, default=None, help="real keys (a (m, d1) tensor saved with torch.save)")
    ap.add_argument("--keys-dir", type=Path, default=Path("/work/dbs"))
    ap.add_argument("--text", type=Path, default=Path("/work/shared/data/general_eval/wikitext2_raw_test.txt.gz"))
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--gamma", type=float, default=0.65)
    ap.add_argument("--random-m", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "prefilter_pass.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    real_q = real_queries(args.layer, args.text, args.tokens)
    d1 = real_q.shape[1]
    path = args.keys or find_keys(args.keys_dir, d1)
    real_k = torch.nn.functional.normalize(torch.load(path, map_location="cpu").float(), dim=1).half()
    rand_k = torch.nn.functional.normalize(torch.randn(args.random_m, d1, generator=g), dim=1).half()
    rand_q = torch.randn(256, d1, generator=g)
    result = {
        "benchmark": "prefilter_pass",
        "argv": sys.argv[1:] if argv is None else argv,
        "keys_file": str(path),
        "text": str(args.text),
        "layer": args.layer,
        "machine": machine_description("cpu"),
        "rows": [
            stage_fractions("real keys, real queries", real_k, real_q, args.gamma),
            stage_fractions("random keys, real queries", rand_k, real_q, args.gamma),
            stage_fractions("random keys, random queries", rand_k, rand_q, args.gamma),
            stage_fractions("real keys, random queries", real_k, rand_q, args.gamma),
        ],
    }
    result["machine"]["load_average_after"] = load_average()
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
