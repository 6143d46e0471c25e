"""Would a second key at the token before a subject's last one separate the subject from names that share its last word?

    python benchmarks/experiments/subject_gate_sim.py --db runs/scaling-counterfact/db.safetensors --n 1000

Held-out WikiText-2 opens gates mostly where a name ends in the same word as an edited subject ("the Drum Theatre"
opens "Armstrong Circle Theatre", "Los Angeles" opens "NCIS: Los Angeles": benchmarks/experiments/opening_anatomy.py).
The key at the subject's last token is dominated by that word. This simulation gives each row whose subject has
more than one token its *previous-token key* (``neuraldb.enable_subject_gate``: the down-projection input at the
token before the subject's last one, averaged over the editing contexts as the row's own key is). A gate opened at position t would stay open only if cos(q_{t-1}, that key) > rho.
Measured, for rho in a grid: the share of the facts' own prompts (bare and the editing contexts) and paraphrases
that keep their row, and the held-out text openings (after calibration with the defaults) that would be shut, with
the log-loss they cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]

import neuraldb
from neuraldb import calibration as cal
from neuraldb import templates
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import model_access
from neuraldb.editing.contexts import _subject_last, context_texts, generate_prefixes
from neuraldb.subject_gate import enable_subject_gate
from scaling_run import first_rows

WIKITEXT = ROOT.parent / "shared/data/general_eval/wikitext2_raw_test.txt.gz"
WINDOW = 512


def _states(h, seqs, pad):
    out = []
    for i in range(0, len(seqs), 64):
        q, _ = model_access.down_proj_inputs(h, seqs[i : i + 64], pad)
        out += [torch.nn.functional.normalize(q[j, : len(s)], dim=-1) for j, s in enumerate(seqs[i : i + 64])]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=ROOT / "runs/scaling-counterfact/db.safetensors")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rho", default="0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = neuraldb.load_model("smollm2")
    db = first_rows(NeuralKVDatabase.load(args.db), args.n)
    facts = [db.fact(i) for i in db.ids()]
    t = db.template
    h = model_access.handles(model, db.layer)
    pad = templates.pad_id(tok)
    grid = [float(x) for x in args.rho.split(",")]

    # the library's previous-token keys (neuraldb.subject_gate); a zero row where the subject is one token
    enable_subject_gate(model, tok, db)
    prev = [k.float() if k.any() else None for k in db.relation_keys]
    multi = sum(p is not None for p in prev)
    contexts = context_texts(generate_prefixes(model, tok, n=3, length=10, template=t))

    def kept(seqs_pos):
        """share of (fact, ids, s) whose previous-token cosine passes each rho (one-token subjects always pass)."""
        qs = _states(h, [x[1] for x in seqs_pos], pad)
        cos = []
        for (j, _, s), q in zip(seqs_pos, qs):
            cos.append(1.0 if prev[j] is None else float(q[s - 1] @ prev[j]))
        return {rho: round(100 * sum(c > rho for c in cos) / max(1, len(cos)), 2) for rho in grid}, len(cos)

    own = []
    para = []
    for j, f in enumerate(facts):
        pre = f.prompt.partition("{}")[0]
        for ctx in contexts:
            ids, s = _subject_last(tok, t, ctx + f.text, len(ctx) + len(pre) + len(f.subject))
            own.append((j, ids, s))
        for p in f.paraphrases:
            at = p.find(f.subject)
            if at >= 0:
                ids, s = _subject_last(tok, t, p, at + len(f.subject))
                para.append((j, ids, s))
    own_kept, n_own = kept(own)
    para_kept, n_para = kept(para)

    # held-out text openings after calibration with the defaults
    corpus = [cal.read_corpus(WIKITEXT)]
    cal.calibrate(model, tok, db, corpus)
    keys = torch.nn.functional.normalize(db.keys.float(), dim=-1)
    thresholds = db.thresholds.cpu()
    ids = list(tok(corpus[0], add_special_tokens=False)["input_ids"])[: args.tokens]
    openings = []
    for start in range(0, len(ids), WINDOW):
        w = ids[start : start + WINDOW]
        if len(w) < 2:
            continue
        (q,) = _states(h, [w], pad)
        score, row = cal.best_rows(q, keys)
        opened = cal.opens(score, row, db.gamma, thresholds)
        opened[0] = False
        for p in torch.nonzero(opened).flatten().tolist():
            r = int(row[p])
            c = 1.0 if prev[r] is None else float(q[p - 1] @ prev[r])
            openings.append({"token": start + p, "row": r, "subject": facts[r].subject, "prev_cos": round(c, 3),
                             "text": tok.decode(w[max(0, p - 6) : p + 1])})  # fmt: skip
    out = {
        "rows": args.n, "multi_token_subjects": multi, "rho": grid,
        "own_contexts_kept_pct": own_kept, "own_contexts": n_own,
        "paraphrases_kept_pct": para_kept, "paraphrases": n_para,
        "text_openings": len(openings),
        "text_openings_left": {rho: sum(o["prev_cos"] > rho for o in openings) for rho in grid},
        "openings": openings,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in out.items() if k != "openings"}, indent=1))
    for o in openings:
        print(f"{o['prev_cos']:6.3f} {o['subject']!r:32.32s} {o['text']!r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
