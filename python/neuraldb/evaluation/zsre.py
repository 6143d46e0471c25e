"""ZsRE metrics as ROME/MEMIT compute them (``eval_utils_zsre.py``, ``dsets/zsre.py``, ``summarize.py``).

Teacher-forced token-level top-1 accuracy: for a prompt p and an answer a with tokens ``t_1..t_k`` (tokenised as
``" " + a``), feed ``p + t_1..t_{j-1}`` and count ``t_j`` correct when it is the model's argmax; a prompt's score
is the fraction of correct tokens, a fact's score is the mean over its prompts, the metric is the mean over facts
x 100.

* Efficacy: answer ``target_new`` after the rewrite prompt (``src``).
* Generalization: answer ``target_new`` after each paraphrase (``rephrase``).
* Specificity (ROME/MEMIT's definition, the one the NeuralDB paper's Table 2 uses): answer ``loc_ans`` after
  ``loc + "?"`` — accuracy against the dataset's answer, so an unedited model scores well below 100.
* ``locality_unchanged`` (MEND's notion, reported beside it when a pre-edit run is given): the fraction of
  ``loc_ans`` positions where the edited model's argmax token equals the unedited model's.

KnowEdit's zsRE records add prompts about the edited subject itself (EasyEdit's token-level definitions):

* ``same_subject_locality`` (``locality.Relation_Specificity``: the same subject, another relation, e.g. "The taxon
  rank of Epaspidoceras is" -> "genus"): the ground-truth answer is teacher-forced after the prompt (as written, no
  "?" added) and a prompt scores the share of its answer positions whose argmax token is the same in the edited as in
  the unedited model; mean over a fact's prompts, then over facts, x 100 (:func:`same_subject_locality`, from a
  pre- and a post-edit result). The prompts hold the edited subject, so a gate keyed on the subject's tokens is likely
  to open on them; 100 means the edit changed none of their answer tokens.
* ``portability_<kind>`` (``portability.Reasoning`` etc., e.g. "What is the common name for the family Epaspidoceras
  belongs to?" -> "Owlet moths", a consequence of the new target): teacher-forced token accuracy of the portability
  answer, as efficacy, per kind (reasoning, subject_aliasing, logical_generalization), pre- and post-edit.

Facts without these fields have no such prompts; a metric no evaluated fact has is None, not 0. Every zsRE prompt is
scored in full in every state (no gate-based re-use of pre-edit scores), so the post-edit numbers are exact.

ROME re-tokenises ``prompt + decode(target_tokens[:j])`` for every j; here one forward per prompt+answer scores all
positions at once (identical whenever the tokeniser splits at the answer's leading space, as byte-level BPEs do).

Which string is ``target_new`` is the loader's decision: ROME's ``MENDQADataset`` edits toward ``answers[0]``,
EasyEdit toward ``alt``; the report records the facts' targets as given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ..facts import Fact
from .scoring import score_continuations

__all__ = [
    "PORTABILITY_KINDS",
    "evaluate_zsre",
    "loc_answers",
    "locality_unchanged",
    "portability_prompts",
    "same_subject_locality",
    "same_subject_prompts",
]

# KnowEdit's portability kinds (zsRE records carry one of them each); others a file holds are reported too.
PORTABILITY_KINDS = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")


def loc_answers(fact: Fact) -> list[str | None]:
    """Answers for ``fact.neighborhood`` prompts, from ``extras`` (``loc_ans``, ``neighborhood_answers`` or
    ``locality_ground_truth``), aligned with ``fact.neighborhood``; None where unknown."""
    ex = fact.extras
    ans = ex.get("neighborhood_answers", ex.get("loc_ans", ex.get("locality_ground_truth")))
    if ans is None:
        return [None] * len(fact.neighborhood)
    if isinstance(ans, str):
        ans = [ans] * len(fact.neighborhood)
    ans = list(ans) + [None] * (len(fact.neighborhood) - len(ans))
    return ans[: len(fact.neighborhood)]


def _answer(value) -> str | None:
    """The first answer string of a KnowEdit ``ground_truth`` (a string, or a possibly nested list of them)."""
    while isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    return (value.strip() or None) if isinstance(value, str) else None


def _entries(field, kind: str) -> list[tuple[str, str]]:
    """``(prompt, answer)`` of ``field[kind]`` in KnowEdit's layout ``{kind: [{"prompt", "ground_truth"}, ...]}``."""
    out = []
    entries = field.get(kind) if isinstance(field, dict) else None
    for e in entries if isinstance(entries, list) else ():
        if isinstance(e, dict) and isinstance(e.get("prompt"), str) and e["prompt"].strip():
            a = _answer(e.get("ground_truth"))
            if a:
                out.append((e["prompt"], a))
    return out


def same_subject_prompts(fact: Fact) -> list[tuple[str, str]]:
    """KnowEdit's same-subject locality prompts of ``fact``: ``(prompt, answer)`` from
    ``extras["locality"]["Relation_Specificity"]`` (the answer is the first ground truth); [] when absent."""
    return _entries(fact.extras.get("locality"), "Relation_Specificity")


def portability_prompts(fact: Fact) -> list[tuple[str, str, str]]:
    """``(kind, prompt, answer)`` of ``fact``'s KnowEdit portability prompts (``extras["portability"]``, a dict of
    lists of ``{"prompt", "ground_truth"}``); [] when absent or in another layout (MEND's portability file has
    ``{"New Question", "New Answer"}``, written for its ``alt`` target, and is not read)."""
    field = fact.extras.get("portability")
    if not isinstance(field, dict):
        return []
    return [(kind, p, a) for kind in field for p, a in _entries(field, kind)]


def _metric_name(kind: str) -> str:
    return "portability_" + re.sub(r"\W+", "_", kind).strip("_").lower()


def _loc_prompt(p: str) -> str:
    return p if p.rstrip().endswith("?") else p + "?"


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def evaluate_zsre(
    model,
    tok,
    facts: Sequence[Fact],
    *,
    batch_size: int = 32,
    prompt_fn: Callable[[str], str] | None = None,
    show_progress: bool = True,
) -> dict:
    """Efficacy / generalization / specificity of ZsRE ``facts`` (token-level top-1 accuracy, x 100), and, for
    KnowEdit records, accuracy on the same-subject and portability prompts (the argmax tokens kept for
    :func:`same_subject_locality`)."""
    pf = prompt_fn or (lambda s: s)
    ctxs, conts, index = [], [], []

    def add(i: int, kind: str, prompt: str, answer: str) -> None:
        index.append((i, kind))
        ctxs.append(pf(prompt))
        conts.append(" " + answer.strip())

    for i, f in enumerate(facts):
        add(i, "rewrite", f.text, f.target_new)
        for p in f.paraphrases:
            add(i, "paraphrase", p, f.target_new)
        for p, a in zip(f.neighborhood, loc_answers(f)):
            if a:
                add(i, "neighborhood", _loc_prompt(p), a)
        for p, a in same_subject_prompts(f):
            add(i, "same_subject", p, a)
        for kind, p, a in portability_prompts(f):
            add(i, _metric_name(kind), p, a)
    scores = score_continuations(
        model, tok, ctxs, conts, batch_size=batch_size, desc="zsre", show_progress=show_progress
    )
    per_fact = [
        {
            "subject": f.subject,
            "target_new": f.target_new,
            "rewrite": [],
            "paraphrase": [],
            "neighborhood": [],
            "loc_argmax": [],
            "same_subject": [],
            "same_subject_argmax": [],
            "portability": {},
        }
        for f in facts
    ]
    for (i, kind), s in zip(index, scores):
        r = per_fact[i]
        if kind.startswith("portability_"):
            r["portability"].setdefault(kind, []).append(s.token_accuracy)
            continue
        r[kind].append(s.token_accuracy)
        if kind in ("neighborhood", "same_subject"):
            r["loc_argmax" if kind == "neighborhood" else "same_subject_argmax"].append(s.argmax_ids)
    summary: dict = {"n_facts": len(facts)}
    names = [("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity")]
    for kind, name in names + [("same_subject", "same_subject_accuracy")]:
        vals = [_mean(r[kind]) for r in per_fact if r[kind]]
        for r in per_fact:
            r[f"{kind}_acc"] = _mean(r[kind])
        summary[name] = 100 * _mean(vals) if vals else None
        summary[f"n_{kind}_facts"] = len(vals)
    kinds = [_metric_name(k) for k in PORTABILITY_KINDS]
    kinds += sorted({k for r in per_fact for k in r["portability"]} - set(kinds))
    for name in kinds:
        vals = [_mean(r["portability"][name]) for r in per_fact if r["portability"].get(name)]
        summary[name] = 100 * _mean(vals) if vals else None
        summary[f"n_{name}_facts"] = len(vals)
    definitions = {
        "efficacy": "teacher-forced top-1 accuracy of target_new tokens after the rewrite prompt (src), "
        "mean over facts, x100 (ROME/MEMIT)",
        "generalization": "same after the paraphrase prompt(s) (rephrase)",
        "specificity": "same for loc_ans tokens after loc + '?' (ROME/MEMIT: accuracy vs the dataset answer)",
        "locality_unchanged": "MEND-style: fraction of loc_ans positions whose argmax token is unchanged by the edit",
    }
    if summary["n_same_subject_facts"]:
        definitions["same_subject_locality"] = (
            "KnowEdit locality.Relation_Specificity (same subject, another relation; EasyEdit's definition): share "
            "of the teacher-forced ground-truth answer positions whose argmax token the edit left unchanged, mean "
            "per prompt, then per fact, then over facts, x100"
        )
        definitions["same_subject_accuracy"] = "top-1 accuracy of the same prompts' ground-truth answer tokens"
    if any(summary[f"n_{name}_facts"] for name in kinds):
        definitions["portability_<kind>"] = (
            "KnowEdit portability.<kind> (EasyEdit): teacher-forced top-1 accuracy of the portability answer "
            "tokens, mean per fact, then over facts, x100"
        )
    return {"summary": summary, "per_fact": per_fact, "definitions": definitions, "notes": []}


def locality_unchanged(pre: dict, post: dict) -> float | None:
    """MEND-style locality x 100: agreement of post-edit with pre-edit argmax tokens on the loc answer positions."""
    same = total = 0
    for a, b in zip(pre["per_fact"], post["per_fact"]):
        for x, y in zip(a["loc_argmax"], b["loc_argmax"]):
            same += sum(int(u == v) for u, v in zip(x, y))
            total += len(x)
    return 100 * same / total if total else None


def same_subject_locality(pre: dict, post: dict) -> float | None:
    """KnowEdit's same-subject locality x 100 (EasyEdit): per ``Relation_Specificity`` prompt, the share of its
    answer positions where the post-edit argmax token equals the pre-edit one; mean per fact, then over facts.
    None when no fact of ``pre``/``post`` (two :func:`evaluate_zsre` results on the same facts) has such prompts."""
    if len(pre["per_fact"]) != len(post["per_fact"]):
        raise ValueError(f"{len(pre['per_fact'])} pre-edit facts but {len(post['per_fact'])} post-edit facts")
    per_fact = []
    for a, b in zip(pre["per_fact"], post["per_fact"]):
        xs, ys = a.get("same_subject_argmax") or [], b.get("same_subject_argmax") or []
        if len(xs) != len(ys) or any(len(x) != len(y) for x, y in zip(xs, ys)):
            raise ValueError(f"pre- and post-edit same-subject prompts differ for subject {a.get('subject')!r}")
        agree = [sum(u == v for u, v in zip(x, y)) / len(x) for x, y in zip(xs, ys) if x]
        if agree:
            per_fact.append(_mean(agree))
    return 100 * _mean(per_fact) if per_fact else None
