"""Editing progress moves during a batch: facts as they finish, the optimisation step, units on the bar (issue 29:
the bar sat at 0/N for the whole first batch of 32 facts, then jumped)."""

from __future__ import annotations

import io
import re

import pytest
from _tiny_editing import FACTS
from neuraldb.editing import edit, edit_checkpointed

pytest.importorskip("transformers")
tqdm = pytest.importorskip("tqdm").tqdm

pytestmark = pytest.mark.usefixtures("neuraldb_cache")

HP = {"layer": 2, "n_prefixes": 1, "prefix_len": 3, "batch_size": 32}


class _RecordingBar:
    """A tqdm stand-in that records, in order, what the editing loop shows."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def update(self, n: int) -> None:
        self.events.append(("update", n))

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.events.append(("status", text))


def test_bar_shows_every_step_before_the_batch_ends(tiny):
    model, tok = tiny
    bar = _RecordingBar()
    # stop_loss 0: no fact stops early, so all three finish on the last step of their one batch
    edit(model, tok, FACTS[:3], progress=bar, steps=4, stop_loss=0.0, **HP)
    steps = [v for e, v in bar.events if e == "status" and "step" in v]
    assert [v.split(",")[0] for v in steps] == [f"batch 1/1 step {i}/4" for i in range(1, 5)]
    first_update = next(i for i, (e, _) in enumerate(bar.events) if e == "update")
    assert steps[2] in [v for _, v in bar.events[:first_update]]  # moved while the batch still ran
    assert sum(v for e, v in bar.events if e == "update") == 3
    # a time left from the steps, before any fact has finished; nothing left after the last step
    assert all(re.search(r", \u2264(\d\d:)+\d\d left$", v) for v in steps)
    assert steps[-1].endswith("\u226400:00 left")


def test_facts_are_counted_as_they_finish_not_per_batch(tiny):
    model, tok = tiny
    calls: list[int] = []
    bar = _RecordingBar()
    # a stop loss every fact is below at once: each finishes on step 1 of 6, and is counted then
    edit(model, tok, FACTS[:3], progress=bar, steps=6, stop_loss=1e9, **HP)
    assert [v for e, v in bar.events if e == "update"] == [3]
    assert [v.split(",")[0] for e, v in bar.events if e == "status" and "step" in v] == ["batch 1/1 step 1/6"]
    edit(model, tok, FACTS[:3], progress=calls.append, steps=6, stop_loss=1e9, **HP)
    assert calls == [3]


def test_real_bar_has_units_and_steps(tiny):
    model, tok = tiny
    out = io.StringIO()
    bar = tqdm(total=3, file=out, unit="fact", mininterval=0)
    edit(model, tok, FACTS[:3], progress=bar, steps=3, stop_loss=0.0, **HP)
    bar.close()
    text = out.getvalue()
    assert "3/3" in text and "fact/s" in text
    assert "step 3/3" in text


def test_own_bar_counts_facts(tiny, monkeypatch, capsys):
    model, tok = tiny
    edit(model, tok, FACTS[:3], progress=True, steps=2, stop_loss=0.0, **{**HP, "batch_size": 2})
    err = capsys.readouterr().err
    assert "3/3 fact" in err and "batch 2/2 step 2/2" in err and " left" in err


def test_checkpointed_bar_shows_steps(tiny, tmp_path, capsys):
    model, tok = tiny
    edit_checkpointed(model, tok, FACTS[:3], tmp_path / "db.safetensors", steps=2, stop_loss=0.0, **HP)
    err = capsys.readouterr().err
    assert "3/3" in err and "step 2/2" in err
