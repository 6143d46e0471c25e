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

ROME re-tokenises ``prompt + decode(target_tokens[:j])`` for every j; here one forward per prompt+answer scores all
positions at once (identical whenever the tokeniser splits at the answer's leading space, as byte-level BPEs do).

Which string is ``target_new`` is the loader's decision: ROME's ``MENDQADataset`` edits toward ``answers[0]``,
EasyEdit toward ``alt``; the report records the facts' targets as given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..facts import Fact
from .scoring import score_continuations

__all__ = ["evaluate_zsre", "loc_answers", "locality_unchanged"]


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
    """Efficacy / generalization / specificity of ZsRE ``facts`` (token-level top-1 accuracy, x 100)."""
    pf = prompt_fn or (lambda s: s)
    ctxs, conts, index = [], [], []
    for i, f in enumerate(facts):
        for j, p in enumerate([f.text]):
            index.append((i, "rewrite", j))
            ctxs.append(pf(p))
            conts.append(" " + f.target_new.strip())
        for j, p in enumerate(f.paraphrases):
            index.append((i, "paraphrase", j))
            ctxs.append(pf(p))
            conts.append(" " + f.target_new.strip())
        for j, (p, a) in enumerate(zip(f.neighborhood, loc_answers(f))):
            if a:
                index.append((i, "neighborhood", j))
                ctxs.append(pf(_loc_prompt(p)))
                conts.append(" " + a.strip())
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
        }
        for f in facts
    ]
    for (i, kind, _), s in zip(index, scores):
        per_fact[i][kind].append(s.token_accuracy)
        if kind == "neighborhood":
            per_fact[i]["loc_argmax"].append(s.argmax_ids)
    summary: dict = {"n_facts": len(facts)}
    for kind, name in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity")):
        vals = [_mean(r[kind]) for r in per_fact if r[kind]]
        for r in per_fact:
            r[f"{kind}_acc"] = _mean(r[kind])
        summary[name] = 100 * _mean(vals) if vals else None
        summary[f"n_{kind}_facts"] = len(vals)
    return {
        "summary": summary,
        "per_fact": per_fact,
        "definitions": {
            "efficacy": "teacher-forced top-1 accuracy of target_new tokens after the rewrite prompt (src), "
            "mean over facts, x100 (ROME/MEMIT)",
            "generalization": "same after the paraphrase prompt(s) (rephrase)",
            "specificity": "same for loc_ans tokens after loc + '?' (ROME/MEMIT: accuracy vs the dataset answer)",
            "locality_unchanged": "MEND-style: fraction of loc_ans positions whose argmax token is unchanged by the edit",
        },
        "notes": [],
    }


def locality_unchanged(pre: dict, post: dict) -> float | None:
    """MEND-style locality x 100: agreement of post-edit with pre-edit argmax tokens on the loc answer positions."""
    same = total = 0
    for a, b in zip(pre["per_fact"], post["per_fact"]):
        for x, y in zip(a["loc_argmax"], b["loc_argmax"]):
            same += sum(int(u == v) for u, v in zip(x, y))
            total += len(x)
    return 100 * same / total if total else None
