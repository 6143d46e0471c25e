"""``neuraldb eval``: evaluate edits on CounterFact or ZsRE (pre vs post), optionally general ability and deletion.

::

    neuraldb eval --model smollm2 --dataset counterfact \\
        --facts ../shared/data/knowledge_editing/counterfact_rome_format_1031.json.gz --n 100 \\
        --general-data ../shared/data/general_eval --general-limit 100 --deletion --out docs/results/smollm2-cf100
    neuraldb eval --combine docs/results/*/results.json --out docs/results   # one table + plot over several runs
    neuraldb eval --dataset counterfact --db cf1000.safetensors --facts counterfact_rome_format_1031.json.gz \
        --distractors counterfact_mend_{train,val,edit}.json.gz --eval-facts 200 --out docs/results/distractors

Writes ``results.json`` (the run: summaries, notes, timing, the command), ``per_fact.json`` (every prompt's scores),
``report.md`` and, where matplotlib is installed, ``report.png`` under ``--out``; ``--combine`` writes ``report.json``
(``{"runs": [...]}``), ``report.md`` and ``report.png``. The formats: :mod:`neuraldb.evaluation.report`. Metric
definitions: :mod:`neuraldb.evaluation` (ROME/MEMIT's).

Fluency and consistency (ROME's generation metrics) are opt-in: sampling 100-token texts for every generation prompt,
before and after editing, took 393 s of an 8-minute 10-fact run on 2 CPU cores (issue 29).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from neuraldb.cli_support import CLIError, _non_negative_int, _positive_int, check_output

__all__ = ["add_parser", "run"]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"layer\": 6}}', got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="evaluate edits: CounterFact/ZsRE metrics, general ability, deletion; JSON/Markdown/plot reports",
        description="Edit N facts (or load --db), evaluate pre- vs post-edit with ROME/MEMIT's metric definitions, "
        "and write results.json (the run), per_fact.json, report.md and report.png to --out. Fluency and "
        "consistency need text generation, the slow part: they are off unless --fluency or --fluency-facts asks. "
        "report.png needs matplotlib, which neuraldb does not depend on: without it the plot is skipped with a "
        "message (pip install matplotlib, or neuraldb[bench]).",
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'gemma3-270m', a HF directory or .gguf")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="the model's parameter dtype (default float32; bfloat16 is Gemma-3's native dtype)",
    )
    p.add_argument("--dataset", choices=("counterfact", "zsre"), help="which metrics (required unless --combine)")
    p.add_argument(
        "--facts",
        type=Path,
        help="facts file (CounterFact ROME/MEND format; ZsRE MEND format, or KnowEdit for same-subject locality "
        "and portability)",
    )
    p.add_argument("--n", type=_positive_int, default=100, help="number of facts to edit and evaluate (default 100)")
    p.add_argument("--offset", type=_non_negative_int, default=0, help="skip this many facts first")
    p.add_argument("--db", type=Path, help="evaluate this saved database instead of editing")
    p.add_argument(
        "--force", action="store_true", help="with --db: evaluate even if the database was built for a different model"
    )
    p.add_argument("--save-db", type=Path, help="save the database built by editing here")
    p.add_argument(
        "--no-calibrate", action="store_true",
        help="evaluate the database as edited, without the thresholds and subject gate `neuraldb edit` fits",
    )  # fmt: skip
    p.add_argument(
        "--edit-args",
        type=_json_object,
        default="{}",
        help='JSON of extra keyword arguments for neuraldb.edit, e.g. \'{"layer": 6, "gamma": 0.65}\'',
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--reduction",
        choices=("mean", "sum"),
        default="mean",
        help="CounterFact target probability: per-token mean NLL (ROME/MEMIT, default) or summed",
    )
    p.add_argument(
        "--zsre-target",
        choices=("answers", "alt"),
        default="answers",
        help="ZsRE edit target: answers[0] (ROME/MEMIT, default) or alt (EasyEdit)",
    )
    p.add_argument(
        "--fluency",
        action="store_true",
        help="generate texts for ROME's fluency/consistency for every evaluated fact (off by default: 100-token "
        "samples for every generation prompt, before and after editing; 393 s of an 8-minute 10-fact run on 2 "
        "CPU cores)",
    )
    p.add_argument(
        "--fluency-facts",
        type=_non_negative_int,
        metavar="K",
        help="generate for only the first K evaluated facts (implies --fluency)",
    )
    p.add_argument(
        "--no-fluency", action="store_true", help="skip generation (the default; kept for recorded commands)"
    )
    p.add_argument(
        "--reference-texts",
        type=Path,
        help="JSON {case_id or target_new: [texts]} for consistency; without it consistency is skipped",
    )
    p.add_argument("--general-data", type=Path, help="directory with the general-ability files (general_eval)")
    p.add_argument("--general-tasks", nargs="+", help="subset of tasks (default: all)")
    p.add_argument("--general-limit", type=_positive_int, help="examples per task (seeded subsample)")
    p.add_argument("--wikitext-tokens", type=_positive_int, help="score only the first T WikiText-2 tokens")
    p.add_argument(
        "--general-backend",
        choices=("lm-eval", "builtin"),
        help="who scores general ability: lm-evaluation-harness (HFLM on the patched model, local task configs; the "
        "default when lm-eval is installed: pip install 'neuraldb[eval]') or neuraldb's builtin imitation of it "
        "(the default otherwise)",
    )
    p.add_argument("--deletion", action="store_true", help="run the delete-even-facts experiment (App. J.5)")
    p.add_argument(
        "--method",
        choices=("neuraldb", "memit", "alphaedit"),
        default="neuraldb",
        help="write the edits as a NeuralDB patch (default), or the same keys and residuals into the weights by "
        "MEMIT's or AlphaEdit's closed form (neuraldb.baselines; one layer unless --baseline-args gives layers)",
    )
    p.add_argument(
        "--baseline-args",
        type=_json_object,
        default="{}",
        help='--method memit|alphaedit: JSON of {"lam", "threshold", "l2", "c0_tokens", "sequential", "layers"} '
        "(defaults 15000, 2e-2, 10, 100000, one batch, the database layer; sequential: facts per batch; layers: a "
        "list ending at the database layer to spread the residuals over, as MEMIT does)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="only combine existing results.json files into one report under --out",
    )
    p.add_argument("--title", default="neuraldb evaluation")
    p.add_argument(
        "--distractors",
        nargs="+",
        type=Path,
        metavar="FACTS",
        help="with --db: add the keys of these facts (synthetic residuals) around the database's facts and "
        "report CounterFact metrics vs table size (neuraldb.evaluation.distractors)",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=_positive_int,
        help="table sizes (keys) for --distractors (default n, 2n, 5n, 10n, all)",
    )
    p.add_argument(
        "--eval-facts",
        type=_positive_int,
        help="evaluate a seeded random subset of this many of the edited facts (all are edited)",
    )
    p.add_argument("--keys-cache", type=Path, help="--distractors: directory that caches the distractor keys")
    p.add_argument(
        "--distractor-exclude",
        type=_non_negative_int,
        help="--distractors: drop duplicates of the first N facts of --facts (default: the database's; a larger N shares the distractor pool with a larger database)",
    )
    return p


def _say_if_plot_skipped() -> None:
    # Once the inputs are checked (an input error stays one line) and before the work: a run takes minutes, and a
    # user waiting for report.png should know at once that it will not come.
    from .report import plot_unavailable

    reason = plot_unavailable()
    if reason is not None:
        print(f"neuraldb eval: report.png will be skipped: {reason}", file=sys.stderr)


def _general_backend(args) -> str:
    from .general_lm_eval import PIP, available

    if args.general_backend == "lm-eval" and not available():
        raise CLIError(f"--general-backend lm-eval: lm-eval is not installed: {PIP}")
    if args.general_backend is not None:
        return args.general_backend
    if available():
        return "lm-eval"
    if args.general_data is not None:
        print(
            f"neuraldb eval: general ability by the builtin scorer: lm-eval is not installed ({PIP})", file=sys.stderr
        )
    return "builtin"


def _refusing_other_weights(evaluate, **kwargs):
    """``evaluate(**kwargs)``, a database made for other weights than the loaded model's (patch_model's check) one
    line that names --force, as ``neuraldb generate`` says it."""
    from neuraldb.pretrained_io import ModelMismatchError

    try:
        return evaluate(**kwargs)
    except ModelMismatchError as e:
        raise CLIError(f"{e.detail} (pass the matching --model, or --force to evaluate anyway)") from None


def run(args) -> int:
    from .report import write_json, write_reports

    if args.combine:
        runs = []
        for path in args.combine:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
                raise CLIError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
            # a --distractors result has its own report and no pre/post run to put in these tables
            if "dataset" not in data and "runs" not in data:
                print(f"neuraldb eval: skipping {path}: not a pre/post evaluation run", file=sys.stderr)
                continue
            runs += data.get("runs", [data])
        _say_if_plot_skipped()
        paths = write_reports(runs, args.out, title=args.title)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    if args.dataset is None or args.facts is None:
        print("neuraldb eval: error: --dataset and --facts are required (or --combine)", file=sys.stderr)
        return 2
    if args.no_fluency and (args.fluency or args.fluency_facts is not None):
        raise CLIError("--no-fluency contradicts --fluency/--fluency-facts: give one")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "neuraldb " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else None
    # Inputs and outputs are checked before the model loads: an evaluation runs for minutes to hours.
    inputs = [("--facts", args.facts), ("--db", args.db), ("--reference-texts", args.reference_texts)]
    inputs += [("--distractors", path) for path in args.distractors or ()]
    for option, path in inputs:
        if path is not None and not path.is_file():
            raise CLIError(f"{option} {path}: {'is a directory' if path.is_dir() else 'no such file'}")
    if args.general_data is not None and not args.general_data.is_dir():
        raise CLIError(f"--general-data {args.general_data}: not a directory")
    backend = _general_backend(args)
    if args.force and args.db is None:
        raise CLIError("--force applies to --db (a saved database checked against --model): give --db")
    if args.db is not None:
        from neuraldb.cli_support import check_model_config, load_db

        # before the weights load (seconds): a database the model's config alone rules out; --force warns instead
        check_model_config(load_db(args.db), args.model, force=args.force)
    if args.save_db is not None:
        check_output(args.save_db, replace=True)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {args.out}: cannot create the directory: {e.strerror or e}") from None
    check_output(args.out / "results.json", replace=True)
    if args.distractors:
        if args.dataset != "counterfact" or args.db is None:
            print("neuraldb eval: error: --distractors needs --dataset counterfact and --db", file=sys.stderr)
            return 2
        from .distractors import distractor_eval, scaling_markdown

        _say_if_plot_skipped()

        result = _refusing_other_weights(
            distractor_eval,
            model_name=args.model,
            model_dtype=args.dtype,
            db_path=args.db,
            facts_path=args.facts,
            distractor_paths=args.distractors,
            out_dir=args.out,
            sizes=args.sizes,
            eval_facts=args.eval_facts,
            keys_cache=args.keys_cache,
            exclude=args.distractor_exclude,
            seed=args.seed,
            batch_size=args.batch_size,
            command=command,
            show_progress=not args.no_progress,
            force=args.force,
        )
        print(scaling_markdown(result))
        return 0
    from .pipeline import run_eval

    _say_if_plot_skipped()
    run_ = _refusing_other_weights(
        run_eval,
        model_name=args.model,
        model_dtype=args.dtype,
        dataset=args.dataset,
        facts_path=args.facts,
        n_facts=args.n,
        offset=args.offset,
        eval_facts=args.eval_facts,
        db_path=args.db,
        save_db=args.save_db,
        edit_kwargs=args.edit_args,
        general_dir=args.general_data,
        general_tasks=args.general_tasks,
        general_limit=args.general_limit,
        general_backend=backend,
        wikitext_max_tokens=args.wikitext_tokens,
        fluency=args.fluency or args.fluency_facts is not None,
        fluency_max_facts=args.fluency_facts,
        reference_texts=args.reference_texts,
        deletion=args.deletion,
        reduction=args.reduction,
        zsre_target=args.zsre_target,
        batch_size=args.batch_size,
        seed=args.seed,
        show_progress=not args.no_progress,
        command=command,
        per_fact_path=args.out / "per_fact.json",
        force=args.force,
        method=args.method,
        baseline_options=args.baseline_args,
        calibrate=not args.no_calibrate,
    )
    from .report import _slim

    write_json(_slim(run_), args.out / "results.json")
    paths = write_reports([run_], args.out, title=args.title, combined_json=False)
    print(Path(paths["markdown"]).read_text(encoding="utf-8"))
    return 0
