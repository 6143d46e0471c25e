"""Reports of evaluation runs: JSON, Markdown tables (the paper's Table 2 columns) and the plots of :mod:`.plots`.

A *run* is the dict :func:`neuraldb.evaluation.pipeline.run_eval` returns: ``model``, ``dataset``
("counterfact" or "zsre"), ``n_facts``, ``pre``/``post`` evaluation results, optional ``general`` (``pre``/``post``)
and ``deletion``. Several runs (e.g. 100 and 1,000 facts) combine into one table and one figure per question.

The JSON files (one format: the run dict, per-fact records in their own file):

* ``results.json``: one run, as ``neuraldb eval`` measured it (summaries, notes, timing, the command).
* ``per_fact.json``: that run's per-prompt scores, ``{"pre": [...], "post": [...]}``.
* ``report.json``: ``{"runs": [run, ...]}``, written by ``neuraldb eval --combine`` over several results.json
  files. A single run writes no report.json; older run directories (docs/results/*/) hold one anyway, the same
  run wrapped in ``runs``, and --combine reads both shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .deletion import deletion_table
from .plots import plot_runs  # the figures and their rules live there

__all__ = ["markdown_report", "plot_runs", "plot_unavailable", "write_json", "write_reports"]


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _strip(obj):
    """A JSON-safe copy (NaN -> None)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _strip(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    return obj


def write_json(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strip(obj), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


CF_COLS = [
    ("efficacy", "Efficacy ↑"),
    ("generalization", "Generalization ↑"),
    ("specificity", "Specificity ↑"),
    ("fluency", "Fluency ↑"),
    ("consistency", "Consistency ↑"),
]
CF_MAG = [
    ("efficacy_magnitude", "EM"),
    ("generalization_magnitude", "GM"),
    ("specificity_magnitude", "SM"),
    ("score", "Score"),
]
ZS_COLS = [("efficacy", "Efficacy ↑"), ("generalization", "Generalization ↑"), ("specificity", "Specificity ↑")]
# runs without a "method" were made before the baselines existed: NeuralDB
_METHOD_NAMES = {"neuraldb": "NeuralDB", "memit": "MEMIT", "alphaedit": "AlphaEdit"}
# run-level (pre vs post) ZsRE measures, shown on the edited row
ZS_RUN = ("locality_unchanged", "same_subject_locality")
# KnowEdit's columns, shown only when some run has them
ZS_KNOWEDIT = [
    ("same_subject_locality", "Same-subject loc. ↑"),
    ("portability_reasoning", "Portability: reasoning ↑"),
    ("portability_subject_aliasing", "Portability: subject aliasing ↑"),
    ("portability_logical_generalization", "Portability: logical generalization ↑"),
]


def _facts_cell(run: dict) -> str:
    n, k = run["n_facts"], run.get("n_evaluated", run["n_facts"])
    return str(n) if k == n else f"{n} ({k} evaluated)"


def _table(runs: Sequence[dict], dataset: str) -> list[str]:
    rs = sorted([r for r in runs if r["dataset"] == dataset], key=lambda r: (r["model"], r["n_facts"]))
    if not rs:
        return []
    if dataset == "counterfact":
        cols = CF_COLS + CF_MAG
    else:
        cols = ZS_COLS + [("locality_unchanged", "Loc. unchanged")]
        for key, label in ZS_KNOWEDIT:
            if any(
                r.get(key) is not None or r[part]["summary"].get(key) is not None
                for r in rs
                for part in ("pre", "post")
            ):
                cols.append((key, label))
    name = "CounterFact" if dataset == "counterfact" else "ZsRE"
    out = [
        f"### {name}",
        "",
        "| Model | State | Facts | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    seen_pre = set()
    for r in rs:
        rows = []
        key = (r["model"], r.get("facts_path"), r["n_facts"], r.get("n_evaluated"))
        if key not in seen_pre:
            seen_pre.add(key)
            rows.append(("Pre-edited", r["pre"]["summary"], {}))
        rows.append(
            (
                _METHOD_NAMES.get(r.get("method", "neuraldb"), r.get("method")),
                r["post"]["summary"],
                {k: r.get(k) for k in ZS_RUN},
            )
        )
        for state, s, extra in rows:
            vals = [extra.get(k, s.get(k)) for k, _ in cols]
            out.append(f"| {r['model']} | {state} | {_facts_cell(r)} | " + " | ".join(_fmt(v) for v in vals) + " |")
    out.append("")
    return out


def _general_table(runs: Sequence[dict]) -> list[str]:
    rs = [r for r in runs if r.get("general")]
    if not rs:
        return []
    tasks = []
    for r in rs:
        for t in r["general"]["pre"]["tasks"]:
            if t not in tasks:
                tasks.append(t)
    head = ["Task", "Metric", "Chance"]
    cols = []
    for r in rs:
        label = f"{r['model']} {r['dataset']}" + (
            f" {r['method']}" if r.get("method", "neuraldb") != "neuraldb" else ""
        )
        cols.append((r, "pre", f"{label}: 0 facts"))
        cols.append((r, "post", f"{label}: {r['n_facts']} facts"))
    out = [
        "### General ability (before vs after editing)",
        "",
        "| " + " | ".join(head + [c[2] for c in cols]) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    for t in tasks:
        metric = chance = None
        cells = []
        for r, state, _ in cols:
            res = r["general"][state]["tasks"].get(t)
            if res is None:
                cells.append("–")
                continue
            metric = res["primary"] + (f" (n={res['n']})" if "n" in res else f" ({res.get('n_tokens')} tok)")
            chance = res.get("chance")
            cells.append(_fmt(res["value"], 2 if t == "wikitext2" else 1))
        out.append(f"| {t} | {metric} | {_fmt(chance)} | " + " | ".join(cells) + " |")
    avg = [_fmt(r["general"][state].get("average")) for r, state, _ in cols]
    out.append("| **average** (accuracy tasks) | primary | | " + " | ".join(avg) + " |")
    out.append("")
    return out


def markdown_report(runs: Sequence[dict], title: str = "neuraldb evaluation") -> str:
    lines = [f"# {title}", ""]
    cmds = [r.get("command") for r in runs if r.get("command")]
    if cmds:
        lines += ["Commands:", "", "```", *cmds, "```", ""]
    lines += _table(runs, "counterfact") + _table(runs, "zsre") + _general_table(runs)
    for r in runs:
        if r.get("deletion"):
            d = r["deletion"]
            shown = d.get("n_evaluated", d["n_facts"])
            lines += [
                f"### Deletion (App. J.5): {r['model']}, {r['dataset']}, {d['n_facts']} facts, "
                f"{d['n_deleted']} even-indexed deleted" + ("" if shown == d["n_facts"] else f", {shown} evaluated"),
                "",
                deletion_table(d),
                "",
            ]
    timing = [r for r in runs if r.get("timing")]
    if timing:
        lines += [
            "### Timing (seconds)",
            "",
            "| Model | Dataset | Facts | " + " | ".join(timing[0]["timing"]) + " |",
            "|---|---|---:|" + "---:|" * len(timing[0]["timing"]),
        ]
        for r in timing:
            lines.append(
                f"| {r['model']} | {r['dataset']} | {r['n_facts']} | "
                + " | ".join(_fmt(r["timing"].get(k)) for k in timing[0]["timing"])
                + " |"
            )
        lines.append("")
    notes, defs = [], {}
    for r in runs:
        for part in ("pre", "post"):
            for n in r[part].get("notes", []):
                if n not in notes:
                    notes.append(n)
            defs.update({f"{r['dataset']} {k}": v for k, v in r[part].get("definitions", {}).items()})
        if r.get("general"):
            for n in r["general"]["pre"].get("notes", []):
                if n not in notes:
                    notes.append(n)
            defs.update({f"general {k}": v for k, v in r["general"]["pre"].get("definitions", {}).items()})
        for n in r.get("notes", []):
            if n not in notes:
                notes.append(n)
    if notes:
        lines += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    if defs:
        lines += ["### Metric definitions", ""] + [f"- **{k}**: {v}" for k, v in defs.items()] + [""]
    return "\n".join(lines)


def plot_unavailable() -> str | None:
    """Why no plot can be drawn here (matplotlib is not installed), or None when it can.

    matplotlib is not a dependency: the editing library does not need it, and every number a plot shows is in
    report.md and the JSON. The reports skip the plot without it, and ``neuraldb eval`` says so with this reason.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the neuraldb[bench] extra)"
    return None


def write_reports(
    runs: Sequence[dict],
    out_dir: str | Path,
    *,
    title: str = "neuraldb evaluation",
    stem: str = "report",
    combined_json: bool = True,
) -> dict[str, Path]:
    """``{stem}.md`` and ``{stem}.png`` under ``out_dir``, and with ``combined_json`` ``{stem}.json``: ``{"runs":
    [...]}``, every run with its per-fact records dropped (the format ``neuraldb eval --combine`` writes; a single
    run's own file is ``results.json``, the run dict itself). The plots (:func:`neuraldb.evaluation.plots.plot_runs`:
    ``{stem}.png``, editing quality, and ``{stem}-general.png`` where runs measured general ability) are left out, and
    absent from the returned paths, where :func:`plot_unavailable` gives a reason."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = [_slim(r) for r in runs]
    paths = {}
    if combined_json:
        paths["json"] = write_json({"runs": slim}, out_dir / f"{stem}.json")
    md = out_dir / f"{stem}.md"
    md.write_text(markdown_report(slim, title=title) + "\n", encoding="utf-8")
    paths["markdown"] = md
    if plot_unavailable() is None:
        p = plot_runs(slim, out_dir / f"{stem}.png")
        if p is not None:
            paths["plot"] = p
        general = out_dir / f"{stem}-general.png"
        if any(r.get("general") for r in slim) and general.is_file():
            paths["general_plot"] = general
    return paths


def _slim(run: dict) -> dict:
    r = dict(run)
    for part in ("pre", "post"):
        if part in r and isinstance(r[part], dict):
            r[part] = {k: v for k, v in r[part].items() if k != "per_fact"}
    return r
