"""Editing speed and quality on CounterFact (ROME format): s/fact for keys+residuals, efficacy/generalization/specificity.

    python benchmarks/bench_editing.py --n 200                       # neuraldb.edit with the model's defaults + quality
    python benchmarks/bench_editing.py --n 10 --naive --no-eval      # same-run before/after timing vs the naive loop
    python benchmarks/bench_editing.py --n 100 --sweep layer=4,6,8 n_prefixes=2,5   # small grid
    python benchmarks/bench_editing.py --model gemma3-270m --n 100
    python benchmarks/bench_editing.py --dataset zsre --n 60 --no-eval --sweep extra_steps=0,20   # speed, steps only
    python benchmarks/bench_editing.py --n 1000 --device cuda --no-eval --set batch_size=256   # on a GPU: facts/s
    python benchmarks/bench_editing.py --n 200 --warm-from runs/scaling-counterfact/db.safetensors \
        --set compute_dtype=float32 --sweep warm_start=False,True          # warm starts from a big database

``--warm-from DB``: each run appends the facts to DB's rows (minus the edited facts themselves), so that
``warm_start=True`` finds starts there; quality is measured on a database of the new rows alone, as without it.

Quality uses ROME's success definitions with whole-target summed log-probabilities (P(new) > P(true) on the
rewrite prompt and the paraphrases, the reverse on the neighborhood prompts), every prompt inside the database's
template. Post-edit scores are computed exactly but cheaply (neuraldb.evaluation.gate): a sequence on which the
gate fires at no position is unchanged by the patch, so it keeps its pre-edit score; the rest are re-scored.
Results are appended as JSON lines to benchmarks/results/editing.jsonl.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

from _common import machine_description
from neuraldb import templates
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import EditConfig, edit, model_access
from neuraldb.editing.contexts import context_texts, fact_rows, generate_prefixes
from neuraldb.editing.defaults import resolve
from neuraldb.evaluation.gate import gate_fires, merge_rescored
from neuraldb.facts import Fact
from neuraldb.models import load_model

DATA = Path(os.environ.get("NEURALDB_DATA_DIR", ROOT.parent / "shared" / "data")) / "knowledge_editing"
RESULTS = ROOT / "benchmarks" / "results" / "editing.jsonl"


def load_zsre(n: int, offset: int = 0) -> list[Fact]:
    """The MEND eval records with ROME/MEMIT's target (``answers[0]``), as ``neuraldb eval --dataset zsre`` edits
    them."""
    from neuraldb import facts as facts_mod
    from neuraldb.evaluation.pipeline import select_facts

    recs = facts_mod.load(DATA / "zsre_mend_eval_portability_1037.json.gz")
    return select_facts(recs, "zsre", n_facts=n, offset=offset)


def load_counterfact(n: int, offset: int = 0) -> list[Fact]:
    with gzip.open(DATA / "counterfact_rome_format_1031.json.gz", "rt", encoding="utf-8") as f:
        recs = json.load(f)
    out = []
    for r in recs[offset : offset + n]:
        rw = r["requested_rewrite"]
        out.append(
            Fact(
                rw["subject"],
                rw["prompt"],
                rw["target_new"]["str"],
                rw["target_true"]["str"],
                tuple(r["paraphrase_prompts"]),
                tuple(r["neighborhood_prompts"]),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The naive loop (what a one-fact-at-a-time ROME/MEMIT-style implementation does): the "before" of the speed table
# ---------------------------------------------------------------------------------------------------------------------


def naive_edit(model, tok, facts, cfg: EditConfig, template: str):
    """One fact at a time; every step runs every context through the whole model and the full vocabulary."""
    h = model_access.handles(model, cfg.layer)
    prefixes = generate_prefixes(model, tok, n=cfg.n_prefixes, length=cfg.prefix_len, template=template, seed=cfg.seed)
    ctx = context_texts(prefixes)
    keys, resid, steps_used = [], [], []
    for f in facts:
        rows = fact_rows(tok, template, f, 0, ctx, targets=True, kl_prompt=cfg.kl_prompt)
        L = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), L), 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r.ids)] = torch.tensor(r.ids)
            mask[i, : len(r.ids)] = 1
        subj = torch.tensor([r.subj for r in rows])
        got = {}

        def grab(mod, inp, out):
            got["k"] = inp[0][torch.arange(len(rows)), subj].detach()
            got["o"] = out[torch.arange(len(rows)), subj].detach()

        hd = h.down_proj.register_forward_hook(grab)
        with torch.no_grad():
            out0 = model(input_ids=ids, attention_mask=mask)
        hd.remove()
        hd = h.layers[cfg.layer].register_forward_hook(
            lambda m, a, o: got.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[0, subj[0]].detach())
        )
        with torch.no_grad():
            model(input_ids=ids[:1], attention_mask=mask[:1])
        hd.remove()
        kl_i = len(rows) - 1
        kl_ref = torch.log_softmax(out0.logits[kl_i, rows[kl_i].kl_pos].float(), -1)
        keys.append(got["k"][:-1].mean(0))
        delta = torch.zeros(got["o"].shape[-1], requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        hnorm = got["h"].norm()

        def add(mod, inp, out):
            out = out.clone()
            out[torch.arange(len(rows)), subj] += delta
            return out

        hd = h.down_proj.register_forward_hook(add)
        try:
            for it in range(cfg.steps):
                opt.zero_grad()
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                nll = 0.0
                for i, r in enumerate(rows[:-1]):
                    nll = nll + sum(-logp[i, p, t] for p, t in r.targets) / len(r.targets)
                nll = nll / (len(rows) - 1)
                new = logp[kl_i, rows[kl_i].kl_pos]
                kl = (new.exp() * (new - kl_ref)).sum()
                loss = nll + cfg.kl_factor * kl + cfg.weight_decay * delta.norm() / hnorm**2
                if loss.item() < cfg.stop_loss or it == cfg.steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    mx = cfg.clamp_norm_factor * hnorm
                    if delta.norm() > mx:
                        delta.mul_(mx / delta.norm())
        finally:
            hd.remove()
        steps_used.append(it + 1)
        resid.append(delta.detach().clone())
    return torch.stack(keys), torch.stack(resid), steps_used


# ---------------------------------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------------------------------


def _sequences(facts):
    """(fact index, kind, prompt, target, sign) for every scored pair; kind in rewrite/paraphrase/neighborhood."""
    out = []
    for i, f in enumerate(facts):
        for kind, prompts in (("rewrite", [f.text]), ("paraphrase", f.paraphrases), ("neighborhood", f.neighborhood)):
            for j, p in enumerate(prompts):
                out.append((i, kind, j, p))
    return out


@torch.no_grad()
def _score(model, tok, template, pairs, batch=64):
    """Summed log-prob of target after prompt, for each (prompt, target); vocabulary projection only at the target
    positions, sequences sorted by length to limit padding."""
    h = model_access.handles(model, 0)
    device = model_access.model_device(model)
    enc = [(templates.encode(tok, template, p), templates.encode_target(tok, t)) for p, t in pairs]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    res = [0.0] * len(enc)
    for s in range(0, len(order), batch):
        chunk = order[s : s + batch]
        L = max(len(enc[i][0]) + len(enc[i][1]) for i in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows, cols, tgt = [], [], []
        for j, i in enumerate(chunk):
            a, b = enc[i]
            ids[j, : len(a) + len(b)] = torch.tensor(a + b)
            mask[j, : len(a) + len(b)] = 1
            rows += [j] * len(b)
            cols += list(range(len(a) - 1, len(a) + len(b) - 1))
            tgt += b
        last = h.base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        r_t, c_t, t_t = (torch.tensor(x, device=device) for x in (rows, cols, tgt))
        lp = torch.log_softmax(model_access.logits_of(h, last[r_t, c_t]), -1)
        tok_lp = lp[torch.arange(len(tgt), device=device), t_t]
        sums = torch.zeros(len(chunk), device=device).index_add(0, r_t, tok_lp).cpu()
        for j, i in enumerate(chunk):
            res[i] = float(sums[j])
    return res


def pre_scores(model, tok, template, facts, tag):
    cache = Path(os.environ.get("NEURALDB_CACHE_DIR", Path.home() / ".cache/neuraldb")) / "bench"
    digest = hashlib.sha256(template.encode()).hexdigest()[:10]
    path = cache / f"pre-{tag}-{len(facts)}-{digest}.pt"
    if path.is_file():
        return torch.load(path)
    seqs = _sequences(facts)
    pairs = [(p, facts[i].target_new) for i, _, _, p in seqs] + [(p, facts[i].target_true) for i, _, _, p in seqs]
    sc = _score(model, tok, template, pairs)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(sc, path)
    return sc


def quality(model, tok, db, facts, pre):
    from neuraldb.patching import patch_model, unpatch_model

    template = db.template
    seqs = _sequences(facts)
    pairs = [(p, facts[i].target_new) for i, _, _, p in seqs] + [(p, facts[i].target_true) for i, _, _, p in seqs]
    tokens = [templates.encode(tok, template, p) + templates.encode_target(tok, t) for p, t in pairs]
    fired = gate_fires(model, db.layer, tokens, db.keys, db.gamma)
    patch_model(model, db)
    try:
        post = merge_rescored(pre, fired, lambda todo: _score(model, tok, template, [pairs[j] for j in todo]))
    finally:
        unpatch_model(model)
    n = len(seqs)

    def metrics(sc):
        per = {}
        for k, (i, kind, _, _) in enumerate(seqs):
            new, true = sc[k], sc[k + n]
            ok = new > true if kind != "neighborhood" else true > new
            per.setdefault((kind, i), []).append(float(ok))
        agg = {}
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            vals = [sum(v) / len(v) for (kd, _), v in per.items() if kd == kind]
            agg[kind] = 100 * sum(vals) / len(vals)
        return {"efficacy": agg["rewrite"], "generalization": agg["paraphrase"], "specificity": agg["neighborhood"]}

    return {"pre": metrics(pre), "post": metrics(post), "rescored": sum(fired), "pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--dataset", choices=("counterfact", "zsre"), default="counterfact",
        help="zsre: speed and steps only (--no-eval); its quality is `neuraldb eval --dataset zsre`",
    )  # fmt: skip
    ap.add_argument("--dtype", default=None, help="the model's dtype (e.g. bfloat16, Gemma-3's native dtype)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="where the model runs (e.g. cuda); default the CPU")
    ap.add_argument("--naive", action="store_true", help="also time the naive one-at-a-time loop (same run)")
    ap.add_argument("--naive-n", type=int, default=None, help="facts for the naive loop (default --n)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--sweep", nargs="*", default=[], help="name=v1,v2 ... (EditConfig fields); grid over all")
    ap.add_argument("--set", nargs="*", default=[], help="name=value overrides of the defaults")
    ap.add_argument("--tag", default="")
    ap.add_argument("--warm-from", type=Path, help="append to this database's rows (warm starts; see above)")
    args = ap.parse_args(argv)
    if args.dataset == "zsre" and not (args.no_eval and not args.naive):
        ap.error("--dataset zsre measures speed only: give --no-eval (and no --naive)")
    if args.threads:
        torch.set_num_threads(args.threads)

    def parse(v):
        if v in ("True", "False"):
            return v == "True"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    device = model_access.model_device(model)
    facts = (load_zsre if args.dataset == "zsre" else load_counterfact)(args.n, args.offset)
    base = {k: parse(v) for k, v in (s.split("=", 1) for s in args.set)}
    grid_names = [s.split("=", 1)[0] for s in args.sweep]
    grid_vals = [[parse(x) for x in s.split("=", 1)[1].split(",")] for s in args.sweep]
    template = templates.default_template(tok)
    pre = None
    if not args.no_eval:
        t = time.perf_counter()
        pre = pre_scores(model, tok, template, facts, f"{args.model}-{args.dtype or 'default'}-{args.offset}")
        print(f"pre-edit scores: {time.perf_counter() - t:.1f}s", flush=True)
    if args.naive:
        cfg = resolve(model, **base)
        nf = facts[: args.naive_n or args.n]
        t, c = time.perf_counter(), time.process_time()
        _, _, st = naive_edit(model, tok, nf, cfg, template)
        el, cpu = time.perf_counter() - t, time.process_time() - c
        rec = {
            "mode": "naive",
            "model": args.model,
            "n": len(nf),
            "s_per_fact": el / len(nf),
            "cpu_s_per_fact": cpu / len(nf),
            "mean_steps": sum(st) / len(st),
            "threads": torch.get_num_threads(),
            "config": cfg.to_dict(),
        }
        print(json.dumps(rec), flush=True)
        _append(rec)
    for combo in itertools.product(*grid_vals) if grid_vals else [()]:
        over = {**base, **dict(zip(grid_names, combo))}
        stats: dict = {}
        start = _others(args.warm_from, facts)
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        db = edit(model, tok, facts, progress=False, stats=stats, db=start, **over)
        _sync(device)
        el, cpu = time.perf_counter() - t, time.process_time() - c
        db = _last_rows(db, len(facts))
        rec = {
            "mode": "neuraldb",
            "model": args.model,
            "dataset": args.dataset,
            "dtype": args.dtype,
            "n": len(facts),
            "device": str(device),
            "s_per_fact": el / len(facts),
            "facts_per_s": len(facts) / el,
            "cpu_s_per_fact": cpu / len(facts),
            "mean_steps": sum(stats["steps"]) / len(stats["steps"]),
            "max_steps": max(stats["steps"]),
            "load": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            "overrides": over,
            "config": {**db.config, "layer": db.layer, "gamma": db.gamma},
            "tag": args.tag,
            "warm_from": str(args.warm_from) if args.warm_from else None,
            "machine": machine_description(),
        }
        if pre is not None:
            rec["quality"] = quality(model, tok, db, facts, pre)
        print(json.dumps(rec), flush=True)
        _append(rec)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _others(path: Path | None, facts: list[Fact]) -> NeuralKVDatabase | None:
    """``path``'s rows whose fact is not one of ``facts`` (a fresh copy each run), or None without a path."""
    if path is None:
        return None
    src = NeuralKVDatabase.load(path)
    edited = {(f.subject, f.target_new) for f in facts}  # the same edit, whatever the wording of its prompt
    keep = [r for r, i in enumerate(src.ids()) if not isinstance(f := src.fact(i), Fact) or
            (f.subject, f.target_new) not in edited]  # fmt: skip
    return _rows(src, keep)


def _rows(src: NeuralKVDatabase, rows: list[int]) -> NeuralKVDatabase:
    """A database of ``src``'s rows ``rows`` (thresholds dropped: they were fitted among all rows)."""
    return NeuralKVDatabase.from_state(src.state().select_rows(rows).replace(thresholds=None, relation_keys=None))


def _last_rows(db: NeuralKVDatabase, n: int) -> NeuralKVDatabase:
    return db if len(db) == n else _rows(db, list(range(len(db) - n, len(db))))


def _append(rec):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
