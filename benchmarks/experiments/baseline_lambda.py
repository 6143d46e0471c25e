"""MEMIT's lambda and AlphaEdit's threshold on SmolLM2 (issue 25): rewrite-prompt efficacy and how much of the
residuals the update writes (``Delta k`` against ``r``), from one saved database's residuals, without the full eval.

    python benchmarks/experiments/baseline_lambda.py --db runs/baselines/smollm2-cf100.safetensors --n 100 \\
        --c0-tokens 20000 --out docs/results/baselines/lambda-sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--facts", default="../shared/data/knowledge_editing/counterfact_rome_format_1031.json.gz")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--c0-tokens", type=int, default=20000)
    p.add_argument("--lams", type=float, nargs="+", default=[15000, 1500, 150, 15, 1.5])
    p.add_argument("--thresholds", type=float, nargs="+", default=[2e-2, 1e-2, 5e-3])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    import neuraldb
    from neuraldb import baselines, templates
    from neuraldb import facts as facts_mod
    from neuraldb.editing import compute_keys
    from neuraldb.evaluation.baseline_run import residual_fit
    from neuraldb.evaluation.counterfact import evaluate_counterfact

    model, tok = neuraldb.load_model("smollm2")
    db = neuraldb.NeuralKVDatabase.load(a.db)
    facts = facts_mod.load(a.facts)[: a.n]
    conf = db.config or {}
    kc = {k: conf[k] for k in ("n_prefixes", "prefix_len", "seed", "key_bare_weight", "batch_size") if k in conf}
    keys = compute_keys(model, tok, facts, db.layer, template=db.template, key_unit_mean=False, **kc)
    resid = db.values.float()
    c0 = baselines.key_second_moment(model, tok, db.layer, n_tokens=a.c0_tokens)
    rewrite_only = [dataclasses.replace(f, paraphrases=(), neighborhood=()) for f in facts]
    pf = lambda s: templates.apply(db.template, s)

    def efficacy(delta):
        with baselines.weights_edited(model, db.layer, delta):
            return evaluate_counterfact(model, tok, rewrite_only, prompt_fn=pf, show_progress=False)["summary"]

    rows = []
    settings = [("memit", {"lam": lam}) for lam in a.lams] + [("alphaedit", {"threshold": t}) for t in a.thresholds]
    for method, kw in settings:
        t0 = time.perf_counter()
        delta = baselines.baseline_delta(method, keys, resid, c0, **kw)
        s = efficacy(delta)
        row = {"method": method, **kw, "efficacy": s["efficacy"], "fit": residual_fit(keys, resid, delta)}
        row["delta_norm"], row["seconds"] = delta.norm().item(), time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        rows.append(row)
    key_norm = keys.norm(dim=1)
    out = {
        "n_facts": len(facts),
        "c0_tokens": a.c0_tokens,
        "layer": db.layer,
        "c0_trace": torch.trace(c0).item(),
        "key_norm_mean": key_norm.mean().item(),
        "residual_norm_mean": resid.norm(dim=1).mean().item(),
        "rows": rows,
    }
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
