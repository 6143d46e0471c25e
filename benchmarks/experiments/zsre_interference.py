"""Where zsRE facts lose efficacy in a large database: which row opens the gate at each position, and efficacy
under oracle gates (issue 30, "question-style facts").

    python benchmarks/experiments/zsre_interference.py --db runs/zsre1000.safetensors --n 1000 --eval-facts 200 \\
        --out docs/results/zsre-interference/diagnostic-as-edited.json

For each evaluated fact's teacher-forced sequences (template + prompt + target tokens, as ``neuraldb eval`` scores
them: the rewrite prompt, its paraphrases, and the loc question + "?" with its answer), the layer's down-projection
inputs are scored against the database's keys with the gate's rule (best row ``j = argmax_i cos(k, K[i])``, open
when ``cos > max(gamma, t[j])``; ``neuraldb_kernels.reference``) inside a forward hook that adds the chosen residuals
itself (the database is not patched), so one forward both records the openings and scores the targets.

Openings on the positions that can change a scored token (every real position but the last target token) are
classified: the fact's own row at the subject's last token, own row elsewhere, another row at the subject's last
token, another row before the subject, another row in the prompt after the subject, another row at a target token.

Gate modes (efficacy / generalization of the same facts, loc answers unchanged vs the unedited model):

- ``none``: unedited; ``real``: the gate as patched;
- ``no_others``: the real gate with every row but the fact's own shut (retrieval interference removed);
- ``own_alone``: only the fact's own row exists (a one-row database: it opens wherever its cosine passes);
- ``own_subject``: the fact's own residual at its subject's last token only, always (how it was optimised);
- ``latch``: the real gate, but once a row has opened in a sequence no other row may open later in it.

Loc sequences have no own row: ``no_others``/``own_*`` add nothing there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python")]

from neuraldb import facts as facts_mod
from neuraldb import templates
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import model_access
from neuraldb.editing.contexts import _subject_last
from neuraldb.evaluation.distractors import evaluated_subset
from neuraldb.evaluation.pipeline import select_facts
from neuraldb.evaluation.scoring import encode_pair
from neuraldb.evaluation.zsre import _loc_prompt, loc_answers

ZSRE = ROOT.parent / "shared/data/knowledge_editing/zsre_mend_eval_portability_1037.json.gz"
MODES = ("none", "real", "no_others", "own_alone", "own_subject", "latch")
CATS = ("own_subject", "own_elsewhere", "other_subject", "other_before_subject", "other_prompt_after", "other_target")


def subject_position(tok, template: str | None, prompt: str, subject: str, ctx_ids: list[int]) -> int:
    """Index of the subject's last token in ``ctx_ids`` (the prompt's ids in ``template``), -1 when the prompt does
    not contain the subject verbatim (a paraphrase may not) or the tokenisation disagrees."""
    at = prompt.rfind(subject)
    if at < 0 or not subject:
        return -1
    ids, s = _subject_last(tok, template, prompt, at + len(subject))
    return s if ids == ctx_ids else -1


def key_token(tok, template, fact) -> str:
    """The token a fact's key is read at (its subject's last token, as editing finds it)."""
    pre, _, _ = fact.prompt.partition("{}")
    ids, s = _subject_last(tok, template, fact.text, len(pre) + len(fact.subject))
    return tok.decode([ids[s]])


class Seq:
    __slots__ = ("fact", "ids", "kind", "n_cont", "n_ctx", "own", "subj")

    def __init__(self, fact, kind, ids, n_ctx, n_cont, own, subj):
        self.fact, self.kind, self.ids, self.n_ctx, self.n_cont, self.own, self.subj = (
            fact,
            kind,
            ids,
            n_ctx,
            n_cont,
            own,
            subj,
        )


def build_sequences(tok, template, facts, chosen, rows) -> list[Seq]:
    out = []
    for i in chosen:
        f = facts[i]
        items = [("rewrite", f.text, f.target_new)] + [("paraphrase", p, f.target_new) for p in f.paraphrases]
        items += [("loc", _loc_prompt(p), a) for p, a in zip(f.neighborhood, loc_answers(f)) if a]
        for kind, prompt, answer in items:
            ctx, cont = encode_pair(tok, templates.apply(template, prompt), " " + answer.strip())
            subj = -1 if kind == "loc" else subject_position(tok, template, prompt, f.subject, ctx)
            own = -1 if kind == "loc" else rows[i]
            out.append(Seq(i, kind, ctx + cont, len(ctx), len(cont), own, subj))
    return out


class Gate:
    """Forward hook on the down-projection: adds residuals by ``mode`` and records the real gate's choice."""

    def __init__(self, keys, values, thresholds, gamma):
        self.keys = torch.nn.functional.normalize(keys.float(), dim=-1)
        self.values = values.float()
        self.limit = torch.clamp(thresholds.float(), min=gamma)  # per row: max(gamma, t[j])
        self.gamma = gamma
        self.mode = "none"
        self.batch: list[Seq] = []
        self.record = None

    def __call__(self, module, args, output):
        q = torch.nn.functional.normalize(args[0].float(), dim=-1)  # (B, L, d1)
        scores = q @ self.keys.T
        best, row = scores.max(dim=-1)
        opened = best > self.limit[row]
        self.record = (best, row, opened)
        if self.mode == "none":
            return output
        B, L = row.shape
        add = torch.zeros(B, L, self.values.shape[1])
        for b, s in enumerate(self.batch):
            n = len(s.ids)
            if self.mode == "real":
                m = opened[b, :n]
                add[b, :n][m] = self.values[row[b, :n][m]]
            elif self.mode == "latch":
                first = None
                for p in range(n):
                    if not opened[b, p]:
                        continue
                    j = int(row[b, p])
                    if first is None:
                        first = j
                    if j == first:
                        add[b, p] = self.values[j]
            elif s.own < 0:
                continue
            elif self.mode == "no_others":
                m = opened[b, :n] & (row[b, :n] == s.own)
                add[b, :n][m] = self.values[s.own]
            elif self.mode == "own_alone":
                m = scores[b, :n, s.own] > self.limit[s.own]
                add[b, :n][m] = self.values[s.own]
            elif self.mode == "own_subject":
                if s.subj >= 0:
                    add[b, s.subj] = self.values[s.own]
            else:
                raise ValueError(self.mode)
        return output + add.to(output.dtype)


def classify(s: Seq, best, row, opened, counts: dict, per_seq: dict, hubs: dict) -> None:
    n = len(s.ids) - 1  # the last target token changes no scored token
    for p in range(1, n):  # position 0 is the template's BOS
        if not opened[p]:
            continue
        j = int(row[p])
        if j == s.own:
            cat = "own_subject" if p == s.subj else "own_elsewhere"
        elif p == s.subj:
            cat = "other_subject"
        elif p >= s.n_ctx:
            cat = "other_target"
        elif s.subj >= 0 and p < s.subj:
            cat = "other_before_subject"
        else:
            cat = "other_prompt_after"  # after the subject (or anywhere in the prompt when it has none)
        if p == s.n_ctx - 1 and j != s.own:
            per_seq["other_last_prompt"] = True
        counts[cat] += 1
        if j != s.own:
            hubs[j] = hubs.get(j, 0) + 1
        per_seq[cat] = per_seq.get(cat, 0) + 1


def run(model, tok, db, facts, chosen, modes, batch_size: int, log) -> dict:
    ids = db.ids()
    rows = {}
    for r, i in enumerate(ids):
        rows[i] = r
    # a fresh database from edit() has ids 0..n-1 in fact order; check the subjects agree
    fact_row = {}
    for i in chosen:
        r = rows.get(i, None)
        if r is None or db.fact(ids[r]).subject != facts[i].subject:
            raise SystemExit(f"fact {i} is not row {i} of the database")
        fact_row[i] = r
    template = db.template
    seqs = build_sequences(tok, template, facts, chosen, fact_row)
    gamma = 0.65 if db.gamma is None else float(db.gamma)
    gate = Gate(db.keys, db.values, db.thresholds, gamma)
    h = model_access.handles(model, db.layer)
    hook = h.down_proj.register_forward_hook(gate)
    pad = templates.pad_id(tok)
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k].ids))
    acc = {m: [None] * len(seqs) for m in modes}
    argmax = {m: [None] * len(seqs) for m in modes}
    counts = {c: 0 for c in CATS}
    hubs: dict[int, int] = {}
    per_seq = [{} for _ in seqs]
    real_positions = 0
    try:
        for mode in modes:
            gate.mode = mode
            t0 = time.time()
            for start in range(0, len(order), batch_size):
                batch = [seqs[k] for k in order[start : start + batch_size]]
                L = max(len(s.ids) for s in batch)
                x = torch.full((len(batch), L), pad, dtype=torch.long)
                for b, s in enumerate(batch):
                    x[b, : len(s.ids)] = torch.tensor(s.ids)
                gate.batch = batch
                with torch.inference_mode():
                    logits = model(input_ids=x).logits  # right padding: real positions never see the pads
                best, row, opened = gate.record
                for b, (k, s) in enumerate(zip(order[start : start + batch_size], batch)):
                    pos = torch.arange(s.n_ctx - 1, s.n_ctx - 1 + s.n_cont)
                    top = logits[b, pos].argmax(-1)
                    tgt = torch.tensor(s.ids[s.n_ctx :])
                    acc[mode][k] = float((top == tgt).float().mean())
                    argmax[mode][k] = top.tolist()
                    if mode == modes[0]:
                        classify(s, best[b], row[b], opened[b], counts, per_seq[k], hubs)
                        real_positions += len(s.ids) - 2
            log(f"{mode}: {time.time() - t0:.0f} s")
    finally:
        hook.remove()

    def metric(mode, kind):
        per_fact = {}
        for k, s in enumerate(seqs):
            if s.kind == kind:
                per_fact.setdefault(s.fact, []).append(acc[mode][k])
        vals = [sum(v) / len(v) for v in per_fact.values()]
        return round(100 * sum(vals) / len(vals), 2) if vals else None

    def unchanged(mode):
        same = tot = 0
        for k, s in enumerate(seqs):
            if s.kind == "loc" and "none" in argmax:
                a, b = argmax["none"][k], argmax[mode][k]
                same += sum(int(u == v) for u, v in zip(a, b))
                tot += len(a)
        return round(100 * same / tot, 2) if tot else None

    table = {
        m: {
            "efficacy": metric(m, "rewrite"),
            "generalization": metric(m, "paraphrase"),
            "specificity": metric(m, "loc"),
            "loc_unchanged": unchanged(m),
        }
        for m in modes
    }
    by_kind = {}
    for kind in ("rewrite", "paraphrase", "loc"):
        ks = [k for k, s in enumerate(seqs) if s.kind == kind]
        d = {"sequences": len(ks)}
        if kind != "loc":
            d["subject_found"] = sum(seqs[k].subj >= 0 for k in ks)
        for c in CATS:
            d[f"seqs_with_{c}"] = sum(1 for k in ks if per_seq[k].get(c))
            d[f"openings_{c}"] = sum(per_seq[k].get(c, 0) for k in ks)
        d["seqs_other_at_last_prompt_token"] = sum(1 for k in ks if per_seq[k].get("other_last_prompt"))
        d["seqs_with_any_other"] = sum(1 for k in ks if any(per_seq[k].get(c) for c in CATS[2:]))
        if kind != "loc":
            d["seqs_own_closed_at_subject"] = sum(
                1 for k in ks if seqs[k].subj >= 0 and not per_seq[k].get("own_subject")
            )
        by_kind[kind] = d
    # efficacy split by whether another row opened anywhere in the rewrite sequence
    split = {}
    if "real" in modes:
        for kind in ("rewrite", "paraphrase"):
            for flag in (True, False):
                ks = [
                    k
                    for k, s in enumerate(seqs)
                    if s.kind == kind and bool(any(per_seq[k].get(c) for c in CATS[2:])) == flag
                ]
                key = f"{kind}_{'with' if flag else 'without'}_other_rows"
                split[key] = {"sequences": len(ks)} | {
                    m: round(100 * sum(acc[m][k] for k in ks) / len(ks), 2) if ks else None for m in modes
                }
    other_total = sum(hubs.values())
    top = sorted(hubs.items(), key=lambda kv: -kv[1])[:10]
    hub_rows = {
        "rows_opening_in_other_facts_sequences": len(hubs),
        "openings": other_total,
        "top10_share": round(sum(c for _, c in top) / other_total, 3) if other_total else None,
        "top10": [
            {
                "row": r,
                "openings": c,
                "fact": db.fact(ids[r]).text,
                "key_token": key_token(tok, template, db.fact(ids[r])),
            }
            for r, c in top
        ],
    }
    return {
        "facts": len(chosen),
        "rows": len(ids),
        "gamma": gamma,
        "thresholds_set": int((db.thresholds > -1).sum()),
        "positions_classified": real_positions,
        "openings": counts,
        "by_kind": by_kind,
        "modes": table,
        "split": split,
        "rows_opening_elsewhere": hub_rows,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--facts", type=Path, default=ZSRE)
    ap.add_argument("--n", type=int, help="facts the database was edited from (default: its size)")
    ap.add_argument("--eval-facts", type=int, help="a seeded random subset of the facts (as neuraldb eval)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import neuraldb

    db = NeuralKVDatabase.load(args.db)
    n = args.n or len(db)
    facts = select_facts(facts_mod.load(args.facts), "zsre", n_facts=n, zsre_target="answers")
    chosen = evaluated_subset(len(facts), args.eval_facts, args.seed)
    model, tok = neuraldb.load_model("smollm2")
    modes = list(dict.fromkeys(["real"] + args.modes))  # the real gate first: its pass records the openings
    res = run(model, tok, db, facts, chosen, modes, args.batch_size, lambda line: print(line, flush=True))
    res["command"] = "python benchmarks/experiments/zsre_interference.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    res["db"] = str(args.db)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
