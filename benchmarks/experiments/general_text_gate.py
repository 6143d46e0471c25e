"""Where the gate opens on general text: per database row, the positions of a WikiText-2 stretch it is retrieved at.

    python benchmarks/experiments/general_text_gate.py --db smollm2-cf1000.safetensors \\
        --text ../shared/data/general_eval/wikitext2_raw_test.txt.gz --tokens 4096

The claim behind the method is that ordinary text does not open the gate, so the edited model is the unedited one
there. This counts the exceptions: every position (the database's template applied, as ``neuraldb eval`` does
for WikiText-2 perplexity, 512-token windows) whose best cosine with the database's keys exceeds gamma, grouped by
the row it retrieves, with the fact's subject and the few tokens ending at that position. Results:
``benchmarks/results/general_text_gate[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]

import neuraldb
from _common import machine_description, write_json
from neuraldb import templates
from neuraldb.editing import model_access
from neuraldb.editing.model_access import down_proj_inputs

from neuraldb_kernels.reference import normalize_queries


def read_text(path: str) -> str:
    """A text file (gzip when it ends in .gz), its lines joined with newlines."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return "\n".join(f.read().splitlines())


def text_states(
    model, tok, template: str | None, layer: int, text: str, *, tokens: int, start: int = 0, window: int = 512
) -> tuple[list[int], torch.Tensor]:
    """``(ids, states)``: ``tokens`` token ids of ``text`` in ``template`` from ``start``, and the down-projection
    inputs of ``layer`` at each (unit rows), one forward per ``window`` tokens as ``neuraldb eval`` scores them."""
    ids = tok(templates.apply(template, text), add_special_tokens=False)["input_ids"][start : start + tokens]
    h = model_access.handles(model, layer)
    pad = tok.pad_token_id or 0
    states = [down_proj_inputs(h, [ids[s : s + window]], pad)[0][0] for s in range(0, len(ids), window)]
    return ids, normalize_queries(torch.cat(states))


def gate_on_text(model, tok, db, text: str, *, tokens: int, window: int = 512, examples: int = 5) -> dict:
    ids, states = text_states(model, tok, db.template, db.layer, text, tokens=tokens, window=window)
    keys = normalize_queries(db.keys.float())
    counts: Counter = Counter()
    shown: dict[int, list[str]] = {}
    best_all = []
    for s in range(0, len(ids), window):  # a window at a time: states x keys would be (tokens, m)
        best, row = (states[s : s + window] @ keys.T).max(-1)
        best_all.append(best)
        for p in (best > db.gamma).nonzero().flatten().tolist():
            r = int(row[p])
            counts[r] += 1
            if len(shown.setdefault(r, [])) < examples:
                shown[r].append(tok.decode(ids[s + max(0, p - 4) : s + p + 1]))
    best = torch.cat(best_all)
    ids_ = db.ids()
    return {
        "positions": len(ids),
        "open_positions": sum(counts.values()),
        "rows_retrieved": len(counts),
        "best_cosine_quantiles": {
            str(qq): round(float(v), 4)
            for qq, v in zip(
                (0.5, 0.9, 0.99, 0.999, 1.0), torch.quantile(best, torch.tensor([0.5, 0.9, 0.99, 0.999, 1.0]))
            )
        },
        "rows": [
            {
                "row": r,
                "positions": c,
                "subject": db.fact(ids_[r]).subject if db.fact(ids_[r]) else None,
                "contexts": shown[r],
            }
            for r, c in counts.most_common()
        ],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--db", required=True)
    ap.add_argument("--text", required=True, help="a text file (.gz allowed), e.g. WikiText-2's raw test split")
    ap.add_argument("--tokens", type=int, default=4096, help="score the first T tokens (neuraldb eval's default)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = neuraldb.load_model(args.model, dtype=args.dtype)
    db = neuraldb.NeuralKVDatabase.load(args.db)
    with torch.inference_mode():
        res = gate_on_text(model, tok, db, read_text(args.text), tokens=args.tokens)
    res.update(
        model=args.model,
        db=args.db,
        n_rows=len(db),
        gamma=db.gamma,
        layer=db.layer,
        text=args.text,
        machine=machine_description(),
    )
    out = ROOT / "benchmarks" / "results" / ("general_text_gate" + (f"_{args.tag}" if args.tag else "") + ".json")
    write_json(out, res)
    print(
        f"{res['open_positions']} of {res['positions']} positions open the gate "
        f"({100 * res['open_positions'] / res['positions']:.2f}%), {res['rows_retrieved']} rows of {len(db)}"
    )
    for r in res["rows"][:10]:
        print(f"  row {r['row']:>6} x{r['positions']:<4} {r['subject']!r}: {r['contexts']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
