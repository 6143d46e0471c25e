"""``neuraldb demo``: edit built-in counterfactual facts into SmolLM2, show answers before and after, delete one.

The facts (``neuraldb/data/demo_facts.jsonl``) were chosen because unedited SmolLM2-135M-Instruct answers each
of their prompts, paraphrases and unrelated prompts correctly (greedy decoding), so every change the demo shows is
the edit's doing.
"""

from __future__ import annotations

import sys
import time
from importlib import resources
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from neuraldb.facts import Fact

DEMO_FACTS = "demo_facts.jsonl"


def demo_facts() -> list[Fact]:
    """The built-in demo facts (``Fact`` objects with one paraphrase and one unrelated prompt each)."""
    from neuraldb import facts

    with resources.as_file(resources.files("neuraldb") / "data" / DEMO_FACTS) as path:
        return facts.load(path)


def _starts_with(text: str, target: str | None) -> bool:
    return bool(target) and " ".join(text.split()).lower().startswith(target.lower())


def _mark(kind: str, before: str, after: str, fact: Fact) -> str:
    if kind == "unrelated":
        return "same" if after == before else "CHANGED"
    if _starts_with(after, fact.target_new):
        return "new"
    if _starts_with(after, fact.target_true):
        return "old"
    return "other"


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def run_demo(
    *, model_name: str = "smollm2", max_new_tokens: int = 6, progress: bool = True, out: TextIO | None = None
) -> int:
    """Load the model, edit the demo facts, print answers before and after, delete one edit; returns 0.

    Prints to ``out`` (stdout when None). What ``neuraldb demo`` and ``make demo`` run.

    Example::

        >>> from neuraldb.cli_demo import run_demo
        >>> run_demo(max_new_tokens=4)  # doctest: +SKIP
    """
    from neuraldb.cli_support import generate_text, load_model_verbose, one_line
    from neuraldb.editing import edit
    from neuraldb.patching import patch_model

    out = out or sys.stdout
    t_start = time.perf_counter()
    facts = demo_facts()
    print(
        f"neuraldb demo: edit {len(facts)} counterfactual facts into {model_name!r}, compare greedy answers "
        f"({max_new_tokens} new tokens) before and after, then delete one edit.\n",
        file=out,
        flush=True,
    )
    model, tok = load_model_verbose(model_name, out=out)

    print(f"Editing {len(facts)} facts ...", file=out, flush=True)
    stats: dict = {}
    db = edit(model, tok, facts, progress=progress, stats=stats)
    seconds = stats.get("seconds", 0.0)
    print(
        f"Edited {len(facts)} facts in {seconds:.1f} s ({seconds / len(facts):.2f} s per fact): layer {db.layer}, "
        f"gamma {db.gamma}, {db.config.get('compute_dtype', 'float32')} steps, template {db.template!r}\n",
        file=out,
        flush=True,
    )

    def answer(prompt: str) -> str:
        return one_line(generate_text(model, tok, prompt, template=db.template, max_new_tokens=max_new_tokens), 28)

    probes = []  # (fact, kind, prompt)
    for f in facts:
        probes.append((f, "edited", f.text))
        probes += [(f, "paraphrase", p) for p in f.paraphrases[:1]]
        probes += [(f, "unrelated", p) for p in f.neighborhood[:1]]
    before = [answer(p) for _, _, p in probes]  # the model is not patched yet: these are the unedited answers
    patch_model(model, db)
    after = [answer(p) for _, _, p in probes]

    rows = []
    for (f, kind, prompt), b, a in zip(probes, before, after):
        rows.append((kind, prompt, b, a, _mark(kind, b, a, f)))
    _table(rows, ("", "prompt", "unedited model", "edited model", ""), out)
    counts = {}
    for (f, kind, _), (_, _, _, _, mark) in zip(probes, rows):
        good = mark == ("same" if kind == "unrelated" else "new")
        n_good, n = counts.get(kind, (0, 0))
        counts[kind] = (n_good + good, n + 1)
    print(
        "\n  edited prompts answering the new object: {}/{}; paraphrases: {}/{}; unrelated prompts unchanged: {}/{}\n".format(
            *counts.get("edited", (0, 0)), *counts.get("paraphrase", (0, 0)), *counts.get("unrelated", (0, 0))
        ),
        file=out,
    )

    victim_id, victim = db.ids()[0], facts[0]
    keep = facts[1]
    print(f"Deleting fact {victim_id} ({victim.subject}: {victim.target_true} -> {victim.target_new}) ...", file=out)
    db.delete([victim_id])
    deleted_rows = []
    for f, label in ((victim, "deleted"), (keep, "kept")):
        i = next(k for k, (g, kind, _) in enumerate(probes) if g is f and kind == "edited")
        now = answer(f.text)
        mark = "reverted" if now == before[i] else ("still new" if _starts_with(now, f.target_new) else "other")
        deleted_rows.append((label, f.text, after[i], now, mark))
    _table(deleted_rows, ("", "prompt", "before delete", "after delete", ""), out)
    print(f"\nDone in {time.perf_counter() - t_start:.1f} s.", file=out)
    return 0
