"""Every committed evaluation figure, and the one set of axis and legend helpers they share: ``neuraldb eval``'s
``report.png`` and ``report-general.png`` (:func:`plot_runs`), the ``--distractors`` ``report.png``
(:func:`plot_scaling`) and ``benchmarks/scaling_run.py``'s ``scaling.png``.

The rules (issue 29, "plots a reader can trust"):

* one figure per question: editing quality against edited facts, general ability against edited facts;
* points are joined into a line only when they are one configuration at different sizes (:func:`config_key`: model,
  dtype, dataset and facts file, template, editing defaults, layer, gamma and gate settings); runs that differ are
  separate markers, labelled by what differs;
* the pre-edit state is an open marker (or a dotted line where it is one value), never a point at "0 facts";
* a log x axis only where the sizes span a decade or more, with ticks at the sizes; no symlog; the y range starts
  where the data does;
* legends outside the axes.

Redraw the pictures of saved results without touching their JSON or Markdown::

    python -m neuraldb.evaluation.plots docs/results/*/results.json     # report.png (+ report-general.png) beside each
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "config_key",
    "facts_axis",
    "general_series",
    "legend_outside",
    "plot_runs",
    "plot_scaling",
    "quality_series",
    "save_figure",
    "value_axis",
]

METRICS = ("efficacy", "generalization", "specificity")
DATASET_NAMES = {"counterfact": "CounterFact", "zsre": "ZsRE"}
# What makes two runs one configuration; n_facts / n_evaluated are the size, not the configuration.
CONFIG_FIELDS = (
    "model", "model_dtype", "dataset", "facts_path", "offset", "template", "reduction", "zsre_target", "layer",
    "gamma", "edit_kwargs", "db_config", "method", "thresholds",
)  # fmt: skip


# The settings a label names first when one model's configurations differ in several.
LABEL_ORDER = (
    "method", "dataset", "facts_path", "gamma", "layer", "relation_gate", "thresholds", "lr", "steps", "n_prefixes",
    "key_bare_weight", "key_unit_mean", "compute_dtype", "model_dtype",
)  # fmt: skip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- helpers ---------------------------------------------------------------------------------------------------------


def facts_axis(ax, xs: Sequence[float], label: str = "edited facts") -> str:
    """Ticks at the sizes ``xs``; log scale when they span a decade or more, linear otherwise. Returns the scale."""
    xs = sorted({x for x in xs if x is not None})
    scale = "log" if xs and xs[0] > 0 and xs[-1] / xs[0] >= 10 else "linear"
    ax.set_xscale(scale)
    if xs:
        many = len(xs) > 4  # tilted, so that close ticks on a log axis do not overlap
        ax.set_xticks(xs, [f"{x:,}" for x in xs], rotation=35 if many else 0, ha="right" if many else "center")
        ax.minorticks_off()
        lo, hi = xs[0], xs[-1]
        if scale == "log":
            ax.set_xlim(lo / 1.4, hi * 1.4)
        else:
            pad = (hi - lo) * 0.1 or max(abs(lo) * 0.2, 1)
            ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel(label)
    return scale


def value_axis(ax, ys: Sequence[float], label: str = "%", bounds: tuple[float, float] | None = (0, 100)) -> None:
    """A linear y range that starts and ends where the data does (padded a little, clipped to ``bounds``)."""
    ys = [y for y in ys if y is not None]
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max((hi - lo) * 0.08, 1.0 if bounds else abs(hi) * 0.01 or 1.0)
        lo, hi = lo - pad, hi + pad
        if bounds:  # a marker on a bound stays whole
            lo, hi = max(lo, bounds[0] - 2), min(hi, bounds[1] + 2)
        ax.set_ylim(lo, hi)
    ax.set_yscale("linear")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def legend_outside(ax, fontsize: float = 8, **kw) -> None:
    """The legend to the right of ``ax``, off the data (:func:`save_figure` keeps it in the picture)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=fontsize, **kw)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created) at 120 dpi, cropped to what it draws (legends outside included),
    and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw(ax, series: list[dict]) -> None:
    """Series in one color per configuration; edited filled and solid, pre-edit open and dotted; lines only where
    ``line`` (one configuration at several sizes)."""
    colors = {}
    for s in series:
        color = colors.setdefault(s["config"], f"C{len(colors) % 10}")
        pre = s["state"] == "pre"
        ax.plot(
            s["x"], s["y"], color=color, marker=s.get("marker", "o"), linestyle=(":" if pre else "-") if s["line"] else "",
            markerfacecolor="white" if pre else color, markersize=8 if pre else 5,
        )  # fmt: skip


def _legend(ax, series: list[dict]) -> None:
    """Outside ``ax``: a color per configuration, then what filled and open markers mean."""
    from matplotlib.lines import Line2D

    handles, seen = [], set()
    for s in series:
        if s["config"] not in seen:
            seen.add(s["config"])
            color = f"C{(len(seen) - 1) % 10}"
            handles.append(Line2D([], [], color=color, marker=s.get("marker", "o"), label=s["config_label"]))
    if any(s["state"] == "pre" for s in series):
        handles += [
            Line2D([], [], color="grey", marker="o", label="edited"),
            Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle=":", label="pre-edit"),
        ]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7)


# --- neuraldb eval runs ----------------------------------------------------------------------------------------------


def config_key(run: dict) -> str:
    """The configuration of an evaluation run, as a string: equal keys are the same setup at another size."""
    return json.dumps({k: _field(run, k) for k in CONFIG_FIELDS}, sort_keys=True, default=str)


def _field(run: dict, k: str):
    return run.get(k) or "neuraldb" if k == "method" else run.get(k)  # runs before --method were NeuralDB's


def _flat(run: dict) -> dict:
    out = {k: _field(run, k) for k in CONFIG_FIELDS if k not in ("db_config", "edit_kwargs")}
    out.update({f"edit_kwargs.{k}": v for k, v in (run.get("edit_kwargs") or {}).items()})
    out.update({k: v for k, v in (run.get("db_config") or {}).items()})
    return out


def _labels(runs: Sequence[dict]) -> dict[str, str]:
    """A label per configuration: the model, and where one model has several configurations, up to three settings
    that tell them apart."""
    by_model: dict[str, dict[str, dict]] = {}
    for r in runs:
        by_model.setdefault(str(r["model"]), {})[config_key(r)] = _flat(r)
    labels = {}
    for model, configs in by_model.items():
        keys = sorted({k for c in configs.values() for k in c})
        differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1]
        differ.sort(key=lambda k: (LABEL_ORDER.index(k) if k in LABEL_ORDER else len(LABEL_ORDER), k))
        for key, c in configs.items():
            named = [k for k in differ if c.get(k) is not None]
            shown = [f"{k}={c[k]}" for k in named[:3]] + (["…"] if len(named) > 3 else [])
            labels[key] = f"{model} ({', '.join(shown)})" if shown else model
    return labels


def _by_config(runs: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(config_key(r), []).append(r)
    return [(k, sorted(rs, key=lambda r: r["n_facts"])) for k, rs in groups.items()]


def _series(runs, value, marker="o") -> list[dict]:
    """Pre and post series per configuration; ``value(run, state)`` gives a point's y (None: no point)."""
    labels, out = _labels(runs), []
    for key, rs in sorted(_by_config(runs), key=lambda kv: labels[kv[0]]):
        for state in ("pre", "post"):  # pre drawn first and larger: an unchanged value shows as a ringed dot
            pts = [(r["n_facts"], value(r, state)) for r in rs]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                name = labels[key] + (": pre-edit" if state == "pre" else ": edited")
                out.append({
                    "config": key, "config_label": labels[key], "label": name, "state": state, "x": [p[0] for p in pts],
                    "y": [p[1] for p in pts], "line": len(pts) > 1, "marker": marker,
                })  # fmt: skip
    return out


def quality_series(runs: Sequence[dict], dataset: str, metric: str) -> list[dict]:
    """What :func:`plot_runs` draws in the ``dataset``/``metric`` panel: per configuration, the edited and the
    pre-edit values at each size (``{"config", "label", "state", "x", "y", "line"}``; ``line``: joined)."""
    rs = [r for r in runs if r["dataset"] == dataset]
    return _series(rs, lambda r, state: r[state]["summary"].get(metric))


def general_series(runs: Sequence[dict], measure: str) -> list[dict]:
    """As :func:`quality_series` for general ability, as the change that editing made: ``measure`` "average" (the
    accuracy tasks' average, edited minus unedited, in points) or "wikitext2" (perplexity, percent change)."""
    rs = [r for r in runs if r.get("general")]

    def get(g):
        return g.get("average") if measure == "average" else (g["tasks"].get(measure) or {}).get("value")

    def change(r, state):
        if state == "pre":
            return None
        pre, post = get(r["general"]["pre"]), get(r["general"]["post"])
        if pre is None or post is None:
            return None
        return post - pre if measure == "average" else 100 * (post / pre - 1)

    return _series(rs, change, marker="s")


def quality_figure(runs: Sequence[dict]):
    """Editing quality against edited facts: a row per dataset, a column per metric. Returns ``(fig, panels)``,
    ``panels`` mapping ``(dataset, metric)`` to the series drawn there; None when no run has a dataset."""
    datasets = [d for d in DATASET_NAMES if any(r["dataset"] == d for r in runs)]
    if not datasets:
        return None, {}
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(datasets), len(METRICS), figsize=(4 * len(METRICS), 3.3 * len(datasets)), squeeze=False
    )
    panels = {}
    for row, d in zip(axes, datasets):
        for ax, metric in zip(row, METRICS):
            series = panels[(d, metric)] = quality_series(runs, d, metric)
            _draw(ax, series)
            facts_axis(ax, [x for s in series for x in s["x"]])
            value_axis(ax, [y for s in series for y in s["y"]])
            ax.set_title(f"{DATASET_NAMES[d]}: {metric}", fontsize=10)
        _legend(row[-1], [s for m in METRICS for s in panels[(d, m)]])
    fig.suptitle("Editing quality against edited facts (open markers, dotted: pre-edit; a line joins one configuration)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig, panels


def general_figure(runs: Sequence[dict]):
    """General ability against edited facts: the change in the accuracy tasks' average, and in WikiText-2 perplexity
    where measured.
    Returns ``(fig, panels)`` as :func:`quality_figure`; None when no run measured general ability."""
    panels = {m: general_series(runs, m) for m in ("average", "wikitext2")}
    panels = {m: s for m, s in panels.items() if s}
    if not panels:
        return None, {}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.3), squeeze=False)
    for ax, (m, series) in zip(axes[0], panels.items()):
        _draw(ax, series)
        facts_axis(ax, [x for s in series for x in s["x"]])
        ppl = m == "wikitext2"
        ax.axhline(0, color="grey", linewidth=0.8)
        value_axis(ax, [0] + [y for s in series for y in s["y"]], "% change" if ppl else "points", bounds=None)
        ax.set_title("WikiText-2 perplexity vs unedited" if ppl else "accuracy tasks' average vs unedited", fontsize=10)
    _legend(axes[0][-1], [s for series in panels.values() for s in series])
    fig.suptitle("General ability against edited facts: the change editing made (0: unchanged)", fontsize=9)
    fig.tight_layout()
    return fig, panels


def plot_runs(runs: Sequence[dict], path: str | Path) -> Path | None:
    """``path`` (report.png): editing quality against edited facts; and, where runs measured general ability,
    ``<stem>-general.png`` beside it. Returns ``path``, or None when there is nothing to draw."""
    path = Path(path)
    fig, _ = general_figure(runs)
    if fig is not None:
        save_figure(fig, path.with_name(f"{path.stem}-general{path.suffix}"))
    fig, _ = quality_figure(runs)
    return None if fig is None else save_figure(fig, path)


# --- neuraldb eval --distractors -------------------------------------------------------------------------------------


def plot_scaling(result: dict, path: str | Path) -> Path:
    """A ``--distractors`` result: efficacy / generalization / specificity against table size (pre-edit dotted),
    and the share of prompts that retrieve a distractor anywhere and at their last token."""
    plt = _pyplot()
    r = result["run"]
    xs = [b["keys"] for b in r["by_size"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    ys = []
    for (metric, style), color in zip(zip(METRICS, "os^"), ("C0", "C1", "C2")):
        vals = [b["summary"][metric] for b in r["by_size"]]
        a1.plot(xs, vals, style + "-", color=color, label=metric)
        a1.axhline(r["pre"][metric], color=color, linestyle=":", linewidth=1, label=f"{metric}, pre-edit")
        ys += vals + [r["pre"][metric]]
    facts_axis(a1, xs, "keys in the table (edited + distractors)")
    value_axis(a1, ys)
    a1.set_title(f"{r['n_evaluated']} edited facts", fontsize=10)
    ys = []
    for (kind, style), color in zip(zip(("rewrite", "paraphrase", "neighborhood"), "os^"), ("C0", "C1", "C2")):
        for part, line, where in (("hits", "-", "anywhere"), ("hits_last_token", "--", "at the last prompt token")):
            vals = [100 * b[part][kind]["distractor"] / b[part][kind]["prompts"] for b in r["by_size"]]
            a2.plot(xs, vals, style + line, color=color, label=f"{kind}, {where}")
            ys += vals
    facts_axis(a2, xs, "keys in the table")
    value_axis(a2, ys, "% of prompts")
    a2.set_title("prompts retrieving a distractor", fontsize=10)
    for a in (a1, a2):
        legend_outside(a)
    fig.tight_layout()
    return save_figure(fig, path)


def redraw(results_json: str | Path) -> list[Path]:
    """Redraw the pictures beside a saved ``results.json`` / ``report.json`` (an eval run, runs, or a
    ``--distractors`` result); returns the files written."""
    path = Path(results_json)
    data = json.loads(path.read_text(encoding="utf-8"))
    out = path.with_name("report.png")
    if "run" in data and "dataset" not in data:
        return [plot_scaling(data, out)]
    runs = data.get("runs", [data])
    drawn = plot_runs(runs, out)
    general = out.with_name("report-general.png")
    return [p for p in (drawn, general if any(r.get("general") for r in runs) else None) if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m neuraldb.evaluation.plots RESULTS_JSON...", file=sys.stderr)
        return 2
    for p in paths:
        for written in redraw(p):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
