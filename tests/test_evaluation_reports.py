"""Deletion experiment bookkeeping (App. J.5) and the JSON / Markdown / plot reports."""

import json

import pytest
from neuraldb.evaluation.counterfact import CONSISTENCY_SKIPPED
from neuraldb.evaluation.deletion import deletion_experiment, deletion_table, half_summary
from neuraldb.evaluation.report import markdown_report, write_reports
from neuraldb.facts import Fact


class FakeDB:
    def __init__(self, n):
        self._ids = list(range(100, 100 + n))

    def ids(self):
        return list(self._ids)

    def delete(self, ids):
        for i in ids:
            self._ids.remove(i)


def _facts(n):
    return [Fact(f"S{i}", "{} is in", "X", target_true="Y") for i in range(n)]


def test_deletion_reverts_even_half_only():
    facts, db = _facts(6), FakeDB(6)

    def evaluate(fs):  # an edited fact succeeds iff its row is still in the database
        live = set(db.ids())
        return {
            "per_fact": [
                {
                    "rewrite_success": float(100 + i in live),
                    "paraphrase_success": 0.5 * (100 + i in live),
                    "neighborhood_success": 1.0,
                }
                for i in range(len(fs))
            ]
        }

    pre = {"per_fact": [{"rewrite_success": 0.0, "paraphrase_success": 0.0, "neighborhood_success": 1.0}] * 6}
    r = deletion_experiment(None, None, facts, db, evaluate=evaluate, kind="counterfact", pre=pre)
    assert db.ids() == [101, 103, 105]
    odd, even = r["halves"]["odd"], r["halves"]["even"]
    assert odd["post"]["efficacy"] == 100 and odd["deleted_even"]["efficacy"] == 100
    assert even["post"]["efficacy"] == 100 and even["deleted_even"]["efficacy"] == 0
    assert even["deleted_even"]["generalization"] == 0 and odd["deleted_even"]["generalization"] == 50
    assert even["pre"]["n_facts"] == 3
    md = deletion_table(r)
    assert "| Even-indexed facts (deleted) | Efficacy | 0.0 | 100.0 | 0.0 |" in md


def test_deletion_on_an_evaluated_subset_keeps_each_facts_parity():
    facts, db = _facts(6), FakeDB(6)
    seen = []

    def evaluate(fs):
        seen.append([f.subject for f in fs])
        live = set(db.ids())
        idx = [int(f.subject[1:]) for f in fs]
        return {
            "per_fact": [
                {"rewrite_success": float(100 + i in live), "paraphrase_success": float(i), "neighborhood_success": 1.0}
                for i in idx
            ]
        }

    pre = {"per_fact": [{"rewrite_success": 0.0, "paraphrase_success": 0.0, "neighborhood_success": 1.0}] * 3}
    r = deletion_experiment(None, None, facts, db, evaluate=evaluate, kind="counterfact", evaluated=[1, 2, 5], pre=pre)
    assert db.ids() == [101, 103, 105]  # the even rows of all six facts, not of the three evaluated
    assert seen == [["S1", "S2", "S5"]] * 2
    odd, even = r["halves"]["odd"], r["halves"]["even"]
    assert odd["post"]["generalization"] == 300.0 and odd["post"]["n_facts"] == 2  # facts 1 and 5
    assert even["post"]["generalization"] == 200.0 and even["post"]["n_facts"] == 1  # fact 2
    assert even["deleted_even"]["efficacy"] == 0 and odd["deleted_even"]["efficacy"] == 100
    assert r["n_deleted"] == 3 and r["n_evaluated"] == 3
    with pytest.raises(ValueError, match="evaluated"):
        deletion_experiment(None, None, facts, FakeDB(6), evaluate=evaluate, kind="counterfact", evaluated=[6], pre=pre)


def test_half_summary_zsre_keys():
    res = {
        "per_fact": [
            {"rewrite_acc": 1.0, "paraphrase_acc": 0.5, "neighborhood_acc": None},
            {"rewrite_acc": 0.0, "paraphrase_acc": 0.5, "neighborhood_acc": 0.25},
        ]
    }
    s = half_summary(res, [0, 1], "zsre")
    assert s == {"efficacy": 50.0, "generalization": 50.0, "specificity": 25.0, "n_facts": 2}


def _run(n, e):
    s = {
        "efficacy": e,
        "generalization": e - 5,
        "specificity": 80.0,
        "fluency": 620.0,
        "consistency": None,
        "efficacy_magnitude": 10.0,
        "generalization_magnitude": 5.0,
        "specificity_magnitude": 1.0,
        "score": 70.0,
    }
    pre = dict(s, efficacy=10.0, generalization=12.0)
    g = {
        "tasks": {
            "arc_easy": {"acc": 40.0, "acc_norm": 42.0, "value": 42.0, "primary": "acc_norm", "n": 10, "chance": 25.0},
            "wikitext2": {"token_ppl": 20.5, "value": 20.5, "primary": "token_ppl", "n_tokens": 100},
        },
        "average": 42.0,
        "notes": [],
        "definitions": {"acc_norm": "length-normalised"},
    }
    return {
        "model": "stub",
        "dataset": "counterfact",
        "n_facts": n,
        "facts_path": "f",
        "pre": {"summary": pre, "notes": [CONSISTENCY_SKIPPED], "definitions": {"efficacy": "def"}},
        "post": {"summary": s, "notes": [CONSISTENCY_SKIPPED], "per_fact": [1, 2]},
        "general": {"pre": g, "post": g},
        "command": f"neuraldb eval --n {n}",
        "timing": {"edit": 1.0},
    }


def test_markdown_report_has_table2_columns_and_states_skipped_consistency():
    md = markdown_report([_run(100, 99.0), _run(1000, 98.0)])
    assert "| Model | State | Facts | Efficacy ↑ | Generalization ↑ | Specificity ↑ | Fluency ↑ | Consistency ↑" in md
    assert "| stub | NeuralDB | 1000 | 98.0 | 93.0 | 80.0 | 620.0 | – |" in md
    assert "| stub | Pre-edited | 100 | 10.0 |" in md
    assert "consistency skipped" in md
    assert "| arc_easy | acc_norm (n=10) | 25.0 | 42.0 | 42.0 | 42.0 | 42.0 |" in md
    assert "neuraldb eval --n 1000" in md


def test_write_reports_files(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_reports([_run(100, 99.0), _run(1000, 98.0)], tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["runs"]) == 2 and "per_fact" not in data["runs"][0]["post"]
    assert paths["plot"].stat().st_size > 1000
    assert paths["markdown"].read_text().startswith("# neuraldb evaluation")


def test_zsre_target_selection_rome_vs_easyedit():
    from neuraldb.evaluation.pipeline import select_facts

    f = Fact("IAAF", "When was {} founded?", "2006", target_true="1998", extras={"answers": ("1998",)})
    (rome,) = select_facts([f], "zsre", n_facts=1, zsre_target="answers")
    assert rome.target_new == "1998" and rome.extras["answers"] == ("1998",)
    (easy,) = select_facts([f], "zsre", n_facts=1, zsre_target="alt")
    assert easy.target_new == "2006"
    assert len(select_facts([f] * 5, "counterfact", n_facts=2, offset=1)) == 2


def test_eval_command_combines_results(tmp_path):
    import argparse

    pytest.importorskip("matplotlib")
    from neuraldb.evaluation import command

    for n in (100, 1000):
        (tmp_path / f"r{n}.json").write_text(json.dumps(_run(n, 99.0)))
    # a --distractors result lives beside the runs (docs/results/*/results.json) and is skipped
    (tmp_path / "distractors.json").write_text(json.dumps({"n_dropped": 0, "run": {"by_size": []}}))
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "eval",
            "--combine",
            str(tmp_path / "r100.json"),
            str(tmp_path / "r1000.json"),
            str(tmp_path / "distractors.json"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert command.run(args) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| stub | NeuralDB | 1000 |" in md and "| stub | NeuralDB | 100 |" in md


def test_markdown_report_names_a_baseline_method_in_the_state_column():
    md = markdown_report([dict(_run(100, 55.0), method="memit"), dict(_run(100, 97.0), method="alphaedit")])
    assert "| stub | MEMIT | 100 | 55.0 |" in md and "| stub | AlphaEdit | 100 | 97.0 |" in md
    assert "| stub | NeuralDB |" not in md
