"""Would a relation check behind the subject gate separate a fact's own questions from other questions about its
subject? Simulated on real keys, before any of it is built.

    python benchmarks/experiments/relation_gate_sim.py --db DB --facts FILE [--n 100] [--text wikitext.txt.gz]

For each row j of ``--db`` (facts edited from ``--facts``, in order), a relation key ``Q_j``: the down-projection
input of the database's layer at the last token of the fact's bare prompt (its subject key is read at the subject's
last token). The simulated gate of a position s opens row j when the subject gate does (``j`` the best row,
``cos(q_s, K_j) > gamma``) and some position t in ``[s, s + W]`` of the same sequence has ``cos(q_t, Q_j) > rho``.
Reported per rho, for:

- own prompts (the rewrite prompt) and rephrased prompts: the share whose own row opens (what efficacy and
  generalization need);
- same-subject prompts of another relation (KnowEdit ``locality.Relation_Specificity``; CounterFact has none): the
  share where any row opens (what same-subject locality needs to be 0);
- a general text (``--text``): the share of positions where a row opens.
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
from neuraldb import facts as facts_mod
from neuraldb import templates
from neuraldb.calibration import read_corpus, text_states
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import model_access

RHOS = (None, 0.3, 0.4, 0.5, 0.6, 0.7)


def states_of(model, tok, layer, template, texts):
    """Unit down-projection inputs at every position of each text (in the template), one list entry per text."""
    h = model_access.handles(model, layer)
    pad = templates.pad_id(tok)
    out = []
    for start in range(0, len(texts), 32):
        seqs = templates.encode_batch(tok, template, texts[start : start + 32])
        q, _ = model_access.down_proj_inputs(h, seqs, pad)
        q = torch.nn.functional.normalize(q, dim=-1)
        out += [q[i, : len(s)] for i, s in enumerate(seqs)]
    return out


def gate(states, keys, rel, gamma, rho, window):
    """Per sequence: the set of rows opened anywhere in it."""
    opened = []
    for q in states:
        score, row = (q @ keys.T).max(-1)
        rows = set()
        for s in (score > gamma).nonzero().flatten().tolist():
            j = int(row[s])
            if rho is None or float((q[s : s + window + 1] @ rel[j]).max()) > rho:
                rows.add(j)
        opened.append(rows)
    return opened


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--facts", type=Path, required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--window", type=int, default=24)
    ap.add_argument("--text", type=Path)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, tok = neuraldb.load_model("smollm2")
    db = NeuralKVDatabase.load(args.db)
    n = min(args.n, len(db))
    facts = [db.fact(i) for i in db.ids()[:n]]
    raw = {f.text: f for f in facts_mod.load(args.facts)}
    keys = torch.nn.functional.normalize(db.keys[:n].float(), dim=-1)
    layer, gamma, template = db.layer, db.gamma, db.template
    with torch.inference_mode():
        own = states_of(model, tok, layer, template, [f.text for f in facts])
        rel = torch.stack([s[-1] for s in own])
        reph, reph_owner, same, same_owner = [], [], [], []
        for j, f in enumerate(facts):
            for p in f.paraphrases:
                reph.append(p)
                reph_owner.append(j)
            loc = (raw.get(f.text) or f).extras.get("locality", {}) if hasattr(f, "extras") else {}
            for item in loc.get("Relation_Specificity", []):
                same.append(item["prompt"])
                same_owner.append(j)
        reph_states = states_of(model, tok, layer, template, reph) if reph else []
        same_states = states_of(model, tok, layer, template, same) if same else []
        text = None
        if args.text:
            text = text_states(model, tok, layer, [read_corpus(args.text)], tokens=args.tokens)
    results = []
    for rho in RHOS:
        r = {"rho": rho}
        r["own_pct"] = 100 * sum(j in o for j, o in enumerate(gate(own, keys, rel, gamma, rho, args.window))) / n
        if reph:
            hits = gate(reph_states, keys, rel, gamma, rho, args.window)
            r["rephrase_pct"] = 100 * sum(j in o for j, o in zip(reph_owner, hits)) / len(reph)
        if same:
            hits = gate(same_states, keys, rel, gamma, rho, args.window)
            r["same_subject_open_pct"] = 100 * sum(bool(o) for o in hits) / len(same)
        if text is not None:
            score, row = (text @ keys.T).max(-1)
            open_ = score > gamma
            if rho is not None:
                # positions as one sequence of windows: the confirm looks W positions ahead
                conf = torch.zeros_like(open_)
                for s in open_.nonzero().flatten().tolist():
                    conf[s] = float((text[s : s + args.window + 1] @ rel[int(row[s])]).max()) > rho
                open_ = conf
            r["text_open_pct"] = round(100 * float(open_.float().mean()), 3)
        results.append(r)
        print(json.dumps(r))
    if args.out:
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
