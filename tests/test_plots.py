"""The evaluation figures (issue 29, "plots a reader can trust"): points are joined only within one configuration,
no symlog axis, y ranges where the data is, legends outside the axes; on tiny synthetic results."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from neuraldb.evaluation import plots
from neuraldb.evaluation.report import write_reports

DEFAULTS = {"lr": 2.0, "steps": 10, "n_prefixes": 3}


def _run(model, n, db_config, eff_post, eff_pre=20.0, dataset="zsre", general=None):
    summary = {"efficacy": eff_post, "generalization": eff_post - 10, "specificity": 25.0}
    run = {
        "model": model, "dataset": dataset, "n_facts": n, "facts_path": "facts.json", "template": "{}",
        "layer": 6, "gamma": 0.65, "db_config": db_config,
        "pre": {"summary": dict(summary, efficacy=eff_pre)}, "post": {"summary": summary},
    }  # fmt: skip
    if general:
        run["general"] = general
    return run


def _general(pre_ppl, post_ppl):
    def state(ppl):
        tasks = {
            "wikitext2": {"value": ppl, "primary": "ppl", "n_tokens": 9},
            "piqa": {"value": 60.0, "primary": "acc", "n": 9},
        }
        return {"average": 40.0, "tasks": tasks}

    return {"pre": state(pre_ppl), "post": state(post_ppl)}


RUNS = [
    _run("smollm2", 100, dict(DEFAULTS, lr=0.5, steps=20), 87.0),  # older defaults
    _run("smollm2", 1000, DEFAULTS, 62.0),
    _run("smollm2", 10000, DEFAULTS, 55.0),
    _run("gemma", 1000, DEFAULTS, 65.0),
]


def test_only_one_configuration_at_several_sizes_is_joined():
    series = [s for s in plots.quality_series(RUNS, "zsre", "efficacy") if s["state"] == "post"]
    by_x = {tuple(s["x"]): s for s in series}
    assert set(by_x) == {(100,), (1000, 10000), (1000,)}, by_x
    assert by_x[(1000, 10000)]["line"] and by_x[(1000, 10000)]["y"] == [62.0, 55.0]
    assert not by_x[(100,)]["line"] and not by_x[(1000,)]["line"]
    # the two smollm2 configurations are told apart by what differs, the lone gemma one by its name
    labels = {s["config_label"] for s in series}
    assert labels == {"gemma", "smollm2 (lr=0.5, steps=20)", "smollm2 (lr=2.0, steps=10)"}, labels
    # the pre-edit state is a point of each run, never an x = 0 point joined to the edited ones
    assert all(0 not in s["x"] for s in plots.quality_series(RUNS, "zsre", "efficacy"))


def test_axes_are_honest_and_legends_outside(tmp_path):
    fig, panels = plots.quality_figure(RUNS)
    assert set(panels) == {("zsre", m) for m in plots.METRICS}
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"  # 100..10,000 spans two decades
        assert list(ax.get_xticks()) == [100, 1000, 10000]
    eff = fig.axes[0]
    lo, hi = eff.get_ylim()
    assert 10 < lo < 20 and 87 < hi < 95, (lo, hi)  # starts where the data does, not at 0 or -10
    legend = fig.axes[-1].get_legend()
    fig.canvas.draw()
    box, axes_box = legend.get_window_extent(), fig.axes[-1].get_window_extent()
    assert box.x0 >= axes_box.x1, "the legend lies over the data"
    # sizes within a decade: a linear axis
    fig, _ = plots.quality_figure([_run("m", 100, DEFAULTS, 90.0), _run("m", 500, DEFAULTS, 80.0)])
    assert all(ax.get_xscale() == "linear" for ax in fig.axes)


def test_no_symlog_anywhere_in_the_written_figures(tmp_path, monkeypatch):
    import matplotlib.axes

    scales = []
    real = matplotlib.axes.Axes.set_xscale

    def spy(self, value, **kw):
        scales.append(value)
        return real(self, value, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_xscale", spy)
    runs = [dict(r, general=_general(30.0, 30.0 + i)) for i, r in enumerate(RUNS)]
    paths = write_reports(runs, tmp_path)
    assert paths["plot"].is_file() and paths["general_plot"] == tmp_path / "report-general.png"
    assert paths["general_plot"].is_file()
    assert scales and "symlog" not in scales, scales
    ppl = [s for s in plots.general_series(runs, "wikitext2") if s["line"]]
    assert len(ppl) == 1 and ppl[0]["y"] == pytest.approx([100 / 30, 200 / 30])  # % change vs unedited
