"""Which key makes a question-style fact's row open on its paraphrases (issue 30, "question-style facts").

    python benchmarks/experiments/zsre_key_contexts.py --n 1000 --eval-facts 200 \\
        --out docs/results/zsre-interference/key-contexts.json

A zsRE fact's subject usually comes after its question words ("What language is IRIB Amoozesh written in?"), so the
state at the subject's last token, where the key is read, carries those words; a paraphrase ("In which language
...") reaches the same subject through other words and its state falls away from the key. This script compares
keys read in other contexts, forward passes only (no residuals):

- ``prompt``: the library's key (``compute_keys``: the bare prompt and the editing prefixes);
- ``generic``: the mean of the keys of the subject after each of ``GENERIC`` (question starts written here, none
  from the dataset), so no fact's own question words are in it;
- ``mix:W``: unit ``prompt`` and unit ``generic`` keys, weighted ``W`` and ``1 - W``.

For every evaluated fact's rewrite prompt and paraphrases it reads the state at the subject's last token and
reports, per key set, the share where the fact's own row is the best of all ``--n`` rows and above gamma (the
gate as patched, without thresholds: the row opens), the median own cosine and the median margin over the best
other row. MEND's zsRE records repeat subjects (the same question worded twice is two records with the same
answer), so another row winning is often a fact with the same subject and target: ``right_target_opens`` counts
those as well. For the loc questions (other subjects) it reports the share of sequences where any position's best
row passes gamma (what could open there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks" / "experiments")]

import neuraldb
from neuraldb import facts as facts_mod
from neuraldb import templates
from neuraldb.editing import compute_keys, model_access
from neuraldb.editing.defaults import defaults_for
from neuraldb.evaluation.distractors import evaluated_subset
from neuraldb.evaluation.pipeline import select_facts
from neuraldb.evaluation.zsre import _loc_prompt
from neuraldb.facts import Fact
from zsre_interference import ZSRE, subject_position

GENERIC = ("{}", "What is {}", "Who is {}", "Where is {}", "When was {}", "Which {}", "Tell me about {}", "About {}")


def generic_keys(model, tok, facts, layer: int) -> torch.Tensor:
    ks = [
        torch.nn.functional.normalize(
            compute_keys(model, tok, [Fact(f.subject, g, f.target_new) for f in facts], layer), dim=-1
        )
        for g in GENERIC
    ]
    return torch.stack(ks).mean(0)


def states(h, tok, template, seqs: list[list[int]], pad_id: int, batch: int = 64) -> list[torch.Tensor]:
    out = []
    for i in range(0, len(seqs), batch):
        q, m = model_access.down_proj_inputs(h, seqs[i : i + batch], pad_id)
        out += [q[b, : int(m[b].sum())] for b in range(q.shape[0])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--eval-facts", type=int, default=200)
    ap.add_argument("--gamma", type=float, default=0.65)
    ap.add_argument("--mix", type=float, nargs="*", default=[0.75, 0.5, 0.25])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=8, help="paraphrases another row wins, shown per key set")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, tok = neuraldb.load_model("smollm2")
    facts = select_facts(facts_mod.load(ZSRE), "zsre", n_facts=a.n, zsre_target="answers")
    layer = defaults_for(model).layer
    template = templates.default_template(tok)
    base = torch.nn.functional.normalize(compute_keys(model, tok, facts, layer), dim=-1)
    gen = generic_keys(model, tok, facts, layer)
    sets = {"prompt": base, "generic": torch.nn.functional.normalize(gen, dim=-1)}
    for w in a.mix:
        sets[f"mix:{w}"] = torch.nn.functional.normalize(w * base + (1 - w) * sets["generic"], dim=-1)
    h = model_access.handles(model, layer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    chosen = evaluated_subset(len(facts), a.eval_facts, 0)
    seqs, meta = [], []
    for i in chosen:
        f = facts[i]
        for kind, prompt in [("rewrite", f.text)] + [("paraphrase", p) for p in f.paraphrases]:
            ids = templates.encode(tok, template, prompt)
            s = subject_position(tok, template, prompt, f.subject, ids)
            if s >= 0:
                seqs.append(ids)
                meta.append((kind, i, s))
        for p in f.neighborhood:
            seqs.append(templates.encode(tok, template, _loc_prompt(p)))
            meta.append(("loc", i, -1))
    with torch.no_grad():
        st = states(h, tok, template, seqs, pad)
    report = {"facts": a.n, "evaluated": len(chosen), "gamma": a.gamma, "generic": GENERIC, "sets": {}}
    for name, K in sets.items():
        acc: dict[str, dict[str, list]] = {}
        for n_seq, ((kind, i, s), x) in enumerate(zip(meta, st)):
            q = torch.nn.functional.normalize(x, dim=-1)
            sc = q @ K.T
            d = acc.setdefault(
                kind, {"opens": [], "own": [], "margin": [], "any": [], "below": 0, "beaten": 0, "ex": []}
            )
            d.setdefault("same_target", 0)
            d.setdefault("same_subject", 0)
            if kind == "loc":
                d["any"].append(bool((sc.max(-1).values > a.gamma).any()))
                continue
            row = sc[s]
            own = float(row[i])
            other = float(torch.cat([row[:i], row[i + 1 :]]).max())
            d["opens"].append(own > other and own > a.gamma)
            if own <= a.gamma:
                d["below"] += 1
            elif own <= other:
                d["beaten"] += 1
                j = int(row.argmax())
                d["same_target"] += facts[j].target_new == facts[i].target_new
                d["same_subject"] += facts[j].subject == facts[i].subject
                if len(d["ex"]) < a.examples:
                    shown = [
                        tok.decode(seqs[n_seq][: s + 1]),
                        facts[i].text,
                        facts[j].text,
                        round(own, 3),
                        round(other, 3),
                    ]
                    d["ex"].append(shown)
            d["own"].append(own)
            d["margin"].append(own - other)
        res = {}
        for kind, d in acc.items():
            if kind == "loc":
                res[kind] = {"sequences": len(d["any"]), "any_row_above_gamma": 100 * sum(d["any"]) / len(d["any"])}
            else:
                res[kind] = {
                    "sequences": len(d["opens"]),
                    "own_row_opens": round(100 * sum(d["opens"]) / len(d["opens"]), 1),
                    "median_own_cos": round(statistics.median(d["own"]), 3),
                    "median_margin": round(statistics.median(d["margin"]), 3),
                    "own_below_gamma": d["below"],
                    "other_row_wins": d["beaten"],
                    "of_which_same_target": d["same_target"],
                    "of_which_same_subject": d["same_subject"],
                    "right_target_opens": round(100 * (sum(d["opens"]) + d["same_target"]) / len(d["opens"]), 1),
                    "examples_other_wins": d["ex"],
                }
        report["sets"][name] = res
        print(name, json.dumps(res))
    report["seconds"] = round(time.time() - t0, 1)
    report["command"] = "python " + " ".join(sys.argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
