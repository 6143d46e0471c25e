"""The paper's delete experiment (App. J.5, Table 16): edit N facts, delete the even-indexed ones, compare.

Three states of one model: (i) pre-edited (database disabled), (ii) post-edited (all N facts), (iii) deleted-even
(the database rows of facts 0, 2, 4, ... removed; indices are 0-based positions in the edited list). Each state is
evaluated once on all N facts (or on a chosen subset of them, keeping each fact's parity in the edited list); the
per-fact results are then split into the odd- and even-indexed halves, and each
half reports efficacy, generalization and specificity with the dataset's own definitions
(:mod:`.counterfact` or :mod:`.zsre`). Expected: even facts return to their pre-edited numbers, odd facts keep
their post-edited ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..facts import Fact

__all__ = ["deletion_experiment", "deletion_table", "half_summary"]

_KEYS = {
    "counterfact": {
        "efficacy": "rewrite_success",
        "generalization": "paraphrase_success",
        "specificity": "neighborhood_success",
    },
    "zsre": {"efficacy": "rewrite_acc", "generalization": "paraphrase_acc", "specificity": "neighborhood_acc"},
}


def half_summary(result: dict, indices: Sequence[int], kind: str) -> dict:
    """Efficacy / generalization / specificity (x 100) over the facts at ``indices`` of an evaluation result."""
    out = {}
    for metric, key in _KEYS[kind].items():
        vals = [result["per_fact"][i].get(key) for i in indices]
        vals = [v for v in vals if v is not None]
        out[metric] = 100 * sum(vals) / len(vals) if vals else None
    out["n_facts"] = len(indices)
    return out


def deletion_experiment(
    model,
    tok,
    facts: Sequence[Fact],
    db,
    *,
    evaluate: Callable[[Sequence[Fact]], dict],
    kind: str,
    ids: Sequence[int] | None = None,
    pre: dict | None = None,
    post: dict | None = None,
    repatch: Callable[[], None] | None = None,
    evaluated: Sequence[int] | None = None,
) -> dict:
    """Run App. J.5 on a model patched with ``db`` that holds ``facts`` (``ids[i]`` is fact i's database id;
        default: ``db.ids()`` in insertion order). ``evaluate(facts)`` evaluates the model as it currently is;
        ``pre``/``post`` reuse results already computed. ``repatch()`` is called after the deletion (for patchers
        that copy the database; the default ``neuraldb`` patch reads it live). ``evaluated``: sorted indices of the facts
    ``evaluate`` is given (default all; ``pre``/``post`` must then be results on those facts); the halves still follow
    each fact's index in ``facts``, so the rows deleted are always those of facts 0, 2, 4, ... The database is modified
    in place."""
    if kind not in _KEYS:
        raise ValueError(f"kind must be one of {sorted(_KEYS)}")
    ids = list(db.ids() if ids is None else ids)
    if len(ids) != len(facts):
        raise ValueError(f"{len(facts)} facts but {len(ids)} database ids")
    evaluated = list(range(len(facts)) if evaluated is None else evaluated)
    if any(not 0 <= i < len(facts) for i in evaluated):
        raise ValueError(f"evaluated: expected indices in [0, {len(facts)}), got {evaluated}")
    shown = [facts[i] for i in evaluated]
    if pre is None:
        from ..patching import disabled

        with disabled(model):
            pre = evaluate(shown)
    if post is None:
        post = evaluate(shown)
    # positions in the evaluated results, grouped by the fact's index in the edited list
    even = [p for p, i in enumerate(evaluated) if i % 2 == 0]
    odd = [p for p, i in enumerate(evaluated) if i % 2 == 1]
    db.delete([ids[i] for i in range(0, len(facts), 2)])
    if repatch is not None:
        repatch()
    deleted = evaluate(shown)
    states = {"pre": pre, "post": post, "deleted_even": deleted}
    return {
        "kind": kind,
        "n_facts": len(facts),
        "n_deleted": len(range(0, len(facts), 2)),
        "n_evaluated": len(evaluated),
        "halves": {
            half: {state: half_summary(res, idx, kind) for state, res in states.items()}
            for half, idx in (("odd", odd), ("even", even))
        },
        "definition": "facts indexed from 0; 'even' = facts 0, 2, 4, ... whose rows were deleted",
    }


def deletion_table(result: dict, metrics: Sequence[str] = ("efficacy", "generalization", "specificity")) -> str:
    """Markdown in the layout of the paper's Table 16."""
    lines = ["| Group | Metric | Pre-edited | Post-edited | Delete even edits |", "|---|---|---|---|---|"]
    for half, label in (("odd", "Odd-indexed facts"), ("even", "Even-indexed facts (deleted)")):
        h = result["halves"][half]
        for m in metrics:
            vals = [h[s].get(m) for s in ("pre", "post", "deleted_even")]
            if all(v is None for v in vals):
                continue
            cells = " | ".join("–" if v is None else f"{v:.1f}" for v in vals)
            lines.append(f"| {label} | {m.capitalize()} | {cells} |")
    return "\n".join(lines)
