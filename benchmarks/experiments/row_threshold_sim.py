"""General-text gate openings as real facts accumulate, and what a per-row gate threshold would do to them,
simulated on real keys (the database has no such column yet).

    python benchmarks/experiments/row_threshold_sim.py --n 1000 \\
        --text ../shared/data/general_eval/wikitext2_raw_test.txt.gz --tokens 4096 [--start 4096 --tag heldout]
    python benchmarks/experiments/row_threshold_sim.py --n 0 --sizes 1000,2000,5000,10000,24140 --text ... --tag growth \\
        --facts ../shared/data/knowledge_editing/{counterfact_rome_format_1031,counterfact_mend_edit,\\
counterfact_mend_train,counterfact_mend_val,zsre_mend_train_1k,zsre_mend_eval_portability_1037,\\
zsre_knowedit_test_all_1301}.json.gz          # every distinct fact of these, the openings per size

Some keys open the gate on ordinary text: the key is read at the subject's last token, and where that token is a
common word the state there is mostly the word's ("Chrysler 200" fires on " in 200"; results/README.md). This
computes, for the first ``--n`` distinct facts of the ``--facts`` files (0: all), under the model's editing defaults:

- the keys, as ``neuraldb.edit`` builds them;
- each fact's own states: its rewrite prompt (bare) and the paraphrases that contain the subject, at the subject's
  last token;
- negatives: the subject's last word alone (as written and lower-cased) after each of a few function words
  ("in 200", "the 200", ...), no prefix;
- the states of the first ``--tokens`` tokens of a general text, in the database's template.

A row's threshold, for a subject of several words: ``t = min(max negative cosine + delta, bare-prompt cosine -
margin)``, and the row's gate opens only where the score exceeds ``max(gamma, t)``. Because that is never below
gamma, an exact scan at gamma followed by the row's own test is the same gate. Reported per (delta, margin):

- the general-text positions and rows that open;
- the share of own states that retrieve their own row through the gate (rewrite and paraphrase).

and, with ``--sizes``, the share of text positions whose best key passes gamma (0.65, 0.7, 0.75) for the first n
facts at each size. Results: ``benchmarks/results/row_threshold_sim[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]

import neuraldb
from _common import machine_description, write_json
from general_text_gate import read_text, text_states
from neuraldb import templates
from neuraldb.editing import compute_keys
from neuraldb.editing.defaults import resolve
from neuraldb.facts import Fact

FUNCTION_WORDS = ("in", "the", "of", "and", "his", "a")
GRID = [(None, None)] + [(d, m) for d in (0.0, 0.02) for m in (0.05, 0.1, 0.15)]


def own_prompts(facts: list[Fact]) -> tuple[list[Fact], list[int], list[bool]]:
    """One Fact per own prompt (the rewrite, then the paraphrases naming the subject once), its fact's index, and
    whether it is the rewrite."""
    out, owner, rewrite = [], [], []
    for i, f in enumerate(facts):
        texts = [f.text] + [p for p in f.paraphrases if p.count(f.subject) == 1 and "{" not in p and "}" not in p]
        for j, text in enumerate(texts):
            out.append(Fact(f.subject, text.replace(f.subject, "{}", 1), f.target_new))
            owner.append(i)
            rewrite.append(j == 0)
    return out, owner, rewrite


def negatives(facts: list[Fact]) -> tuple[list[Fact], list[int]]:
    out, owner = [], []
    for i, f in enumerate(facts):
        word = f.subject.split()[-1]
        for variant in dict.fromkeys([word, word.lower()]):
            for fw in FUNCTION_WORDS:
                out.append(Fact(variant, f"{fw} {{}}", "x"))
                owner.append(i)
    return out, owner


def distinct_facts(paths: list[str], n: int) -> list[Fact]:
    """The facts of ``paths`` in order, each (subject, prompt) once; the first ``n`` (0: all)."""
    out, seen = [], set()
    for path in paths:
        for f in neuraldb.facts.load(path):
            if (f.subject, f.prompt) not in seen:
                seen.add((f.subject, f.prompt))
                out.append(f)
    return out[:n] if n else out


def openings_by_size(keys: torch.Tensor, text: torch.Tensor, n: int) -> dict:
    best = (text @ keys[:n].T).max(-1).values
    return {
        "facts": min(n, len(keys)),
        "open_pct": {g: round(100 * float((best > g).float().mean()), 2) for g in (0.65, 0.7, 0.75)},
    }


def gate(keys: torch.Tensor, states: torch.Tensor, gamma: float, thresholds: torch.Tensor | None):
    """``(opens, row)`` per state: the best key (unit rows) and whether its gate opens at max(gamma, its threshold)."""
    best, row = (states @ keys.T).max(-1)
    bar = torch.full_like(best, gamma) if thresholds is None else thresholds[row].clamp(min=gamma)
    return best > bar, row


def simulate(keys, text, own_states, own_rows, rewrite, neg_states, neg_rows, several_words, gamma) -> list:
    """One result per (delta, margin) of GRID; all states and keys unit rows."""
    m = len(keys)
    neg = torch.full((m,), -1.0).scatter_reduce(0, neg_rows, (neg_states * keys[neg_rows]).sum(-1), "amax")
    bare = torch.full((m,), -1.0).scatter_reduce(
        0, own_rows[rewrite], (own_states[rewrite] * keys[own_rows[rewrite]]).sum(-1), "amax"
    )
    out = []
    for delta, margin in GRID:
        thr = None
        if delta is not None:
            thr = torch.where(several_words, torch.minimum(neg + delta, bare - margin), torch.full((m,), -1.0))
        opens, row = gate(keys, text, gamma, thr)
        own_open, own_row = gate(keys, own_states, gamma, thr)
        hit = own_open & (own_row == own_rows)
        out.append(
            {
                "delta": delta,
                "margin": margin,
                "rows_raised": 0 if thr is None else int((thr > gamma).sum()),
                "text_open_positions": int(opens.sum()),
                "text_open_rows": len(set(row[opens].tolist())),
                "rewrite_pct": round(100 * float(hit[rewrite].float().mean()), 2),
                "paraphrase_pct": round(100 * float(hit[~rewrite].float().mean()), 2),
            }
        )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--facts",
        nargs="+",
        default=[str(ROOT.parent / "shared/data/knowledge_editing/counterfact_rome_format_1031.json.gz")],
    )
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sizes", default="", help="comma-separated fact counts to report text openings at")
    ap.add_argument("--text", required=True, help="a text file (.gz allowed), e.g. WikiText-2's raw test split")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--start", type=int, default=0, help="skip this many tokens of the text first (a held-out stretch)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = neuraldb.load_model(args.model)
    facts = distinct_facts(args.facts, args.n)
    cfg = resolve(model)
    template = templates.default_template(tok)
    unit = torch.nn.functional.normalize
    with torch.inference_mode():
        keys = unit(compute_keys(model, tok, facts), dim=-1)
        own, own_rows, rewrite = own_prompts(facts)
        own_states = unit(compute_keys(model, tok, own, n_prefixes=0), dim=-1)
        neg, neg_rows = negatives(facts)
        neg_states = unit(compute_keys(model, tok, neg, n_prefixes=0), dim=-1)
        ids, states = text_states(
            model, tok, template, cfg.layer, read_text(args.text), tokens=args.tokens, start=args.start
        )
    several = torch.tensor([len(f.subject.split()) > 1 for f in facts])
    rows = simulate(
        keys,
        states,
        own_states,
        torch.tensor(own_rows),
        torch.tensor(rewrite),
        neg_states,
        torch.tensor(neg_rows),
        several,
        cfg.gamma,
    )
    print(
        f"{len(facts)} facts ({int(several.sum())} of several words), gamma {cfg.gamma}, layer {cfg.layer}; "
        f"{len(ids)} text positions, {len(own)} own prompts"
    )
    print("| delta | margin | rows raised | text positions open | rows | rewrite % | paraphrase % |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['delta']} | {r['margin']} | {r['rows_raised']} | {r['text_open_positions']} | "
            f"{r['text_open_rows']} | {r['rewrite_pct']} | {r['paraphrase_pct']} |"
        )
    growth = [openings_by_size(keys, states, int(n)) for n in args.sizes.split(",") if n]
    for g in growth:
        print(
            f"first {g['facts']} facts: text positions open "
            + ", ".join(f"{pct}% at gamma {gm}" for gm, pct in g["open_pct"].items())
        )
    out = ROOT / "benchmarks" / "results" / ("row_threshold_sim" + (f"_{args.tag}" if args.tag else "") + ".json")
    write_json(
        out,
        {
            "model": args.model,
            "facts": args.facts,
            "n": len(facts),
            "gamma": cfg.gamma,
            "layer": cfg.layer,
            "text": args.text,
            "start": args.start,
            "tokens": len(ids),
            "function_words": FUNCTION_WORDS,
            "rows": rows,
            "growth": growth,
            "machine": machine_description(),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
