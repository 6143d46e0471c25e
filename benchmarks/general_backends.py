"""General ability of one unedited model scored twice, by lm-evaluation-harness (neuraldb.evaluation.general_lm_eval)
and by the builtin scorer (neuraldb.evaluation.general), on the same tasks and the same seeded examples.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/general_backends.py --limit 100 --wikitext-tokens 4096 \\
        --threads 1 --out docs/results/general_backends.json

Prints a Markdown table (task, metric, builtin, lm-eval) and writes both results and their wall times to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from neuraldb import load_model
from neuraldb.evaluation.general import TASKS, evaluate_general
from neuraldb.evaluation.general_lm_eval import evaluate_general_lm_eval

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "general_eval"
METRICS = {"wikitext2": ("token_ppl", "word_ppl", "byte_ppl", "bits_per_byte"), "lambada_openai": ("acc", "ppl")}


def table(builtin: dict, lm_eval: dict) -> str:
    rows = ["| task | n | metric | builtin | lm-eval |", "|---|---:|---|---:|---:|"]
    for task, b in builtin["tasks"].items():
        e = lm_eval["tasks"].get(task, {})
        n = b.get("n", b.get("n_tokens"))
        for m in METRICS.get(task, ("acc", "acc_norm")):
            fmt = (
                (lambda v: "–" if v is None else f"{v:.2f}")
                if task == "wikitext2"
                else (lambda v: "–" if v is None else f"{v:.1f}")
            )
            star = " (primary)" if m == b.get("primary") else ""
            rows.append(f"| {task} | {n} | {m}{star} | {fmt(b.get(m))} | {fmt(e.get(m))} |")
    rows.append(f"| average (primary accuracies) | | | {builtin['average']:.1f} | {lm_eval['average']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--wikitext-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    kw = {
        "tasks": a.tasks, "limit": a.limit, "wikitext_max_tokens": a.wikitext_tokens, "seed": a.seed,
        "batch_size": a.batch_size, "show_progress": False,
    }  # fmt: skip
    out = {"model": a.model, "args": {k: str(v) for k, v in vars(a).items()}, "seconds": {}}
    for name, fn in (("builtin", evaluate_general), ("lm_eval", evaluate_general_lm_eval)):
        t0 = time.perf_counter()
        out[name] = fn(model, tok, a.data, **kw)
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {out['seconds'][name]} s", flush=True)
    print(table(out["builtin"], out["lm_eval"]))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
