"""Where held-out text opens a calibrated database's gates, and how much of the perplexity change each opening makes.

    python benchmarks/experiments/opening_anatomy.py --db runs/scaling-counterfact/db.safetensors --n 1000

The first ``--n`` rows of ``--db``, thresholds calibrated as ``neuraldb calibrate`` does by default (WikiText-2 test
tokens [65536, 131072)), then the first ``--tokens`` tokens (the perplexity the scaling and calibration runs report,
disjoint from the calibration text) scored in 512-token windows, unpatched and patched. For every opening: its row's
subject, whether the text so far in that window names the subject (the whole subject, or a word of it of at least
four letters), and the change in log-loss it causes: on the token right after it and on the rest of its window
(causal: a position's loss moves only if some position at or before it opened). The question it answers: is the
perplexity that editing costs on ordinary text spurious openings, or the edit doing its job where the text talks
about an edited subject?
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]

import neuraldb
from _common import machine_description
from neuraldb import calibration as cal
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import model_access
from scaling_run import first_rows

WIKITEXT = ROOT.parent / "shared/data/general_eval/wikitext2_raw_test.txt.gz"
WINDOW = 512


def _named(subject: str, text: str) -> str:
    """'subject', 'word' or '' : how ``text`` names ``subject``."""
    low = text.lower()
    if subject.lower() in low:
        return "subject"
    words = [w for w in re.findall(r"\w+", subject.lower()) if len(w) >= 4]
    return "word" if any(re.search(rf"\b{re.escape(w)}\b", low) for w in words) else ""


def _window_scores(model, h, ids: list[int], keys, thresholds, gamma):
    """Per-position log-loss of tokens 1.. of the window, and the opened positions with their rows."""
    got = {}

    def grab(mod, inp, out):
        got["q"] = model_access.by_token(inp[0], 1)[0].float()

    hook = h.down_proj.register_forward_hook(grab)
    try:
        with neuraldb.disabled(model), torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
    finally:
        hook.remove()
    target = torch.tensor(ids[1:])
    base = -torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    edited = -torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    q = torch.nn.functional.normalize(got["q"], dim=-1)
    score, row = cal.best_rows(q, keys)
    opened = cal.opens(score, row, gamma, thresholds)
    opened[0] = False  # the window's first token is context only, as perplexity and calibration read it
    return base, edited, [(int(p), int(row[p]), float(score[p])) for p in torch.nonzero(opened).flatten()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=ROOT / "runs/scaling-counterfact/db.safetensors")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored (from the start)")
    ap.add_argument("--calibrate-tokens", type=int, default=65536)
    ap.add_argument("--calibrate-skip", type=int, default=65536)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = neuraldb.load_model("smollm2")
    db = first_rows(NeuralKVDatabase.load(args.db), args.n)
    corpus = [cal.read_corpus(WIKITEXT)]  # as calibration_run.py and the general evaluation read it
    report = cal.calibrate(model, tok, db, corpus, tokens=args.calibrate_tokens, skip=args.calibrate_skip,
                           delta=args.delta, margin=args.margin)  # fmt: skip
    neuraldb.patch_model(model, db)
    h = model_access.handles(model, db.layer)
    keys = torch.nn.functional.normalize(db.keys.float(), dim=-1)
    thresholds, gamma = db.thresholds.cpu(), db.gamma
    ids = list(tok(corpus[0], add_special_tokens=False)["input_ids"])[: args.tokens]
    base_sum = edited_sum = 0.0
    n_scored = 0
    openings = []
    for start in range(0, len(ids), WINDOW):
        w = ids[start : start + WINDOW]
        if len(w) < 2:
            continue
        base, edited, opened = _window_scores(model, h, w, keys, thresholds, gamma)
        base_sum, edited_sum, n_scored = (
            base_sum + float(base.sum()),
            edited_sum + float(edited.sum()),
            n_scored + len(w) - 1,
        )
        for k, (p, row, score) in enumerate(opened):
            nxt = opened[k + 1][0] if k + 1 < len(opened) else len(w) - 1
            fact = db.fact(db.ids()[row])
            text = tok.decode(w[: p + 1])
            openings.append({
                "token": start + p, "row": row, "score": round(score, 4),
                "threshold": round(float(thresholds[row]), 4), "subject": fact.subject, "target": fact.target_new,
                "named": _named(fact.subject, text), "context": text[-80:], "next": tok.decode(w[p + 1 : p + 2]),
                "next_dnll": round(float(edited[p] - base[p]), 3),
                "window_dnll": round(float((edited[p:nxt] - base[p:nxt]).sum()), 3),
            })  # fmt: skip
    total = edited_sum - base_sum
    by_kind: dict[str, dict] = {}
    for o in openings:
        k = by_kind.setdefault(o["named"] or "not named", {"openings": 0, "dnll": 0.0})
        k["openings"] += 1
        k["dnll"] = round(k["dnll"] + o["window_dnll"], 3)
    out = {
        "db": str(args.db), "rows": args.n, "held_out_tokens": n_scored,
        "calibration": {"tokens": args.calibrate_tokens, "skip": args.calibrate_skip, "delta": args.delta,
                        "margin": args.margin, "summary": report.summary()},
        "ppl_unedited": round(math.exp(base_sum / n_scored), 3), "ppl_edited": round(math.exp(edited_sum / n_scored), 3),
        "dnll_total": round(total, 3), "openings": len(openings), "by_kind": by_kind,
        "machine": machine_description(), "list": openings,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in out.items() if k not in ("list", "machine")}, indent=1))
    for o in sorted(openings, key=lambda o: -o["window_dnll"])[:25]:
        print(f"{o['window_dnll']:7.2f} {o['named'] or '-':8s} {o['subject']!r:32.32s} -> {o['target']!r:14.14s} "
              f"...{o['context'][-50:]!r} | {o['next']!r}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
