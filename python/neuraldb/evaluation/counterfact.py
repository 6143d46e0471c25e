"""CounterFact metrics exactly as ROME/MEMIT compute them (``eval_utils_counterfact.py`` and ``summarize.py``).

For a prompt p and the two objects, ROME scores ``p + " " + target`` by teacher forcing and takes the
**per-token mean negative log-likelihood** of the target tokens (``test_batch_prediction`` divides the summed
NLL by the target's token count). With ``nll_new`` and ``nll_true`` on one prompt:

* success on a rewrite or paraphrase prompt: ``nll_new < nll_true`` (P(new) > P(true));
* success on a neighborhood prompt: ``nll_true < nll_new`` (P(true) > P(new));
* magnitude ("diff"): ``exp(-nll_new) - exp(-nll_true)`` on rewrite/paraphrase prompts and
  ``exp(-nll_true) - exp(-nll_new)`` on neighborhood prompts (differences of per-token geometric-mean probabilities).

Efficacy = mean over facts of rewrite success; Generalization = mean over facts of the mean success over its
paraphrase prompts; Specificity = the same over neighborhood prompts; all x 100 as in ROME's tables. Score = the
harmonic mean of the three (ROME's "Score"). ``reduction="sum"`` compares whole-target log-probabilities
(summed over tokens) instead; the two differ only when the two targets have different token counts, and every
report states which one it used.

Fluency and consistency come from generations on ``extras["generation_prompts"]`` (ROME-format records);
see :mod:`neuraldb.evaluation.fluency`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from ..facts import Fact
from .fluency import TfidfVectorizer, fluency_score, generate_texts, tfidf_similarity
from .gate import merge_rescored
from .scoring import score_grouped

__all__ = ["CONSISTENCY_SKIPPED", "counterfact_prompts", "evaluate_counterfact", "harmonic_mean"]

CONSISTENCY_SKIPPED = (
    "consistency skipped: ROME's reference Wikipedia snippets (attribute_snippets.json) are not available offline "
    "and no reference texts were given (--reference-texts)"
)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; NaN if a value is missing, 0 if one is 0."""
    if not values or any(v is None or math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def counterfact_prompts(
    facts: Sequence[Fact], prompt_fn: Callable[[str], str] | None = None
) -> tuple[list[tuple[int, str, int]], list[str], list[list[str]]]:
    """Every scored prompt of ``facts``: ``(fact, kind, position)`` with kind rewrite / paraphrase / neighborhood,
    the prompt after ``prompt_fn``, and its two continuations ``[" " + target_new, " " + target_true]``."""
    pf = prompt_fn or (lambda s: s)
    index, ctxs, conts = [], [], []
    for i, f in enumerate(facts):
        if not f.target_true:
            raise ValueError(f"CounterFact evaluation needs target_true (fact {i}: {f.subject!r})")
        groups = {"rewrite": [f.text], "paraphrase": list(f.paraphrases), "neighborhood": list(f.neighborhood)}
        for kind, prompts in groups.items():
            for j, p in enumerate(prompts):
                index.append((i, kind, j))
                ctxs.append(pf(p))
                conts.append([" " + f.target_new.strip(), " " + f.target_true.strip()])
    return index, ctxs, conts


def evaluate_counterfact(
    model,
    tok,
    facts: Sequence[Fact],
    *,
    reduction: str = "mean",
    batch_size: int = 32,
    fluency: bool = False,
    fluency_max_facts: int | None = None,
    generation_length: int = 100,
    reference_texts: Mapping[str, Sequence[str]] | None = None,
    prompt_fn: Callable[[str], str] | None = None,
    seed: int = 0,
    show_progress: bool = True,
    baseline: dict | None = None,
    rescore: Sequence[bool] | None = None,
) -> dict:
    """Efficacy / generalization / specificity (success rates and magnitudes) of ``facts`` on ``model``.

    Facts need ``target_true``. ``prompt_fn`` (e.g. the editing side's text template) is applied to every prompt
    before it is tokenised, so evaluation sees prompts the way editing did. Returns ``{"summary", "per_fact",
    "definitions"}``; summary values are percentages (x 100), magnitudes included.

    ``baseline`` and ``rescore`` (together) score only some prompts: ``rescore`` has one flag per prompt in
    :func:`counterfact_prompts` order, and unflagged prompts copy their NLLs from ``baseline``, an earlier result
    of this function on the same facts with the same ``reduction`` and ``prompt_fn`` (see :mod:`.gate` for when
    that is exact).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' (ROME/MEMIT) or 'sum' (whole-target log-probability)")
    if (baseline is None) != (rescore is None):
        raise ValueError("baseline and rescore go together")
    pf = prompt_fn or (lambda s: s)
    index, ctxs, conts = counterfact_prompts(facts, prompt_fn=pf)

    def nll(s) -> float:
        return -(s.mean_logprob if reduction == "mean" else s.sum_logprob)

    def score(todo: list[int]) -> list[dict]:
        # each prompt runs once; its two targets are scored from the shared prompt cache
        sc = score_grouped(
            model,
            tok,
            [ctxs[k] for k in todo],
            [conts[k] for k in todo],
            batch_size=batch_size,
            desc="counterfact",
            show_progress=show_progress,
        )
        return [{"nll_new": nll(a), "nll_true": nll(b)} for a, b in sc]

    if rescore is None:
        prompt_scores = score(list(range(len(ctxs))))
    else:
        old = [baseline["per_fact"][i][kind][j] for i, kind, j in index]
        prompt_scores = merge_rescored(
            [{"nll_new": x["nll_new"], "nll_true": x["nll_true"]} for x in old], rescore, score
        )

    per_fact = [
        {
            "subject": f.subject,
            "target_new": f.target_new,
            "target_true": f.target_true,
            "case_id": f.extras.get("case_id"),
            "rewrite": [],
            "paraphrase": [],
            "neighborhood": [],
        }
        for f in facts
    ]
    for (i, kind, _), x in zip(index, prompt_scores):
        per_fact[i][kind].append(x)

    def success(kind: str, x: dict) -> float:
        return float(x["nll_true"] < x["nll_new"]) if kind == "neighborhood" else float(x["nll_new"] < x["nll_true"])

    def diff(kind: str, x: dict) -> float:
        pn, pt = math.exp(-x["nll_new"]), math.exp(-x["nll_true"])
        return pt - pn if kind == "neighborhood" else pn - pt

    names = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "specificity"}
    summary: dict = {"n_facts": len(facts)}
    for kind, name in names.items():
        succ, mag = [], []
        for rec in per_fact:
            if rec[kind]:
                rec[f"{kind}_success"] = _mean([success(kind, x) for x in rec[kind]])
                rec[f"{kind}_diff"] = _mean([diff(kind, x) for x in rec[kind]])
                succ.append(rec[f"{kind}_success"])
                mag.append(rec[f"{kind}_diff"])
        summary[name] = 100 * _mean(succ) if succ else None
        summary[f"{name}_magnitude"] = 100 * _mean(mag) if mag else None
        summary[f"n_{kind}_facts"] = len(succ)
    esg = [summary["efficacy"], summary["generalization"], summary["specificity"]]
    summary["score"] = harmonic_mean(esg) if all(v is not None for v in esg) else None

    notes = []
    if fluency:
        idx = list(range(len(facts)))[: fluency_max_facts if fluency_max_facts is not None else len(facts)]
        gen_prompts, owner, sources = [], [], set()
        for i in idx:
            f = facts[i]
            gp = list(f.extras.get("generation_prompts") or [])
            sources.add("generation_prompts" if gp else "rewrite+paraphrase prompts")
            gp = gp or [f.text, *f.paraphrases]
            gen_prompts += [pf(p) for p in gp]
            owner += [i] * len(gp)
        texts = generate_texts(
            model,
            tok,
            gen_prompts,
            max_length=generation_length,
            seed=seed,
            show_progress=show_progress,
            batch_size=batch_size,
        )
        by_fact: dict[int, list[str]] = {}
        for i, t in zip(owner, texts):
            by_fact.setdefault(i, []).append(t)
        vec = None
        if reference_texts:
            vec = TfidfVectorizer().fit(t for ts in reference_texts.values() for t in ts)
        flu, cons, missing = [], [], 0
        for i, ts in by_fact.items():
            rec = per_fact[i]
            rec["generations"] = ts
            rec["fluency"] = _mean([fluency_score(t) for t in ts])
            flu.append(rec["fluency"])
            if vec is not None:
                f = facts[i]
                refs = reference_texts.get(str(f.extras.get("case_id"))) or reference_texts.get(f.target_new)
                if refs:
                    rec["consistency"] = tfidf_similarity(" ".join(ts), " ".join(refs), vec)
                    cons.append(rec["consistency"])
                else:
                    missing += 1
        summary["fluency"] = 100 * _mean(flu) if flu else None
        summary["n_fluency_facts"] = len(flu)
        summary["generation_prompt_source"] = " / ".join(sorted(sources))
        if vec is None:
            summary["consistency"] = None
            notes.append(CONSISTENCY_SKIPPED)
        else:
            summary["consistency"] = 100 * _mean(cons) if cons else None
            summary["n_consistency_facts"] = len(cons)
            notes.append(
                "consistency: TF-IDF cosine vs the given reference texts, IDF fitted on those texts "
                f"(not ROME's Wikipedia IDF); {missing} facts had no reference text"
            )
    else:
        summary["fluency"] = None
        summary["consistency"] = None
        notes.append("fluency and consistency not computed (generation disabled)")
        notes.append(CONSISTENCY_SKIPPED)
    return {
        "summary": summary,
        "per_fact": per_fact,
        "definitions": {
            "probability": f"teacher-forced target log-probability after prompt + ' ', reduction={reduction!r} over "
            "target tokens" + (" (ROME/MEMIT: per-token mean NLL)" if reduction == "mean" else " (whole target)"),
            "efficacy": "mean over facts of [P(new) > P(true)] on the rewrite prompt, x100",
            "generalization": "mean over facts of the fraction of paraphrase prompts with P(new) > P(true), x100",
            "specificity": "mean over facts of the fraction of neighborhood prompts with P(true) > P(new), x100",
            "magnitude": "same averages of exp(-nll_new) - exp(-nll_true) (reversed on neighborhood prompts), x100",
            "fluency": "ROME n-gram entropy mean(2/3*H2, 4/3*H3) of prompt+generation (top-k 5, 100 tokens), x100",
            "score": "harmonic mean of efficacy, generalization, specificity",
        },
        "notes": notes,
    }
