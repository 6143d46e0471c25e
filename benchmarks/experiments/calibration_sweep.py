"""Calibration settings against held-out gate openings, from one pass over the states (no quality evaluation).

    python benchmarks/experiments/calibration_sweep.py --db runs/scaling-counterfact/db.safetensors --n 1000

The first ``--n`` rows of ``--db``; negatives as ``neuraldb.calibration.calibrate`` takes them, from WikiText-2 test
tokens [65536, 65536 + T) for each T of ``--tokens``; held-out openings on tokens [0, 65536). For each (T, delta,
margin): rows raised, held-out positions opening a gate, and the share of the rows' own bare prompts still opening
their row (always all: thresholds stay below them). Pick settings here, then measure quality with
``benchmarks/calibration_run.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python")]

import neuraldb
from neuraldb import calibration as cal
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import compute_keys
from neuraldb.facts import Fact

WIKITEXT = ROOT.parent / "shared/data/general_eval/wikitext2_raw_test.txt.gz"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=ROOT / "runs/scaling-counterfact/db.safetensors")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tokens", default="0,32768,65536,131072")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = neuraldb.load_model("smollm2")
    full = NeuralKVDatabase.load(args.db)
    n = min(args.n, len(full))
    keys = torch.nn.functional.normalize(full.keys[:n].float(), dim=-1)
    facts = [full.fact(i) for i in full.ids()[:n]]
    layer, gamma, template = full.layer, full.gamma, full.template
    corpus = [cal.read_corpus(WIKITEXT)]
    sizes = [int(x) for x in args.tokens.split(",")]
    with torch.inference_mode():
        held = cal.text_states(model, tok, layer, corpus, tokens=65536, skip=0)
        calib = cal.text_states(model, tok, layer, corpus, tokens=max(sizes) or 2, skip=65536)
        own = torch.nn.functional.normalize(
            compute_keys(model, tok, facts, layer, n_prefixes=0, template=template).float(), dim=-1
        )
        words, owner = [], []
        for r, f in enumerate(facts):
            parts = f.subject.split()
            if len(parts) > 1:
                for fw in cal.FUNCTION_WORDS:
                    words.append(Fact(parts[-1], f"{fw} {{}}", "x"))
                    owner.append(r)
        w = torch.nn.functional.normalize(
            compute_keys(model, tok, words, layer, n_prefixes=0, template=template).float(), dim=-1
        )
    rows = torch.arange(n)
    pos = (own * keys).sum(-1)
    o_score, o_row = cal.best_rows(own, keys)
    base = torch.full((n,), -1.0)
    other = (o_row != rows) & (o_score > gamma)
    base.scatter_reduce_(0, o_row[other], o_score[other], "amax")
    owner_t = torch.tensor(owner)
    base.scatter_reduce_(0, owner_t, (w * keys[owner_t]).sum(-1), "amax")
    h_score, h_row = cal.best_rows(held, keys)
    c_score, c_row = cal.best_rows(calib, keys)
    results = []
    print("| text tokens | delta | margin | rows raised | held-out open | own prompts open |")
    print("|---:|---:|---:|---:|---:|---:|")
    none = cal.opens(h_score, h_row, gamma, torch.full((n,), -1.0))
    print(f"| (no thresholds) | | | 0 | {100 * float(none.float().mean()):.3f}% | |")
    for size in sizes:
        neg = base.clone()
        hit = c_score[:size] > gamma
        neg.scatter_reduce_(0, c_row[:size][hit], c_score[:size][hit], "amax")
        for delta in (0.0, 0.02, 0.05):
            for margin in (0.03, 0.05, 0.1):
                want = torch.minimum(neg + delta, pos - margin)
                t = torch.where((neg > -1) & (want > gamma), want, torch.full((n,), -1.0))
                opened = cal.opens(h_score, h_row, gamma, t)
                own_ok = ((o_row == rows) & cal.opens(o_score, o_row, gamma, t)).float().mean()
                r = {
                    "tokens": size, "delta": delta, "margin": margin, "raised": int((t > -1).sum()),
                    "heldout_open_pct": round(100 * float(opened.float().mean()), 3),
                    "own_open_pct": round(100 * float(own_ok), 1),
                }  # fmt: skip
                results.append(r)
                print(
                    f"| {size} | {delta} | {margin} | {r['raised']} | {r['heldout_open_pct']:.3f}% | "
                    f"{r['own_open_pct']}% |"
                )
    if args.out:
        args.out.write_text(json.dumps({"n": n, "results": results}, indent=1))


if __name__ == "__main__":
    main()
