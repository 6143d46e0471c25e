"""Distractor scaling: edited facts evaluated inside a key table that holds many more (unedited) facts.

Over 400 lines because building the real distractor keys, the synthetic residuals and the scored sweep over table
sizes form one experiment whose parts share its sampling rules.

The paper's claim is that the gated lookup keeps working when the database is large. A residual costs an
optimisation per fact, a key one forward (about 0.05 s for SmolLM2 on one core), so here the *keys* are real (every CounterFact subject, computed exactly as the edited facts'
keys: same layer, template, prefixes and key weighting, read from the database) and only the distractors'
*residuals* are synthetic: a uniformly random direction scaled to a norm drawn (with replacement) from the
edited residuals' norms. That keeps what a wrongly retrieved row does to the model realistic in size — a
retrieved distractor pushes the hidden state as hard as a real edit would — while its direction carries no
fact (a real residual would push toward some other object; a random one mostly adds noise).

Distractors whose subject and prompt equal an edited fact's (the same CounterFact record, or the same question
about the same subject) are dropped: their key would be the edited key itself.

Per database size the edited facts' efficacy / generalization / specificity come from
:func:`neuraldb.evaluation.evaluate_counterfact` with the gate-skip shortcut of :mod:`.gate` (prompts on which
no key passes the gate keep their pre-edit scores), and every evaluated prompt is classified by which rows it
retrieves: its own fact, another edited fact, a distractor, or nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..facts import Fact
from .plots import plot_scaling  # drawn there with the other figures; kept importable from here

__all__ = [
    "KEY_FIELDS",
    "default_sizes",
    "distractor_eval",
    "distractor_facts",
    "distractor_keys",
    "drop_duplicates",
    "evaluated_subset",
    "hit_counts",
    "key_settings",
    "load_facts",
    "plot_scaling",
    "pre_edit_scores",
    "run_distractor_scaling",
    "scaling_markdown",
    "synthetic_residuals",
    "with_distractors",
]

# The EditConfig fields that decide a key (the residual-only ones, e.g. lr and steps, do not).
KEY_FIELDS = ("n_prefixes", "prefix_len", "seed", "key_bare_weight", "key_unit_mean")


def load_facts(paths: Sequence[str | Path]) -> list[Fact]:
    """Facts of several files (e.g. the three CounterFact MEND splits), ordered by ``case_id`` where present."""
    from .. import facts as facts_mod

    out: list[Fact] = []
    for p in paths:
        out += facts_mod.load(p)
    return sorted(out, key=lambda f: f.extras.get("case_id", math.inf))


def key_settings(db) -> dict:
    """What decides a key, as recorded by the database: layer, template and those :data:`KEY_FIELDS` its config
    holds (a field newer than the database is absent, and stands for the behaviour before it existed)."""
    cfg = db.config or {}
    return {"layer": db.layer, "template": db.template, **{k: cfg[k] for k in KEY_FIELDS if k in cfg}}


def _key_kwargs(settings: dict) -> dict:
    """:func:`neuraldb.editing.compute_keys` keywords for ``settings``: an absent field gets EditConfig's own
    default (the behaviour before the field existed), not the model's current default, which may differ."""
    import dataclasses
    import inspect

    from ..editing import EditConfig, compute_keys

    accepted = inspect.signature(compute_keys).parameters
    base = {f.name: f.default for f in dataclasses.fields(EditConfig)}
    return {k: settings.get(k, base.get(k)) for k in KEY_FIELDS if k in accepted}


def _fact_signature(f: Fact) -> tuple[str, str]:
    return " ".join(f.subject.split()), " ".join(f.text.split())


def drop_duplicates(edited: Sequence[Fact], candidates: Sequence[Fact]) -> tuple[list[int], int]:
    """Indices of ``candidates`` whose (subject, filled-in prompt) matches no edited fact's, and how many were
    dropped. Whitespace runs are collapsed before comparing."""
    seen = {_fact_signature(f) for f in edited}
    keep = [i for i, f in enumerate(candidates) if _fact_signature(f) not in seen]
    return keep, len(candidates) - len(keep)


def distractor_facts(edited: Sequence[Fact], candidates: Sequence[Fact], *, seed: int = 0) -> tuple[list[Fact], int]:
    """``candidates`` minus the duplicates of ``edited`` (:func:`drop_duplicates`), in a seeded random order so
    that every prefix (a smaller table) is a uniform sample; and the number dropped."""
    keep, dropped = drop_duplicates(edited, candidates)
    perm = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed)).tolist()
    return [candidates[keep[i]] for i in perm], dropped


def _cache_file(cache_dir: Path, settings: dict, facts: Sequence[Fact]) -> Path:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in facts:
        h.update(f"{f.subject}\x00{f.prompt}\x01".encode())
    return cache_dir / f"distractor-keys-{len(facts)}-{h.hexdigest()[:12]}.pt"


def distractor_keys(
    model,
    tok,
    db,
    facts: Sequence[Fact],
    *,
    cache_dir: str | Path | None = None,
    chunk: int = 1024,
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Keys (n, d1) float32 of ``facts`` (of the first ``limit`` only, if given) computed as ``db``'s keys were
    (:func:`key_settings`).

    With ``cache_dir`` the keys are saved there, named by a hash of the settings and all of ``facts``' subjects
    and prompts; a partial file is written after every ``chunk`` facts, so an interrupted or limited run is
    resumed by the next one.
    """
    from ..editing import compute_keys

    s = key_settings(db)
    path = None if cache_dir is None else _cache_file(Path(cache_dir), s, facts)
    n = len(facts) if limit is None else min(limit, len(facts))
    done = torch.zeros(0, db.key_dim)
    if path is not None and path.is_file():
        done = torch.load(path)
        if len(done) >= n:
            return done[:n]
    parts = [done]
    t0, start = time.perf_counter(), len(done)
    for i in range(start, n, chunk):
        parts.append(
            compute_keys(model, tok, facts[i : i + chunk], s["layer"], template=s["template"], **_key_kwargs(s))
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(torch.cat(parts), tmp)
            tmp.replace(path)
        if log is not None:
            m = min(i + chunk, len(facts))
            log(f"distractor keys {m}/{len(facts)} ({(time.perf_counter() - t0) / (m - start):.3f} s/fact)")
    return torch.cat(parts)[:n]


def synthetic_residuals(norms: torch.Tensor, n: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` residuals (n, dim) float32 whose directions are uniform on the sphere (normalised Gaussians) and
    whose norms are drawn with replacement from ``norms`` (the edited residuals' norms: their empirical
    distribution, with no assumed shape)."""
    if n and not len(norms):
        raise ValueError("norms must not be empty")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, dim, generator=g)
    pick = torch.randint(len(norms), (n,), generator=g) if n else torch.zeros(0, dtype=torch.long)
    return d / d.norm(dim=1, keepdim=True) * norms.float()[pick, None]


def with_distractors(db, keys: torch.Tensor, residuals: torch.Tensor):
    """A copy of ``db`` with the distractor rows appended after its own (fact metadata ``None``); ``db`` is
    untouched."""
    import copy

    out = copy.deepcopy(db)
    out.add(keys, residuals)
    return out


HIT_CLASSES = ("own", "other_edited", "distractor", "none")


def hit_counts(
    hits: Sequence[Sequence[int]], index: Sequence[tuple[int, str, int]], own_row: Sequence[int], n_edited: int
) -> dict:
    """Per prompt kind (rewrite / paraphrase / neighborhood): how many prompts retrieve, at some position, the row
    of the fact they belong to (``own``), another edited fact's row, a distractor row (rows >= ``n_edited``), or
    nothing. A prompt can count in several of the first three classes. ``index`` is
    :func:`.counterfact.counterfact_prompts`' (fact, kind, position) list and ``own_row[fact]`` that fact's row."""
    out: dict = {}
    for rows, (i, kind, _) in zip(hits, index):
        c = out.setdefault(kind, {"prompts": 0, **{k: 0 for k in HIT_CLASSES}})
        c["prompts"] += 1
        c["own"] += own_row[i] in rows
        c["other_edited"] += any(r < n_edited and r != own_row[i] for r in rows)
        c["distractor"] += any(r >= n_edited for r in rows)
        c["none"] += not rows
    return out


def evaluated_subset(n_edited: int, eval_facts: int | None, seed: int) -> list[int]:
    """Sorted indices of the edited facts to evaluate: all, or a seeded random subset of ``eval_facts``."""
    if eval_facts is None or eval_facts >= n_edited:
        return list(range(n_edited))
    return sorted(torch.randperm(n_edited, generator=torch.Generator().manual_seed(seed))[:eval_facts].tolist())


def pre_edit_scores(
    model, tok, db, facts: Sequence[Fact], *, cache_dir: str | Path | None = None, batch_size: int = 32
) -> dict:
    """:func:`.counterfact.evaluate_counterfact` of ``facts`` on the unpatched model inside ``db``'s template,
    saved under ``cache_dir`` (named by a hash of the template and the facts' prompts and targets) and read from
    there when present, so the pre-edit pass can run ahead, e.g. while distractor keys are computed."""
    from .. import templates
    from .counterfact import counterfact_prompts, evaluate_counterfact
    from .report import write_json

    def pf(s: str) -> str:
        return templates.apply(db.template, s)

    path = None
    if cache_dir is not None:
        _, ctxs, conts = counterfact_prompts(facts, prompt_fn=pf)
        digest = hashlib.sha256(json.dumps([ctxs, conts]).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"pre-counterfact-{len(facts)}-{digest}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    pre = evaluate_counterfact(
        model, tok, facts, reduction="mean", batch_size=batch_size, prompt_fn=pf, show_progress=False
    )
    if path is not None:
        write_json(pre, path)
    return pre


def run_distractor_scaling(
    model,
    tok,
    db,
    facts: Sequence[Fact],
    dkeys: torch.Tensor,
    *,
    sizes: Sequence[int],
    eval_facts: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = False,
    log: Callable[[str], None] | None = None,
    pre: dict | None = None,
    force: bool = False,
) -> dict:
    """Evaluate ``facts`` (the database's edited facts, row i = fact i) with the first ``size - len(db)`` rows of
    ``dkeys`` appended as distractors (:func:`synthetic_residuals`), for each total table size in ``sizes``.

    ``eval_facts``: evaluate a seeded random subset of this many edited facts (all of them stay in the table).
    The pre-edit scores are computed once (patch off), or taken from ``pre`` (:func:`pre_edit_scores` of the
    same subset); each size re-scores only the prompts on which some key passes the gate (:mod:`.gate`). Returns a JSON-able dict: settings, the pre-edit summary, and per size the
    CounterFact summary, hit counts (:func:`hit_counts`) at any position and at the prompt's last token, the
    number of re-scored prompts and the seconds taken.
    """
    from .. import templates
    from ..patching import patch_info, patch_model, unpatch_model
    from .counterfact import counterfact_prompts, evaluate_counterfact
    from .gate import prompt_hits

    say = log or (lambda s: None)
    n_edited = len(db)
    if len(facts) != n_edited or any(
        db.fact(i) is not None and getattr(db.fact(i), "subject", None) != f.subject for i, f in zip(db.ids(), facts)
    ):
        raise ValueError("facts must be the database's facts in row order")
    sizes = sorted(sizes)
    if sizes[0] < n_edited or sizes[-1] > n_edited + len(dkeys):
        raise ValueError(f"sizes must lie in {n_edited}..{n_edited + len(dkeys)}")
    if patch_info(model) is not None:
        raise ValueError("pass an unpatched model")
    chosen = evaluated_subset(n_edited, eval_facts, seed)
    sub = [facts[i] for i in chosen]

    def pf(s: str) -> str:
        return templates.apply(db.template, s)

    index, ctxs, conts = counterfact_prompts(sub, prompt_fn=pf)
    norms = db.values.float().norm(dim=1)
    n_extra = sizes[-1] - n_edited
    resid = synthetic_residuals(norms, n_extra, db.value_dim, seed=seed)
    big = with_distractors(db, dkeys[:n_extra], resid)
    run: dict = {
        "n_edited": n_edited,
        "evaluated_facts": chosen if len(chosen) < n_edited else None,
        "n_evaluated": len(chosen),
        "n_prompts": len(index),
        "sizes": sizes,
        "seed": seed,
        "layer": db.layer,
        "gamma": db.gamma,
        "template": db.template,
        "edited_residual_norm": {
            "mean": float(norms.mean()),
            "std": float(norms.std()),
            "min": float(norms.min()),
            "max": float(norms.max()),
        },
        "distractor_residual_norm": {"mean": float(resid.norm(dim=1).mean()), "std": float(resid.norm(dim=1).std())},
        "timing": {},
        "by_size": [],
    }
    t0 = time.perf_counter()
    hits, hits_last = prompt_hits(
        model,
        tok,
        ctxs,
        conts,
        db.layer,
        big.keys,
        db.gamma,
        sizes=sizes,
        batch_size=batch_size,
        last_prompt_token=True,
    )
    run["timing"]["retrieval_hits"] = time.perf_counter() - t0
    say(f"retrieval hits for {len(index)} prompts x {len(sizes)} sizes: {run['timing']['retrieval_hits']:.0f}s")
    ev = {"reduction": "mean", "batch_size": batch_size, "prompt_fn": pf, "show_progress": show_progress}
    if pre is None:
        t0 = time.perf_counter()
        pre = evaluate_counterfact(model, tok, sub, **ev)
        run["timing"]["eval_pre"] = time.perf_counter() - t0
    run["pre"] = pre["summary"]
    say(f"pre: {pre['summary']}")
    try:
        for size, h, hl in zip(sizes, hits, hits_last):
            t0 = time.perf_counter()
            patch_model(model, with_distractors(db, dkeys[: size - n_edited], resid[: size - n_edited]), force=force)
            fires = [bool(x) for x in h]
            post = evaluate_counterfact(model, tok, sub, baseline=pre, rescore=fires, **ev)
            rec = {
                "keys": size,
                "distractors": size - n_edited,
                "summary": post["summary"],
                "rescored": sum(fires),
                "hits": hit_counts(h, index, chosen, n_edited),
                "hits_last_token": hit_counts(hl, index, chosen, n_edited),
                "seconds": time.perf_counter() - t0,
            }
            run["by_size"].append(rec)
            say(
                f"{size} keys: E {post['summary']['efficacy']:.1f} G {post['summary']['generalization']:.1f} "
                f"S {post['summary']['specificity']:.1f}, re-scored {sum(fires)}/{len(fires)} ({rec['seconds']:.0f}s)"
            )
    finally:
        unpatch_model(model)
    return run


def scaling_markdown(result: dict) -> str:
    """The metrics-vs-keys table and the retrieval-hit table of a :func:`distractor_eval` result."""
    from .report import _fmt

    r = result["run"]
    pre = r["pre"]
    subset = f" (seeded subset, seed {r['seed']})" if r["evaluated_facts"] else ""
    lines = [
        f"# Distractor scaling: {r['n_edited']} edited CounterFact facts among up to {r['sizes'][-1]:,} keys",
        "",
        (
            "Distractor keys are real (the keys of other CounterFact subjects, computed like the edited facts'); "
            "**distractor residuals are synthetic**: random directions with norms drawn from the edited residuals' "
            f"norms (mean {r['edited_residual_norm']['mean']:.1f}, std {r['edited_residual_norm']['std']:.1f})."
        ),
        (
            f"{result['n_dropped']} candidate distractors duplicated the subject and prompt of one of the first "
            f"{result['n_excluded']:,} facts of the edited file and were dropped."
        ),
        (
            f"Evaluated: {r['n_evaluated']} of the {r['n_edited']} edited facts{subset}, {r['n_prompts']} prompts; "
            f"gamma {r['gamma']}, layer {r['layer']}."
        ),
        "",
    ]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    lines += [
        "| Keys | Distractors | Efficacy | Generalization | Specificity | Score | Re-scored prompts |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        (
            f"| pre-edit | – | {_fmt(pre['efficacy'])} | {_fmt(pre['generalization'])} | "
            f"{_fmt(pre['specificity'])} | {_fmt(pre['score'])} | – |"
        ),
    ]
    for b in r["by_size"]:
        s = b["summary"]
        lines.append(
            f"| {b['keys']:,} | {b['distractors']:,} | {_fmt(s['efficacy'])} | {_fmt(s['generalization'])} | "
            f"{_fmt(s['specificity'])} | {_fmt(s['score'])} | {b['rescored']} / {r['n_prompts']} |"
        )
    hits_intro = (
        "Retrieval hits: prompts that retrieve, at some position (gate open), their own fact's row, another "
        "edited fact's row, a distractor row, or nothing (a prompt can count in several of the first three)."
    )
    lines += [
        "",
        hits_intro,
        "",
        (
            "| Keys | Prompts | Own | Other edited | Distractor | None | "
            "At the last prompt token: own | other edited | distractor | none |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in r["by_size"]:
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            c, cl = b["hits"].get(kind), b["hits_last_token"].get(kind)
            if c:
                lines.append(
                    f"| {b['keys']:,} | {kind} ({c['prompts']}) | {c['own']} | {c['other_edited']} | "
                    f"{c['distractor']} | {c['none']} | {cl['own']} | {cl['other_edited']} | "
                    f"{cl['distractor']} | {cl['none']} |"
                )
    t = result["timing"]
    per_size = ", ".join(f"{b['keys']:,}: {b['seconds']:.0f}" for b in r["by_size"])
    lines += ["", "Timing (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + f"; per size: {per_size}", ""]
    return "\n".join(lines)


def default_sizes(n_edited: int, n_total: int) -> list[int]:
    """n, 2n, 5n, 10n (those below the total) and the total."""
    return sorted({s for s in (n_edited, 2 * n_edited, 5 * n_edited, 10 * n_edited) if s < n_total} | {n_total})


def distractor_eval(
    *,
    model_name: str,
    db_path: str | Path,
    facts_path: str | Path,
    distractor_paths: Sequence[str | Path],
    model_dtype: str | None = None,
    out_dir: str | Path,
    sizes: Sequence[int] | None = None,
    eval_facts: int | None = None,
    keys_cache: str | Path | None = None,
    exclude: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    command: str | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] | None = print,
    force: bool = False,
) -> dict:
    """``neuraldb eval --distractors``: load the model and the database of the first ``len(db)`` facts of
    ``facts_path``, compute (or read from ``keys_cache``) the pre-edit scores and the keys of the deduplicated
    ``distractor_paths`` facts (deduplicated against the first ``max(len(db), exclude)`` facts of ``facts_path``,
    so databases of different sizes can share one distractor pool and its cached keys), run
    :func:`run_distractor_scaling`, and write ``results.json``, ``report.md`` and ``report.png`` to
    ``out_dir``. Returns what results.json holds."""
    from .. import facts as facts_mod
    from ..database import NeuralKVDatabase
    from ..models import load_model
    from ..pretrained_io import check_model, recorded_identity
    from .report import write_json

    say = log or (lambda s: None)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load_model(model_name, dtype=model_dtype)
    db = NeuralKVDatabase.load(db_path)
    # the model check once, before the keys are computed (force: a warning); the patches below skip it
    check_model(model, recorded_identity(db), force=force, source="the database's edits", warn_unverifiable=False)
    all_facts = facts_mod.load(facts_path)
    edited = all_facts[: len(db)]
    timing["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen = evaluated_subset(len(db), eval_facts, seed)
    pre = pre_edit_scores(model, tok, db, [edited[i] for i in chosen], cache_dir=keys_cache, batch_size=batch_size)
    timing["eval_pre"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    excluded = all_facts[: max(len(db), exclude or 0)]
    dfacts, dropped = distractor_facts(excluded, load_facts(distractor_paths), seed=seed)
    say(f"{len(dfacts)} distractors ({dropped} duplicates of edited facts dropped); key settings {key_settings(db)}")
    n_total = len(db) + len(dfacts)
    sizes = default_sizes(len(db), n_total) if sizes is None else sorted({min(s, n_total) for s in sizes})
    dkeys = distractor_keys(model, tok, db, dfacts, cache_dir=keys_cache, limit=sizes[-1] - len(db), log=say)
    timing["distractor_keys"] = time.perf_counter() - t0
    run = run_distractor_scaling(
        model,
        tok,
        db,
        edited,
        dkeys,
        sizes=sizes,
        eval_facts=eval_facts,
        seed=seed,
        batch_size=batch_size,
        show_progress=show_progress,
        log=say,
        pre=pre,
        force=True,
    )
    timing.update(run["timing"])
    result = {
        "model": model_name,
        "db": str(db_path),
        "facts_path": str(facts_path),
        "distractor_paths": [str(p) for p in distractor_paths],
        "n_distractor_candidates": len(dfacts) + dropped,
        "n_dropped": dropped,
        "n_excluded": len(excluded),
        "key_settings": key_settings(db),
        "command": command,
        "timing": timing,
        "note": "distractor keys are real CounterFact keys; distractor residuals are synthetic (random "
        "directions, norms drawn from the edited residuals' norms)",
        "run": run,
    }
    out = Path(out_dir)
    write_json(result, out / "results.json")
    (out / "report.md").write_text(scaling_markdown(result), encoding="utf-8")
    try:
        plot_scaling(result, out / "report.png")
    except ImportError:  # matplotlib is optional (the "bench" extra)
        pass
    return result
