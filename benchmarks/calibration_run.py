"""Per-row gate thresholds fitted by ``neuraldb.calibration`` on the scaling run's CounterFact (or zsRE) database: what they do
to ordinary text, to the edits and to general ability, at several database sizes, beside the same database without
them (same run, same machine).

    python benchmarks/calibration_run.py --sizes 1000 10000 --threads 2
    python benchmarks/calibration_run.py --dataset zsre --sizes 3313 --no-text --threads 2   # zsRE, as `edit` fits

For each size n, the first n rows of ``runs/scaling-counterfact/db.safetensors`` (written by scaling_run.py; its first
200 facts are the evaluation sample) are calibrated on WikiText-2 test tokens [65536, 131072) and measured on text
disjoint from that: the gate openings on tokens [0, 65536) (the first 16384 are the ones whose perplexity is
scored), then scaling_run.py's evaluation (CounterFact or zsRE efficacy/generalization/specificity of the sample, WikiText-2
perplexity of the first 16384 tokens, three general tasks) with and without the thresholds. The paraphrases and
neighborhood prompts that generalization and specificity score are never used to calibrate. One JSON per size and
``table.md`` under ``docs/results/calibration/<dataset>[-facts-only]/``; sizes with a JSON are skipped (resumable).
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
from neuraldb.calibration import calibrate, read_corpus, text_openings
from neuraldb.database import NeuralKVDatabase
from neuraldb.patching import patch_model, unpatch_model
from neuraldb.subject_gate import enable_subject_gate
from scaling_run import Run, add_evaluation_args, build_facts, first_rows, log, write_json

WIKITEXT = "general_eval/wikitext2_raw_test.txt.gz"


def evaluate(run: Run, db: NeuralKVDatabase) -> dict:
    patch_model(run.model, db)
    try:
        return {"knowledge": run.knowledge(), "general": run.general()}
    finally:
        unpatch_model(run.model)


def write_table(out: Path) -> None:
    rows = sorted((json.loads(p.read_text()) for p in out.glob("n*.json")), key=lambda r: r["n"])
    head = (
        "| facts | thresholds | rows raised | held-out text positions opening a gate | efficacy | generalization "
        "| specificity | WikiText-2 ppl | arc_easy | lambada | piqa |"
    )
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gate = r.get("gate")
        calibrated = "calibrated" if not gate else f"calibrated + gate {gate}".replace("'", "")
        for name, res, opened in (
            ("none", r["without"], r["heldout"]["open_without_thresholds_pct"]),
            (calibrated, r["with"], r["heldout"]["open_pct"]),
        ):
            k, g = res["knowledge"], res["general"]
            raised = r["calibration"]["raised"] if name != "none" else 0
            lines.append(
                f"| {r['n']:,} | {name} | {raised} | {opened:.3f}% | {k['efficacy']:.1f} | {k['generalization']:.1f} "
                f"| {k['specificity']:.1f} | {g['wikitext2']:.2f} | {g['arc_easy']:.1f} | {g['lambada_openai']:.1f} "
                f"| {g['piqa']:.1f} |"
            )
    last = rows[-1]
    source = (
        f"Calibrated on WikiText-2 test tokens [{last['calib_skip']}, {last['calib_skip'] + last['calib_tokens']})"
        if last["calib_tokens"]
        else "Calibrated from the facts alone (no text)"
    )
    lines.append(
        f"\n{source}; "
        f"openings measured on tokens [0, {last['heldout_tokens']}); perplexity on the first 16384. "
        f"delta {last['calibration']['delta']}, margin {last['calibration']['margin']}. Command: `{last['command']}`"
    )
    (out / "table.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("counterfact", "zsre"), default="counterfact")
    p.add_argument("--db", type=Path, help="default runs/scaling-<dataset>/db.safetensors (scaling_run.py's)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--calib-tokens", type=int, default=65536)
    p.add_argument("--calib-skip", type=int, default=65536)
    p.add_argument("--heldout-tokens", type=int, default=65536)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-text", action="store_true", help="calibrate from the facts alone, as `neuraldb edit` does")
    p.add_argument(
        "--subject-gate", type=float, metavar="RHO",
        help="after calibrating, turn the subject gate on (neuraldb.subject_gate) with this rho",
    )  # fmt: skip
    p.add_argument("--results", type=Path, help="default docs/results/calibration/counterfact[-facts-only]")
    p.add_argument(
        "--without-from", type=Path,
        help="take the numbers without thresholds from this scaling run's results (its n<size>.json: the same sample "
        "and evaluation) instead of evaluating them again",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.db = args.db or ROOT / "runs" / f"scaling-{args.dataset}" / "db.safetensors"
    name = f"{args.dataset}-facts-only" if args.no_text else args.dataset
    name += "" if args.subject_gate is None else f"-subject-gate-{args.subject_gate:g}"
    args.results = args.results or ROOT / "docs" / "results" / "calibration" / name
    command = "python benchmarks/calibration_run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    torch.set_num_threads(args.threads)
    import neuraldb

    model, tok = neuraldb.load_model("smollm2")
    evaluation = argparse.ArgumentParser()
    add_evaluation_args(evaluation)  # the scaling run's evaluation, at its defaults, so the numbers compare
    run_args = evaluation.parse_args([])
    facts, n_sample = build_facts(args.dataset, args.data, run_args.sample, run_args.seed)
    run_args.__dict__.update(
        dataset=args.dataset, data=args.data, sizes_resolved=[], results=args.results, model="smollm2", command=command
    )
    run = Run(run_args, model, tok, facts, n_sample)
    corpus = [read_corpus(args.data / WIKITEXT)]
    full = NeuralKVDatabase.load(args.db)
    for n in args.sizes:
        path = args.results / f"n{n:05d}.json"
        if path.exists():
            continue
        if len(full) < n:
            log(f"{args.db} has {len(full)} rows, fewer than {n}: skipped")
            continue
        db = first_rows(full, n)
        t0 = time.perf_counter()
        earlier = None if args.without_from is None else args.without_from / f"n{n:05d}.json"
        if earlier is not None and earlier.exists():
            log(f"n={n}: without thresholds: {earlier}")
            scaled = json.loads(earlier.read_text())
            without = {"knowledge": scaled["knowledge"], "general": scaled["general"], "from": str(earlier)}
        else:
            log(f"n={n}: evaluating without thresholds")
            without = evaluate(run, db)
        log(f"n={n}: calibrating")
        report = calibrate(
            model, tok, db, None if args.no_text else corpus, tokens=args.calib_tokens, skip=args.calib_skip, delta=args.delta,
            margin=args.margin, progress=log,
        )  # fmt: skip
        log(report.summary())
        if args.subject_gate is not None:
            keyed = enable_subject_gate(model, tok, db, rho=args.subject_gate)
            log(f"n={n}: subject gate on (rho {args.subject_gate:g}): {keyed} rows with a previous-token key")
        heldout = text_openings(model, tok, db, corpus, tokens=args.heldout_tokens, skip=0)
        log(f"n={n}: held-out openings {heldout}")
        with_t = evaluate(run, db)
        result = {
            "n": n, "command": command, "machine": machine_description(), "threads": args.threads,
            "calib_tokens": 0 if args.no_text else args.calib_tokens, "calib_skip": args.calib_skip, "heldout_tokens": args.heldout_tokens,
            "calibration": {k: v for k, v in vars(report).items() if not isinstance(v, torch.Tensor)}, "heldout": heldout,
            "gate": db.relation_gate,
            "without": without, "with": with_t, "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        write_json(path, result)
        k0, k1 = without["knowledge"], with_t["knowledge"]
        log(
            f"n={n}: efficacy {k0['efficacy']:.1f} -> {k1['efficacy']:.1f}, generalization {k0['generalization']:.1f}"
            f" -> {k1['generalization']:.1f}, specificity {k0['specificity']:.1f} -> {k1['specificity']:.1f}, ppl "
            f"{without['general']['wikitext2']:.2f} -> {with_t['general']['wikitext2']:.2f}"
        )
        write_table(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
