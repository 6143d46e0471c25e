"""``neuraldb eval``'s defaults (issue 29): fluency generation is opt-in, a missing matplotlib is said out loud, and
a single run writes one JSON report (results.json) beside per_fact.json."""

from __future__ import annotations

import json
import sys

import pytest
from neuraldb.cli import main
from neuraldb.evaluation import pipeline, report

SUMMARY = {"efficacy": 100.0, "generalization": 50.0, "specificity": 80.0, "fluency": None, "consistency": None}


def _stub_run(**kwargs) -> dict:
    return {
        "model": "stub",
        "dataset": "counterfact",
        "n_facts": 2,
        "pre": {"summary": dict(SUMMARY, efficacy=0.0), "notes": [], "per_fact": [{}, {}]},
        "post": {"summary": SUMMARY, "notes": [], "per_fact": [{}, {}]},
        "command": "neuraldb eval ...",
        "timing": {"edit": 1.0},
        "fluency_asked": (kwargs["fluency"], kwargs["fluency_max_facts"]),
    }


@pytest.fixture
def eval_argv(tmp_path, monkeypatch):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"subject": "A", "prompt": "{} is", "target_new": "B"}\n', encoding="utf-8")
    monkeypatch.setattr(pipeline, "run_eval", _stub_run)
    return ["eval", "--dataset", "counterfact", "--facts", str(facts), "--no-progress", "--out", str(tmp_path / "o")]


def _asked(tmp_path) -> list:
    return json.loads((tmp_path / "o" / "results.json").read_text(encoding="utf-8"))["fluency_asked"]


def test_fluency_is_opt_in(eval_argv, tmp_path, capsys):
    assert main(eval_argv) == 0
    assert _asked(tmp_path) == [False, None]
    assert main([*eval_argv, "--fluency"]) == 0
    assert _asked(tmp_path) == [True, None]
    assert main([*eval_argv, "--fluency-facts", "3"]) == 0  # the recorded docs/results commands
    assert _asked(tmp_path) == [True, 3]
    assert main([*eval_argv, "--no-fluency"]) == 0
    assert _asked(tmp_path) == [False, None]
    capsys.readouterr()
    assert main([*eval_argv, "--no-fluency", "--fluency"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--no-fluency" in err and "--fluency" in err


def test_help_says_what_is_slow_and_what_is_optional(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "off unless --fluency" in out and "--fluency-facts" in out
    assert "report.png needs matplotlib" in out and "pip install matplotlib" in out


def test_one_json_report_per_run(eval_argv, tmp_path):
    assert main(eval_argv) == 0
    out = tmp_path / "o"
    run = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert run["model"] == "stub" and "per_fact" not in run["post"]
    assert not (out / "report.json").exists()  # the same run wrapped in {"runs": [...]} was a second, unclear copy
    # --combine reads results.json files and writes the combined report.json
    assert main(["eval", "--combine", str(out / "results.json"), "--out", str(tmp_path / "c")]) == 0
    assert len(json.loads((tmp_path / "c" / "report.json").read_text(encoding="utf-8"))["runs"]) == 1


def test_missing_matplotlib_is_said_not_silent(eval_argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.plot_unavailable() is not None
    assert main(eval_argv) == 0
    err = capsys.readouterr().err
    assert "report.png will be skipped: matplotlib is not installed (pip install matplotlib" in err
    assert not (tmp_path / "o" / "report.png").exists() and (tmp_path / "o" / "report.md").exists()
    # an input error is still one line, not preceded by the notice
    assert main([*eval_argv, "--db", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--db" in err and "no such file" in err


def test_plot_written_when_matplotlib_is_there(eval_argv, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert report.plot_unavailable() is None
    assert main(eval_argv) == 0
    assert (tmp_path / "o" / "report.png").stat().st_size > 1000
    assert "skipped" not in capsys.readouterr().err
