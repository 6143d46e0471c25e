"""General ability, offline, from data files given by path (lm-evaluation-harness conventions).

Files (see ``shared/data/README.md``; llm-foundry's uniform ``{"query", "choices", "gold"}`` schema):

==================  =============================  ==========================================================
task                file                           scoring
==================  =============================  ==========================================================
lambada_openai      lambada_openai.jsonl.gz        acc: every token of " " + last word is the greedy argmax
                                                   (lm-eval ``is_greedy``); ppl = exp(-mean log P(word))
wikitext2           wikitext2_raw_test.txt.gz      token perplexity of the raw test text (lines joined by
                                                   "\n"), non-overlapping windows of ``wikitext_window`` tokens
                                                   (the first token of each window is context only); also
                                                   word perplexity exp(NLL / whitespace words of scored text)
arc_easy/challenge  arc_{easy,challenge}.jsonl.gz  "Question: q\nAnswer:" + " " + choice; primary acc_norm
piqa                piqa.jsonl.gz                  same prompt; primary acc_norm
commonsense_qa      commonsense_qa.jsonl.gz        llm-foundry's 4-option lettered query, choices " A".." D";
                                                   primary acc
wsc273              winograd_wsc273.jsonl.gz       partial scoring: log P(" " + continuation | option), pick
                                                   the best option; acc
mmlu                mmlu_test.jsonl.gz             lm-eval zero-shot prompt ("The following are multiple choice
                                                   questions (with answers) about {subject}. ..." then
                                                   "Answer:"), choices " A".." D"; primary acc
==================  =============================  ==========================================================

Multiple choice: ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` (lm-eval's) divides
each choice's summed log-likelihood by the choice's length **in characters** (the choice text without the leading
space) before taking the argmax. Both are reported for every multiple-choice task; ``primary`` names the one
the paper's plots use (lm-eval's headline for the task). Subsampling: ``limit`` examples per task, drawn with a
seeded RNG (the same examples before and after editing).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from ..templates import pad_id
from ..text_files import read_text
from .scoring import score_continuations, score_grouped, score_token_ids

__all__ = ["CHANCE", "TASKS", "evaluate_general", "lambada", "multiple_choice", "wikitext_perplexity"]

TASKS = ("lambada_openai", "wikitext2", "arc_easy", "arc_challenge", "wsc273", "commonsense_qa", "piqa", "mmlu")
FILES = {
    "lambada_openai": "lambada_openai.jsonl.gz",
    "wikitext2": "wikitext2_raw_test.txt.gz",
    "arc_easy": "arc_easy.jsonl.gz",
    "arc_challenge": "arc_challenge.jsonl.gz",
    "wsc273": "winograd_wsc273.jsonl.gz",
    "commonsense_qa": "commonsense_qa.jsonl.gz",
    "piqa": "piqa.jsonl.gz",
    "mmlu": "mmlu_test.jsonl.gz",
}
CHANCE = {"arc_easy": 25.0, "arc_challenge": 25.0, "wsc273": 50.0, "commonsense_qa": 25.0, "piqa": 50.0, "mmlu": 25.0}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def _sample(rows: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(rows):
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in idx]


def multiple_choice(
    model,
    tok,
    docs: Sequence[tuple[Sequence[str], Sequence[str], int]],
    *,
    batch_size: int = 16,
    desc: str = "mc",
    show_progress: bool = True,
) -> dict:
    """``docs``: (contexts per choice, continuations per choice, gold). Returns acc and acc_norm x 100."""
    per: list[list[tuple[float, float]]] = [[] for _ in docs]
    shared = [d for d, (cs, _, _) in enumerate(docs) if len(set(cs)) == 1]
    if shared:  # one context, several choices: run the context once
        res = score_grouped(
            model,
            tok,
            [docs[d][0][0] for d in shared],
            [docs[d][1] for d in shared],
            batch_size=batch_size,
            desc=desc,
            show_progress=show_progress,
        )
        for d, scores in zip(shared, res):
            per[d] = [(s.sum_logprob, s.sum_logprob / max(len(t.lstrip(" ")), 1)) for s, t in zip(scores, docs[d][1])]
    rest = [d for d in range(len(docs)) if len(set(docs[d][0])) != 1]
    ctxs, conts, owner = [], [], []
    for d in rest:  # a context per choice (WSC partial scoring)
        for c, t in zip(docs[d][0], docs[d][1]):
            ctxs.append(c)
            conts.append(t)
            owner.append(d)
    scores = (
        score_continuations(model, tok, ctxs, conts, batch_size=batch_size, desc=desc, show_progress=show_progress)
        if ctxs
        else []
    )
    for d, t, s in zip(owner, conts, scores):
        per[d].append((s.sum_logprob, s.sum_logprob / max(len(t.lstrip(" ")), 1)))
    acc = [float(max(range(len(p)), key=lambda k: p[k][0]) == docs[d][2]) for d, p in enumerate(per)]
    accn = [float(max(range(len(p)), key=lambda k: p[k][1]) == docs[d][2]) for d, p in enumerate(per)]
    n = len(docs)
    return {"acc": 100 * sum(acc) / n if n else None, "acc_norm": 100 * sum(accn) / n if n else None, "n": n}


def lambada(
    model, tok, rows: Sequence[dict], *, batch_size: int = 16, show_progress: bool = True, prompt_fn=None
) -> dict:
    pf = prompt_fn or (lambda s: s)
    scores = score_continuations(
        model,
        tok,
        [pf(r["context"]) for r in rows],
        [" " + r["continuation"] for r in rows],
        batch_size=batch_size,
        desc="lambada",
        show_progress=show_progress,
    )
    n = len(rows)
    return {
        "acc": 100 * sum(s.is_greedy for s in scores) / n if n else None,
        "ppl": math.exp(-sum(s.sum_logprob for s in scores) / n) if n else None,
        "n": n,
        "primary": "acc",
    }


def wikitext_perplexity(
    model,
    tok,
    text: str,
    *,
    window: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    show_progress: bool = True,
) -> dict:
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    scores = score_token_ids(
        model,
        [(w[:1], w[1:]) for w in windows],
        pad_id=pad_id(tok),
        batch_size=batch_size,
        desc="wikitext2",
        show_progress=show_progress,
    )
    nll = -sum(s.sum_logprob for s in scores)
    n_tok = sum(s.n_tokens for s in scores)
    n_words = sum(len(tok.decode(w[1:]).split()) for w in windows)
    return {
        "token_ppl": math.exp(nll / n_tok) if n_tok else None,
        "word_ppl": math.exp(nll / n_words) if n_words else None,
        "n_tokens": n_tok,
        "window": window,
        "primary": "token_ppl",
    }


def _docs(task: str, rows: list[dict]) -> list[tuple[list[str], list[str], int]]:
    out = []
    for r in rows:
        if task in ("arc_easy", "arc_challenge", "piqa"):
            q = r["query"].rstrip()
            ctx = q if q.endswith("Answer:") else q + "\nAnswer:"
            out.append(([ctx] * len(r["choices"]), [" " + c for c in r["choices"]], int(r["gold"])))
        elif task == "commonsense_qa":
            out.append(([r["query"]] * len(r["choices"]), [" " + c for c in r["choices"]], int(r["gold"])))
        elif task == "wsc273":
            opts = r["context_options"]
            out.append((list(opts), [" " + r["continuation"]] * len(opts), int(r["gold"])))
        elif task == "mmlu":
            subj = r["subject"].replace("_", " ")
            letters = "ABCD"
            body = "\n".join(f"{letters[k]}. {c}" for k, c in enumerate(r["choices"]))
            ctx = (
                f"The following are multiple choice questions (with answers) about {subj}.\n\n"
                f"{r['question'].strip()}\n{body}\nAnswer:"
            )
            out.append(([ctx] * 4, [" " + x for x in letters], int(r["answer"])))
        else:
            raise ValueError(task)
    return out


PRIMARY = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "piqa": "acc_norm",
    "commonsense_qa": "acc",
    "wsc273": "acc",
    "mmlu": "acc",
}


def evaluate_general(
    model,
    tok,
    data_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    wikitext_max_tokens: int | None = None,
    wikitext_window: int = 512,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = True,
    prompt_fn=None,
) -> dict:
    """Run general-ability tasks on files under ``data_dir``. Missing files are reported, not fatal.

    ``prompt_fn`` (the database's text template) wraps every context of LAMBADA and the multiple-choice tasks;
    WikiText-2 windows are scored as raw token windows without it."""
    data_dir = Path(data_dir)
    results: dict = {"tasks": {}, "limit": limit, "seed": seed, "notes": [], "backend": "builtin"}
    for task in tasks or TASKS:
        if task not in FILES:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        path = data_dir / FILES[task]
        if not path.exists():
            results["notes"].append(f"{task}: skipped, {path} not found")
            continue
        with torch.inference_mode():
            if task == "wikitext2":
                res = wikitext_perplexity(
                    model,
                    tok,
                    "\n".join(read_text(path).splitlines()),
                    window=wikitext_window,
                    max_tokens=wikitext_max_tokens,
                    batch_size=max(1, batch_size // 4),
                    show_progress=show_progress,
                )
            elif task == "lambada_openai":
                res = lambada(
                    model,
                    tok,
                    _sample(_read_jsonl(path), limit, seed),
                    batch_size=batch_size,
                    show_progress=show_progress,
                    prompt_fn=prompt_fn,
                )
            else:
                docs = _docs(task, _sample(_read_jsonl(path), limit, seed))
                if prompt_fn is not None:
                    docs = [([prompt_fn(c) for c in cs], ts, g) for cs, ts, g in docs]
                res = multiple_choice(model, tok, docs, batch_size=batch_size, desc=task, show_progress=show_progress)
                res["primary"] = PRIMARY[task]
                res["chance"] = CHANCE[task]
        res["value"] = res[res["primary"]]
        results["tasks"][task] = res
    accs = [r["value"] for t, r in results["tasks"].items() if t != "wikitext2" and r["value"] is not None]
    results["average"] = sum(accs) / len(accs) if accs else None
    results["definitions"] = {
        "acc": "argmax of summed log-likelihood of each choice",
        "acc_norm": "argmax of summed log-likelihood / len(choice text in characters) (lm-eval acc_norm)",
        "average": "mean of the primary accuracy of the accuracy tasks (wikitext2 perplexity excluded)",
    }
    return results
