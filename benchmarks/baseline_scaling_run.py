"""MEMIT and AlphaEdit at the scaling run's sizes: the same facts, residuals and sampled evaluation as NeuralDB's.

    nohup nice -n 19 python benchmarks/baseline_scaling_run.py --dataset counterfact --threads 2 > /tmp/bl.log 2>&1 &
    python benchmarks/baseline_scaling_run.py --dataset zsre --threads 2
    python benchmarks/baseline_scaling_run.py --dataset counterfact --report-only   # table + plot from the JSON

It needs the scaling run's database (``benchmarks/scaling_run.py``, ``runs/scaling-<dataset>/db.safetensors``) and
writes nothing into it. At each size n, the first n facts of that run (the evaluation sample first) are written into
layer 6's down-projection by each method from the database's own residuals (``neuraldb.baselines``): MEMIT's and
AlphaEdit's closed forms in one batch, and sequentially in batches of ``--batch`` facts (AlphaEdit's protocol; each
batch's targets are kept, not re-optimised on the edited model). The sample is scored as in the scaling run
(``n<size>.json`` there holds NeuralDB's numbers), with the same general tasks and WikiText-2 tokens.

The keys the closed forms need (the plain mean of the raw down-projection inputs, MEMIT's ``compute_ks``) are computed
once for the largest size and checkpointed in ``runs/baselines-scaling-<dataset>/keys.safetensors``; C0 comes from the
second half of WikiText-2 (perplexity is scored on the first), cached by ``neuraldb.baselines``. Rerunning the same
command resumes: keys continue at their last chunk and only (variant, size) pairs without a JSON are evaluated.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]

from _common import machine_description
from neuraldb import baselines
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import compute_keys, job_record
from neuraldb.editing.jobs import facts_fingerprint
from neuraldb.evaluation.baseline_run import residual_fit
from scaling_run import DATA, METRICS, SOURCES, Run, add_evaluation_args, build_facts, log, write_json

VARIANTS = ("memit", "alphaedit", "memit-seq", "alphaedit-seq")
KEY_SETTINGS = ("n_prefixes", "prefix_len", "seed", "key_bare_weight", "batch_size")
LABELS = {"neuraldb": "NeuralDB", "memit": "MEMIT", "alphaedit": "AlphaEdit", "calibrated": "NeuralDB"}


def label(variant: str, batch: int) -> str:
    method, _, seq = variant.partition("-")
    if method == "calibrated":
        return "NeuralDB, calibrated thresholds"
    return LABELS[method] + (f", sequential x{batch}" if seq else ", one batch" if method != "neuraldb" else "")


def raw_keys(model, tok, facts: list, db: NeuralKVDatabase, path: Path, chunk: int = 512) -> torch.Tensor:
    """Raw mean keys (n, d1) float32 of ``facts``, computed in chunks and checkpointed in ``path``."""
    from safetensors.torch import load_file, save_file

    conf = {k: db.config[k] for k in KEY_SETTINGS if k in (db.config or {})}
    identity = {"facts_sha256": facts_fingerprint(facts), "layer": str(db.layer), "template": db.template or "",
                "settings": json.dumps(conf, sort_keys=True)}  # fmt: skip
    have = torch.zeros(0, db.key_dim)
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if {k: meta.get(k) for k in identity} != identity:
            raise SystemExit(f"{path} holds keys of other facts or key settings; move it away to recompute")
        have = load_file(str(path))["keys"]
    t0 = time.perf_counter()
    while have.shape[0] < len(facts):
        part = facts[have.shape[0] : have.shape[0] + chunk]
        k = compute_keys(model, tok, part, db.layer, template=db.template, key_unit_mean=False, **conf)
        have = torch.cat([have, k.float()])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"keys": have.contiguous()}, str(tmp), metadata=identity)
        tmp.replace(path)
        log(f"keys: {have.shape[0]}/{len(facts)} ({time.perf_counter() - t0:.0f} s)")
    return have


class BaselineRun(Run):
    def __init__(self, args, model, tok, facts, n_sample, db, keys, c0, c0_seconds) -> None:
        super().__init__(args, model, tok, facts, n_sample)
        self.db, self.keys, self.c0, self.c0_seconds = db, keys, c0, c0_seconds
        self.resid = db.values[: keys.shape[0]].float()

    def path_for(self, variant: str, n: int) -> Path:
        return self.out / variant / f"n{n:05d}.json"

    def evaluate(self, variant: str, n: int) -> None:
        a = self.args
        method, _, seq = variant.partition("-")
        batch = a.batch if seq else None
        t0 = time.perf_counter()
        delta = baselines.baseline_delta(
            method, self.keys[:n], self.resid[:n], self.c0, lam=a.lam, threshold=a.threshold, l2=a.l2, batch=batch
        )
        t_solve = time.perf_counter() - t0
        log(f"{variant}, n={n}: update solved in {t_solve:.1f} s; evaluating")
        with baselines.weights_edited(self.model, self.db.layer, delta):
            result = {"n_edited": n, **self._common(), "knowledge": self.knowledge(), "general": self.general()}
        result |= {
            "variant": variant, "method": method, "sequential_batch": batch, "layer": self.db.layer,
            "lam": a.lam if method == "memit" else None,
            "threshold": a.threshold if method == "alphaedit" else None, "l2": a.l2 if method == "alphaedit" else None,
            "c0_tokens": a.c0_tokens, "c0_seconds": self.c0_seconds,
            "residual_fit": residual_fit(self.keys[:n], self.resid[:n], delta), "delta_norm": delta.norm().item(),
            "seconds": {"solve": t_solve, "total": time.perf_counter() - t0}, "machine": machine_description(),
        }  # fmt: skip
        write_json(self.path_for(variant, n), result)
        k = result["knowledge"]
        ppl = result["general"].get("wikitext2")
        log(f"{variant}, n={n}: " + ", ".join(f"{m} {k[m]:.1f}" for m in METRICS) + f", ppl {ppl}")


def load_rows(folder: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in folder.glob("n*.json")), key=lambda r: r["n_edited"])


def calibrated_rows(paths: list[Path]) -> list[dict]:
    """NeuralDB's rows with per-row thresholds, from ``benchmarks/calibration_run.py``'s JSON (its "with" side)."""
    rows = []
    for p in paths:
        r = json.loads(p.read_text())
        rows.append({"n_edited": r["n"], "knowledge": r["with"]["knowledge"], "general": r["with"]["general"]})
    return sorted(rows, key=lambda r: r["n_edited"])


def write_report(
    out: Path, neuraldb_dir: Path, dataset: str, variants: tuple[str, ...], batch: int, calibrated: list[Path]
) -> None:
    """table.md and baselines.png in ``out``: NeuralDB's scaling rows (as edited, and with thresholds where
    ``calibrated`` names calibration runs) beside each baseline variant's."""
    nd = load_rows(neuraldb_dir)
    unedited = next((r for r in nd if r["n_edited"] == 0), None)
    series = {"neuraldb": [r for r in nd if r["n_edited"]], "calibrated": calibrated_rows(calibrated)}
    series |= {v: load_rows(out / v) for v in variants if (out / v).is_dir()}
    series = {v: rows for v, rows in series.items() if rows}
    if not series:
        return
    tasks = sorted({t for rows in series.values() for r in rows for t in r["general"] if not t.startswith("_")})
    tasks = [t for t in tasks if t != "wikitext2"]
    head = ["method", "edited facts", *METRICS, "WikiText-2 ppl", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cells(name: str, r: dict) -> list[str]:
        k, g = r["knowledge"], r["general"]
        out = [name, f"{r['n_edited']:,}" if r["n_edited"] else "0 (unedited)"]
        out += [f"{k[m]:.1f}" if k.get(m) is not None else "" for m in METRICS]
        out += [f"{g['wikitext2']:.2f}" if g.get("wikitext2") is not None else ""]
        return out + [f"{g[t]:.1f}" if g.get(t) is not None else "" for t in tasks]

    if unedited:
        lines.append("| " + " | ".join(cells("unedited", unedited)) + " |")
    for v, rows in series.items():
        lines += ["| " + " | ".join(cells(label(v, batch), r)) + " |" for r in rows]
    any_row = series["neuraldb"][-1] if series.get("neuraldb") else next(iter(series.values()))[-1]
    note = (
        f"\n{dataset}, SmolLM2-135M-Instruct, layer 6: {any_row['n_evaluated']} sampled facts scored at every size "
        f"(edited first, so they are among the n edited facts); NeuralDB rows from {neuraldb_dir.relative_to(ROOT)}. "
        f"General tasks on {any_row.get('general_limit')} examples each, WikiText-2 on the first "
        f"{any_row.get('wikitext_tokens')} tokens.\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n" + note)
    try:
        from neuraldb.evaluation.plots import _pyplot, facts_axis, legend_outside, save_figure, value_axis

        plt = _pyplot()
    except ImportError:
        return
    panels = [*METRICS, "wikitext2"]
    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    axes = list(grid.flat)
    xs_all = sorted({r["n_edited"] for rows in series.values() for r in rows})
    for ax, m in zip(axes, panels):
        ys = []
        for i, (v, rows) in enumerate(series.items()):
            get = (lambda r: r["general"].get("wikitext2")) if m == "wikitext2" else (lambda r: r["knowledge"].get(m))
            pts = [(r["n_edited"], get(r)) for r in rows if get(r) is not None]
            style = "-" if v in ("neuraldb", "calibrated") else "--" if v.endswith("seq") else "-."
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=f"C{i}", label=label(v, batch))
            ys += [p[1] for p in pts]
        base = unedited and (unedited["general"].get("wikitext2") if m == "wikitext2" else unedited["knowledge"].get(m))
        if base is not None:
            ax.axhline(base, color="grey", linestyle=":", label="unedited")
            ys.append(base)
        facts_axis(ax, xs_all)
        if m == "wikitext2":
            value_axis(ax, ys, "token perplexity", bounds=None)
        else:
            value_axis(ax, ys)
        ax.set_title("WikiText-2 perplexity" if m == "wikitext2" else m, fontsize=10)
    legend_outside(axes[-1])
    fig.suptitle(f"{dataset}: NeuralDB, MEMIT and AlphaEdit on SmolLM2-135M, same facts and residuals", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out / "baselines.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=tuple(SOURCES), default="counterfact")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--db", type=Path, help="the scaling run's database (default runs/scaling-<dataset>/db.safetensors)")
    p.add_argument("--work", type=Path, help="key checkpoints (default runs/baselines-scaling-<dataset>)")
    p.add_argument("--results", type=Path, help="default docs/results/baselines/scaling-<dataset>")
    p.add_argument("--neuraldb-results", type=Path, help="NeuralDB's rows (default docs/results/scaling/<dataset>)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--sizes", type=int, nargs="+", help="evaluated in this order (default: the scaling run's sizes)")
    p.add_argument("--batch", type=int, default=100, help="facts per batch in the sequential variants (default 100)")
    p.add_argument("--lam", type=float, default=1500.0,
                   help="MEMIT's mom2_update_weight (default 1500: the papers' 15,000 writes a quarter of each "
                        "residual on SmolLM2, docs/results/baselines/README.md)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=baselines.DEFAULT_NULLSPACE_THRESHOLD)
    p.add_argument("--l2", type=float, default=baselines.DEFAULT_L2)
    p.add_argument("--c0-tokens", type=int, default=baselines.DEFAULT_C0_TOKENS)
    p.add_argument("--threads", type=int, default=2)
    add_evaluation_args(p)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--calibrated", type=Path, nargs="*", default=[],
                   help="calibration_run.py JSON files: NeuralDB with per-row thresholds, in the table and plot")  # fmt: skip
    args = p.parse_args(argv)
    args.command = "python benchmarks/baseline_scaling_run.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    args.db = args.db or ROOT / "runs" / f"scaling-{args.dataset}" / "db.safetensors"
    args.work = args.work or ROOT / "runs" / f"baselines-scaling-{args.dataset}"
    args.results = args.results or ROOT / "docs" / "results" / "baselines" / f"scaling-{args.dataset}"
    args.neuraldb_results = args.neuraldb_results or ROOT / "docs" / "results" / "scaling" / args.dataset
    args.sizes_resolved = args.sizes or SOURCES[args.dataset]["sizes"]
    if args.report_only:
        write_report(
            args.results, args.neuraldb_results, args.dataset, tuple(args.variants), args.batch, args.calibrated
        )
        return 0
    if not args.db.exists():
        raise SystemExit(f"{args.db} not found: run benchmarks/scaling_run.py --dataset {args.dataset} first")
    torch.set_num_threads(args.threads)
    facts, n_sample = build_facts(args.dataset, args.data, args.sample, args.seed)
    db = NeuralKVDatabase.load(args.db)
    done = (job_record(db) or {}).get("done", 0)
    # in the order given: a long run can do the telling sizes first and the rest when resumed
    sizes = list(dict.fromkeys(len(facts) if s is None else min(s, len(facts)) for s in args.sizes_resolved))
    if max(sizes) > done or db.ids()[: max(sizes)] != list(range(max(sizes))):
        raise SystemExit(f"{args.db} holds {done} finished facts; the sizes need the first {max(sizes)}")
    import neuraldb

    model, tok = neuraldb.load_model(args.model)
    keys = raw_keys(model, tok, facts[: max(sizes)], db, args.work / "keys.safetensors")
    t0 = time.perf_counter()
    c0 = baselines.key_second_moment(model, tok, db.layer, data_dir=args.data / "general_eval",
                                     n_tokens=args.c0_tokens)  # fmt: skip
    c0_seconds = time.perf_counter() - t0
    log(f"C0 from {args.c0_tokens} WikiText-2 tokens ready in {c0_seconds:.0f} s (0 if cached)")
    run = BaselineRun(args, model, tok, facts, n_sample, db, keys, c0, c0_seconds)
    for n in sizes:
        for v in args.variants:
            if not run.path_for(v, n).exists():
                run.evaluate(v, n)
                write_report(
                    args.results, args.neuraldb_results, args.dataset, tuple(args.variants), args.batch, args.calibrated
                )
    write_report(args.results, args.neuraldb_results, args.dataset, tuple(args.variants), args.batch, args.calibrated)
    log(f"done: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
