"""Which database rows ZsRE prompts retrieve before and after the App. J.5 deletion (even-indexed facts removed).

    python benchmarks/experiments/zsre_deletion_hits.py --db smollm2-zsre100.safetensors \\
        --facts ../shared/data/knowledge_editing/zsre_mend_eval_portability_1037.json.gz [--gamma 0.75]

The database must hold the first N facts of the file in order (as ``neuraldb eval --dataset zsre --save-db`` writes
it). For the rewrite and paraphrase prompts (each followed by its target, as evaluate_zsre scores them) it counts
the prompts that retrieve, at some position, their own row, another fact's row, and after the deletion any
remaining row: one of a fact with the same subject (ZsRE repeats facts with reworded questions) or another.
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
from neuraldb import facts as facts_mod
from neuraldb import templates
from neuraldb.evaluation.gate import prompt_hits
from neuraldb.evaluation.pipeline import select_facts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--db", required=True)
    ap.add_argument("--facts", required=True)
    ap.add_argument("--gamma", type=float, default=None, help="gate threshold (default: the database's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = neuraldb.load_model(args.model)
    db = neuraldb.NeuralKVDatabase.load(args.db)
    facts = select_facts(facts_mod.load(args.facts), "zsre", n_facts=len(db))
    if [db.fact(i).subject for i in db.ids()] != [f.subject for f in facts]:
        raise SystemExit("the database does not hold the file's first facts in order")
    ctxs, conts, index = [], [], []
    for i, f in enumerate(facts):
        for kind, prompts in (("rewrite", [f.text]), ("paraphrase", list(f.paraphrases))):
            for p in prompts:
                index.append((i, kind))
                ctxs.append(templates.apply(db.template, p))
                conts.append([" " + f.target_new.strip()])
    # odd rows first: the first len(odd) rows are the database after the deletion
    order = list(range(1, len(db), 2)) + list(range(0, len(db), 2))
    after, before = prompt_hits(
        model,
        tok,
        ctxs,
        conts,
        db.layer,
        db.keys[torch.tensor(order)],
        db.gamma if args.gamma is None else args.gamma,
        sizes=[len(db) // 2, len(db)],
        margin=0.0,
    )
    out: dict = {}
    for (i, kind), hb, ha in zip(index, before, after):
        hb, ha = [order[r] for r in hb], [order[r] for r in ha]
        c = out.setdefault(
            f"{'even (deleted)' if i % 2 == 0 else 'odd (kept)'} {kind}",
            dict.fromkeys(
                (
                    "prompts",
                    "before_own",
                    "before_other",
                    "after_own",
                    "after_any",
                    "after_same_subject",
                    "after_other_subject",
                ),
                0,
            ),
        )
        c["prompts"] += 1
        c["before_own"] += i in hb
        c["before_other"] += any(r != i for r in hb)
        c["after_own"] += i in ha
        c["after_any"] += bool(ha)
        c["after_same_subject"] += any(r != i and facts[r].subject == facts[i].subject for r in ha)
        c["after_other_subject"] += any(facts[r].subject != facts[i].subject for r in ha)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
