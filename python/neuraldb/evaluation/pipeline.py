"""One evaluation run end to end, as ``neuraldb eval`` performs it.

load model -> load facts (first ``n_facts`` after ``offset``) -> edit (or load a saved database) -> patch ->
choose the facts to evaluate (all, or a seeded subset of ``eval_facts`` of them: every fact is edited either way) ->
evaluate pre-edited (the patch disabled) and post-edited -> optional general ability before/after -> optional
deletion experiment (last, since it deletes rows) -> a run dict for :mod:`.report`.

Every prompt goes through the database's text template (``db.template``, see :mod:`neuraldb.templates`) in all
states, so the pre-edited numbers are measured on exactly the texts the edited model is measured on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from .counterfact import evaluate_counterfact
from .deletion import deletion_experiment
from .distractors import evaluated_subset
from .fluency import load_reference_texts
from .general import evaluate_general
from .report import write_json
from .zsre import evaluate_zsre, locality_unchanged, same_subject_locality

__all__ = ["run_eval", "select_facts"]


def select_facts(
    facts: Sequence, dataset: str, *, n_facts: int | None, offset: int = 0, zsre_target: str = "answers"
) -> list:
    """Slice the facts; for ZsRE choose the edit target. ``zsre_target="answers"`` is ROME/MEMIT/AlphaEdit's
    choice (``MENDQADataset`` edits toward ``answers[0]``, the paper's setting); ``"alt"`` is EasyEdit's."""
    out = list(facts[offset : None if n_facts is None else offset + n_facts])
    if dataset == "zsre" and zsre_target == "answers":
        fixed = []
        for f in out:
            answers = f.extras.get("answers") or ()
            if answers:
                f = dataclasses.replace(f, target_new=answers[0], target_true=None)
            fixed.append(f)
        out = fixed
    elif dataset == "zsre" and zsre_target != "alt":
        raise ValueError("zsre_target must be 'answers' (ROME) or 'alt' (EasyEdit)")
    return out


def _gate_flags(model, tok, facts, db, prompt_fn, batch_size: int) -> list[bool]:
    """Per CounterFact prompt: does the gate open anywhere on it with ``db``'s rows? Prompts where it does not
    keep their pre-edit scores exactly (:mod:`.gate`), so only the flagged ones are re-scored post-edit."""
    from .counterfact import counterfact_prompts
    from .gate import prompt_hits

    _, ctxs, conts = counterfact_prompts(facts, prompt_fn=prompt_fn)
    hits = prompt_hits(model, tok, ctxs, conts, db.layer, db.keys, db.gamma, batch_size=batch_size)[0]
    return [bool(h) for h in hits]


def run_eval(
    *,
    model_name: str,
    dataset: str,
    model_dtype: str | None = None,
    facts_path: str | Path,
    n_facts: int | None = 100,
    offset: int = 0,
    eval_facts: int | None = None,
    db_path: str | Path | None = None,
    save_db: str | Path | None = None,
    edit_kwargs: dict | None = None,
    general_dir: str | Path | None = None,
    general_tasks: Sequence[str] | None = None,
    general_limit: int | None = None,
    general_backend: str = "builtin",
    wikitext_max_tokens: int | None = None,
    fluency: bool = False,
    fluency_max_facts: int | None = None,
    reference_texts: str | Path | None = None,
    deletion: bool = False,
    reduction: str = "mean",
    zsre_target: str = "answers",
    batch_size: int = 32,
    seed: int = 0,
    show_progress: bool = True,
    command: str | None = None,
    per_fact_path: str | Path | None = None,
    model_and_tok=None,
    force: bool = False,
    method: str = "neuraldb",
    baseline_options: dict | None = None,
    calibrate: bool = True,
) -> dict:
    from .. import facts as facts_mod
    from .. import templates
    from ..patching import disabled, patch_checked

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    if model_and_tok is None:
        from ..models import load_model

        model, tok = load_model(model_name, dtype=model_dtype)
    else:
        model, tok = model_and_tok
    timing["load_model"] = time.perf_counter() - t0
    if dataset not in ("counterfact", "zsre"):
        raise ValueError("dataset must be 'counterfact' or 'zsre'")
    if method not in ("neuraldb", "memit", "alphaedit"):
        raise ValueError("method must be 'neuraldb', 'memit' or 'alphaedit'")
    if method != "neuraldb" and deletion:
        raise ValueError(f"deletion is a database experiment; method {method!r} edits the weights")
    facts = select_facts(facts_mod.load(facts_path), dataset, n_facts=n_facts, offset=offset, zsre_target=zsre_target)

    t0 = time.perf_counter()
    if db_path is not None:
        from ..database import NeuralKVDatabase

        db = NeuralKVDatabase.load(db_path)
    else:
        from ..editing import edit

        stats: dict = {}
        db = edit(model, tok, facts, progress=show_progress, stats=stats, **(edit_kwargs or {}))
    timing["edit" if db_path is None else "load_db"] = time.perf_counter() - t0
    thresholds = calibration = None
    if db_path is None and calibrate and method == "neuraldb":
        # what `neuraldb edit` builds: per-row thresholds fitted from the facts themselves (no text), the subject gate
        from ..gate_fit import fit_defaults

        t0 = time.perf_counter()
        report, keyed = fit_defaults(model, tok, db)
        thresholds, calibration = (
            "calibrated",
            report.summary() + ("" if keyed is None else f"; subject gate: {keyed} previous-token keys"),
        )
        timing["calibrate"] = time.perf_counter() - t0
    if save_db is not None:
        db.save(save_db)
    if len(db) != len(facts):
        raise RuntimeError(f"the database holds {len(db)} facts, expected {len(facts)}")
    if db_path is not None:  # a saved database against the loaded weights; force: a warning instead of the error
        from ..pretrained_io import check_model, recorded_identity

        check_model(model, recorded_identity(db), force=force, source="the database's edits", warn_unverifiable=False)
    pre_state, post_state, baseline_info = partial(disabled, model), contextlib.nullcontext, None
    if method == "neuraldb":
        patch_checked(model, db)  # identity decided (and warned) above; a database built here is the model's own
    else:  # the same keys and residuals written into the weights (.baseline_run); the unpatched model is "pre"
        from .baseline_run import baseline_state, wikitext_tokens_for

        t0 = time.perf_counter()
        post_state, baseline_info = baseline_state(
            model, tok, facts, db, method=method, general_dir=general_dir, options=baseline_options
        )
        pre_state = contextlib.nullcontext
        timing["baseline_update"] = time.perf_counter() - t0
    template = getattr(db, "template", None)
    chosen = evaluated_subset(len(facts), eval_facts, seed)
    shown = [facts[i] for i in chosen]

    def prompt_fn(s: str) -> str:
        return templates.apply(template, s)

    refs = load_reference_texts(reference_texts) if reference_texts else None
    if dataset == "counterfact":
        evaluate = partial(
            evaluate_counterfact,
            model,
            tok,
            reduction=reduction,
            batch_size=batch_size,
            fluency=fluency,
            fluency_max_facts=fluency_max_facts,
            reference_texts=refs,
            prompt_fn=prompt_fn,
            seed=seed,
            show_progress=show_progress,
        )
        evaluate_nogen = partial(
            evaluate_counterfact,
            model,
            tok,
            reduction=reduction,
            batch_size=batch_size,
            fluency=False,
            prompt_fn=prompt_fn,
            show_progress=show_progress,
        )
    else:
        evaluate = evaluate_nogen = partial(
            evaluate_zsre, model, tok, batch_size=batch_size, prompt_fn=prompt_fn, show_progress=show_progress
        )

    run: dict = {
        "model": model_name,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dataset": dataset,
        "n_facts": len(facts),
        "n_evaluated": len(shown),
        "offset": offset,
        "facts_path": str(facts_path),
        "template": template,
        "reduction": reduction if dataset == "counterfact" else None,
        "zsre_target": zsre_target if dataset == "zsre" else None,
        "command": command,
        "edit_kwargs": edit_kwargs or {},
        "db_config": getattr(db, "config", None),
        "layer": getattr(db, "layer", None),
        "gamma": getattr(db, "gamma", None),
        "thresholds": thresholds,  # "calibrated" (from the facts, as `neuraldb edit`), None: as edited or loaded
        "calibration": calibration,
        "notes": [],
        "method": method,
    }
    if baseline_info is not None:
        run["baseline"], run["gamma"] = baseline_info, None
    if len(shown) < len(facts):
        run["evaluated_indices"] = chosen
        run["notes"].append(
            f"all {len(facts)} facts edited; metrics on a seeded random subset of {len(shown)} of "
            f"them (seed {seed}, `evaluated_indices`)"
        )
    t0 = time.perf_counter()
    with pre_state():
        pre = evaluate(shown)
    timing["eval_pre"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if dataset == "counterfact" and method == "neuraldb":
        flags = _gate_flags(model, tok, shown, db, prompt_fn, batch_size)
        post = evaluate(shown, baseline=pre, rescore=flags)
        run["rescored_prompts"] = {"post": [sum(flags), len(flags)]}
    else:
        with post_state():
            post = evaluate(shown)
    timing["eval_post"] = time.perf_counter() - t0
    run["pre"], run["post"] = pre, post
    if dataset == "zsre":
        run["locality_unchanged"] = locality_unchanged(pre, post)
        run["same_subject_locality"] = same_subject_locality(pre, post)
        if zsre_target == "alt":
            target = "alt (EasyEdit)"
        elif any(f.extras.get("answers") for f in facts):
            target = "answers[0] (ROME/MEMIT MENDQADataset)"
        else:  # KnowEdit records: no answers field, target_new is EasyEdit's target
            target = "target_new as given (the records have no answers field)"
        run["notes"].append(f"ZsRE edit target: {target}")

    if general_dir is not None:
        if general_backend == "lm-eval":
            from .general_lm_eval import evaluate_general_lm_eval as general_fn
        else:
            general_fn = evaluate_general
        if method != "neuraldb" and (general_tasks is None or "wikitext2" in general_tasks):
            wikitext_max_tokens, note = wikitext_tokens_for(tok, general_dir, wikitext_max_tokens)
            run["notes"] += [note] if note else []
        gen = partial(
            general_fn,
            model,
            tok,
            general_dir,
            tasks=general_tasks,
            limit=general_limit,
            wikitext_max_tokens=wikitext_max_tokens,
            seed=seed,
            batch_size=max(1, batch_size // 2),
            show_progress=show_progress,
            prompt_fn=prompt_fn,
        )
        t0 = time.perf_counter()
        with pre_state():
            g_pre = gen()
        with post_state():
            g_post = gen()
        timing["general"] = time.perf_counter() - t0
        run["general"] = {"pre": g_pre, "post": g_post}
        run["notes"].append(f"general ability scored by {g_pre['backend']} (--general-backend)")

    if deletion:
        t0 = time.perf_counter()
        evaluate_deleted = evaluate_nogen
        if dataset == "counterfact":

            def evaluate_deleted(fs):  # flags from the rows left after the deletion
                flags = _gate_flags(model, tok, fs, db, prompt_fn, batch_size)
                run["rescored_prompts"]["deletion"] = [sum(flags), len(flags)]
                return evaluate_nogen(fs, baseline=pre, rescore=flags)

        run["deletion"] = deletion_experiment(
            model, tok, facts, db, evaluate=evaluate_deleted, kind=dataset, pre=pre, post=post, evaluated=chosen
        )
        timing["deletion"] = time.perf_counter() - t0
    run["timing"] = timing
    if per_fact_path is not None:
        write_json({"pre": pre["per_fact"], "post": post["per_fact"]}, per_fact_path)
    return run
