"""General ability through lm-evaluation-harness itself (``lm-eval``), offline, on the local files of :mod:`.general`.

Each task is an lm-eval ``ConfigurableTask`` built here from a config dict: ``dataset_path: json`` with
``data_files`` pointing at the local ``.jsonl.gz`` (the Hugging Face ``datasets`` JSON builder reads it; nothing is
downloaded), lm-eval's own prompt for the task (``doc_to_text``/``doc_to_choice``/``doc_to_target``), its output
type and metrics. lm-eval's ``HFLM`` wraps the already loaded, patched model and its tokenizer, and
``lm_eval.evaluator.evaluate`` scores the tasks: the requests, their batching, the log-likelihoods and the metrics are
lm-eval's. The examples are :mod:`.general`'s seeded subsample (``process_docs`` selects the same rows), so both
scorers see the same examples.

Where the local data differs from lm-eval's Hub datasets (see ``shared/data/README.md``):

- ``commonsense_qa``: llm-foundry's 4-option lettered version (lm-eval's has 5 options): the file's query, choices
  " A".." D".
- ``mmlu``: one task over the sampled rows of all 57 subjects (lm-eval reports 57 subtasks and a group mean);
  the prompt is lm-eval's zero-shot ``mmlu`` prompt with the row's subject.
- ``wikitext2``: lm-eval's ``wikitext`` scores whole documents of ``wikitext_document_level``; here the documents
  are rebuilt from the raw test lines (split at ``" = Title = "`` headings, lines joined by "\\n": the file has no
  blank lines), detokenised by lm-eval's ``wikitext_detokenizer``, scored with ``loglikelihood_rolling`` in
  windows of ``wikitext_window`` tokens (HFLM's ``max_length``). Metrics: lm-eval's ``word_perplexity``,
  ``byte_perplexity``, ``bits_per_byte`` plus ``token_ppl`` (the same log-likelihood over the detokenised text's
  tokens), which stays the primary value as in :mod:`.general`. ``wikitext_max_tokens`` keeps whole leading lines
  up to that many tokens.

The result has :func:`.general.evaluate_general`'s shape (``tasks`` -> ``acc``/``acc_norm``/``n``/``primary``/
``value``/``chance``, ``average``, ``notes``, ``definitions``) plus ``backend``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from .general import CHANCE, FILES, PRIMARY, TASKS, _sample

__all__ = ["PIP", "available", "build_tasks", "evaluate_general_lm_eval", "version"]

PIP = "pip install 'lm-eval==0.4.13'"
_HEADING = re.compile(r"^ = [^=].* = $")


def available() -> bool:
    """Whether lm-eval can be imported (it is an optional dependency: ``neuraldb[eval]``)."""
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["lm_eval"] is None (hidden, as the tests do)
        return False


def version() -> str:
    from importlib.metadata import version as _v

    return _v("lm_eval")


def _mc_prompt(doc: dict) -> str:
    q = doc["query"].rstrip()
    return q if q.endswith("Answer:") else q + "\nAnswer:"


def _mmlu_prompt(doc: dict) -> str:
    subject = doc["subject"].replace("_", " ")
    body = "\n".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(doc["choices"]))
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{doc['question'].strip()}\n{body}\nAnswer:"
    )


def _acc_metrics(*names: str) -> list[dict]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names]


def _config(task: str, path: Path, select, pf) -> dict:
    base = {
        "task": f"neuraldb_{task}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "process_docs": select,
        "metadata": {"version": 1.0},
    }
    if task == "lambada_openai":
        return base | {
            "output_type": "loglikelihood",
            "doc_to_text": lambda d: pf(d["context"]),
            "doc_to_target": lambda d: " " + d["continuation"],
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                *_acc_metrics("acc"),
            ],
        }
    mc = {"output_type": "multiple_choice", "metric_list": _acc_metrics("acc", "acc_norm")}
    if task in ("arc_easy", "arc_challenge", "piqa"):
        return (
            base
            | mc
            | {"doc_to_text": lambda d: pf(_mc_prompt(d)), "doc_to_choice": "choices", "doc_to_target": "gold"}
        )
    if task == "commonsense_qa":
        return (
            base | mc | {"doc_to_text": lambda d: pf(d["query"]), "doc_to_choice": "choices", "doc_to_target": "gold"}
        )
    if task == "mmlu":
        return (
            base
            | mc
            | {"doc_to_text": lambda d: pf(_mmlu_prompt(d)), "doc_to_choice": list("ABCD"), "doc_to_target": "answer"}
        )
    if task == "wsc273":  # lm-eval's partial scoring: an int doc_to_text means "the contexts are the choices"
        return base | {
            "output_type": "multiple_choice",
            "doc_to_text": lambda d: int(d["gold"]),
            "doc_to_choice": lambda d: [pf(c) for c in d["context_options"]],
            "doc_to_target": lambda d: d["continuation"],
            "metric_list": _acc_metrics("acc"),
        }
    raise ValueError(task)


def _wikitext_config(path: Path, tok, max_tokens: int | None) -> dict:
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    def pages(ds):  # datasets' text builder gives one row per line: rebuild the documents
        import datasets

        lines = [line for line in ds["text"] if line.strip()]
        if max_tokens is not None:
            kept, total = [], 0
            for line in lines:
                if total >= max_tokens:
                    break
                kept.append(line)
                total += len(tok(line + "\n", add_special_tokens=False)["input_ids"])
            lines = kept
        docs: list[list[str]] = []
        for line in lines:
            if _HEADING.match(line) or not docs:
                docs.append([])
            docs[-1].append(line)
        return datasets.Dataset.from_dict({"page": ["\n".join(d) + "\n" for d in docs]})

    def results(doc, res):
        n_tok = len(tok(wikitext_detokenizer(doc), add_special_tokens=False)["input_ids"])
        return process_results(doc, res) | {"token_ppl": (res[0], n_tok)}

    return {
        "task": "neuraldb_wikitext2",
        "dataset_path": "text",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "process_docs": pages,
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": wikitext_detokenizer,
        "process_results": results,
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in (
                ("word_perplexity", "weighted_perplexity"),
                ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"),
                ("token_ppl", "weighted_perplexity"),
            )
        ],
        "metadata": {"version": 2.0},
    }


def build_tasks(
    data_dir: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | None,
    seed: int,
    tok=None,
    wikitext_max_tokens: int | None = None,
    prompt_fn=None,
) -> tuple[dict, list[str]]:
    """``({task: lm-eval ConfigurableTask}, notes)`` for the tasks whose files exist under ``data_dir``."""
    from lm_eval.api.task import ConfigurableTask

    pf = prompt_fn or (lambda s: s)
    out, notes = {}, []
    for task in tasks:
        if task not in FILES:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        path = Path(data_dir) / FILES[task]
        if not path.exists():
            notes.append(f"{task}: skipped, {path} not found")
            continue

        def select(ds):
            return ds.select(_sample(list(range(len(ds))), limit, seed))

        if task == "wikitext2":
            cfg = _wikitext_config(path, tok, wikitext_max_tokens)
        else:
            cfg = _config(task, path, select, pf)
        out[task] = ConfigurableTask(config=cfg)
    return out, notes


def _value(res: dict, metric: str):
    v = res.get(f"{metric},none")
    return None if v is None or v == "N/A" else float(v)


def evaluate_general_lm_eval(
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
    """:func:`.general.evaluate_general` through lm-eval: same arguments, same examples, same result keys."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    if not show_progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    built, notes = build_tasks(
        data_dir, tasks or TASKS, limit=limit, seed=seed, tok=tok, wikitext_max_tokens=wikitext_max_tokens,
        prompt_fn=prompt_fn,
    )  # fmt: skip
    results: dict = {"tasks": {}, "limit": limit, "seed": seed, "notes": notes, "backend": f"lm-eval {version()}"}
    # WikiText-2 in windows of wikitext_window tokens (HFLM's max_length); the other tasks' contexts untruncated
    groups = [
        {t: k for t, k in built.items() if t != "wikitext2"},
        {t: k for t, k in built.items() if t == "wikitext2"},
    ]
    for group, max_length in zip(groups, (None, wikitext_window)):
        if not group:
            continue
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)
        out = evaluate(
            lm, {k.config.task: k for k in group.values()}, bootstrap_iters=0, log_samples=False,
            verbosity="INFO" if show_progress else "WARNING",
        )  # fmt: skip
        for task, k in group.items():
            raw = out["results"][k.config.task]
            n = int(out["n-samples"][k.config.task]["effective"])
            if task == "wikitext2":
                res = {
                    "token_ppl": _value(raw, "token_ppl"),
                    "word_ppl": _value(raw, "word_perplexity"),
                    "byte_ppl": _value(raw, "byte_perplexity"),
                    "bits_per_byte": _value(raw, "bits_per_byte"),
                    "n_docs": n,
                    "window": wikitext_window,
                    "primary": "token_ppl",
                }
            elif task == "lambada_openai":
                res = {"acc": 100 * _value(raw, "acc"), "ppl": _value(raw, "perplexity"), "n": n, "primary": "acc"}
            else:
                res = {m: 100 * _value(raw, m) for m in ("acc", "acc_norm") if _value(raw, m) is not None}
                res |= {"n": n, "primary": PRIMARY[task], "chance": CHANCE[task]}
            res["value"] = res[res["primary"]]
            results["tasks"][task] = res
    results["tasks"] = {t: results["tasks"][t] for t in built}  # the requested order
    accs = [r["value"] for t, r in results["tasks"].items() if t != "wikitext2" and r["value"] is not None]
    results["average"] = sum(accs) / len(accs) if accs else None
    results["definitions"] = {
        "backend": f"lm-evaluation-harness {version()} (HFLM on the patched model; local task configs, "
        "neuraldb.evaluation.general_lm_eval)",
        "acc": "lm-eval acc: argmax of summed log-likelihood of each choice",
        "acc_norm": "lm-eval acc_norm: argmax of summed log-likelihood / len(choice text in characters)",
        "average": "mean of the primary accuracy of the accuracy tasks (wikitext2 perplexity excluded)",
        "wikitext2": "lm-eval wikitext: rolling log-likelihood of detokenised documents; token_ppl over their tokens",
    }
    return results
