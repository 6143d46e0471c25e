"""The ``neuraldb`` command: edit facts into a model, generate with and without the edits, inspect and prune databases.

::

    neuraldb edit --model smollm2 --facts facts.jsonl --out edits.safetensors [--limit N --layer L --gamma G]
    neuraldb edit --facts cf.json.gz --out part0.safetensors --checkpoint-every 256 --slice 0:10240 [--resume]
    neuraldb merge part0.safetensors part1.safetensors --out all.safetensors
    neuraldb generate --model smollm2 --db edits.safetensors --prompt "The Eiffel Tower is located in the city of"
    neuraldb generate --db edits.safetensors --chat --prompt "Where is the Eiffel Tower located?"
    neuraldb info edits.safetensors
    neuraldb delete edits.safetensors --ids 0 3 5-7
    neuraldb calibrate edits.safetensors --text corpus.txt
    neuraldb serve --model smollm2 --db edits.safetensors --token SECRET
    neuraldb demo
    neuraldb eval --dataset counterfact --facts cf.json.gz --n 100 --out results/ [--general-data DIR --deletion]

Models are loaded with :func:`neuraldb.load_model` (``smollm2``, ``gemma3-270m``, a Hugging Face directory or a
``.gguf`` file; nothing is downloaded). Prompts are wrapped in the database's text template (see
:mod:`neuraldb.templates`) so that inference sees the same text the keys were built from; ``generate --chat`` puts
them in the tokenizer's chat template instead.

Errors are one line on stderr (``neuraldb COMMAND: error: ...``) and a non-zero exit: 1 for an error, 2 for a usage
error, 130 for Ctrl-C. Inputs are checked before the work they would spoil (an output path before editing, a
database against the model before generating). ``--debug`` (or ``NEURALDB_DEBUG=1``) shows the traceback instead.

Over 400 lines because every subcommand's parser is declared here, beside the others; the longer commands (edit,
calibrate, eval, serve) keep their work in their own modules.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from neuraldb.cli_calibrate import add_parser as add_calibrate_parser
from neuraldb.cli_calibrate import cmd_calibrate
from neuraldb.cli_edit import cmd_edit, cmd_merge
from neuraldb.cli_support import (
    NO_TEXT,
    CLIError,
    _check_model,
    _device,
    _gamma,
    _non_negative_int,
    _positive_int,
    _slice,
    _utf8_text,
    check_model_config,
    check_output,
    describe_fact,
    generate_text,
    load_db,
    load_model_verbose,
    one_line,
    parse_id_ranges,
    parse_ids,
)
from neuraldb.serve import command as serve_command

__all__ = ["build_parser", "main", "parse_id_ranges", "parse_ids"]

DEBUG_ENV = "NEURALDB_DEBUG"
_EPILOG = (
    "Errors are one line on stderr and a non-zero exit status (1 error, 2 usage, 130 interrupted); "
    f"--debug or {DEBUG_ENV}=1 shows the traceback instead."
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like the commands' own errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (default), 'gemma3-270m', a Hugging Face model directory or a .gguf file",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="parameter dtype (default: float32)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice, one per core)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``neuraldb`` argument parser, one subcommand per entry of ``COMMANDS``.

    Example::

        >>> build_parser().parse_args(["info", "edits.safetensors", "--all"]).command
        'info'
    """
    parser = _Parser(
        prog="neuraldb",
        description="Edit facts into a Hugging Face language model with a gated neural key-value database.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "edit",
        help="edit facts from a file into a new (or existing) database",
        description="Compute keys and residuals for the facts in a file and save them as a database.",
    )
    _add_model_args(p)
    p.add_argument(
        "--facts", required=True, type=Path, help="facts file: JSONL, CounterFact (ROME/MEND) or ZsRE (MEND)"
    )
    p.add_argument("--out", required=True, type=Path, help="database file to write (.safetensors)")
    p.add_argument("--limit", type=_non_negative_int, help="edit only the first N facts")
    p.add_argument("--layer", type=_non_negative_int, help="layer to edit (default: the model's default)")
    p.add_argument("--gamma", type=_gamma, help="gate threshold in [-1, 1] (default: the model's default)")
    p.add_argument("--batch-size", type=_positive_int, help="facts optimised together (default: the model's default)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add the facts to the database in --out if it exists")
    mode.add_argument("--overwrite", action="store_true", help="replace the database in --out if it exists")
    mode.add_argument(
        "--resume", action="store_true",
        help="continue the checkpointed job in --out where it stopped (starts it if --out does not exist)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=_positive_int, metavar="N",
        help="save --out every N facts, so that a killed job loses at most N (default with --resume/--slice: 256, "
        "or the job's)",
    )  # fmt: skip
    p.add_argument(
        "--slice", type=_slice, metavar="START:STOP",
        help="edit only facts START..STOP-1 of the file, with those indices as ids (for `neuraldb merge`)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-calibrate", action="store_true", help="fit no per-row gate thresholds and no subject gate after editing"
    )
    p.add_argument("--no-warm-start", action="store_true", help="start every residual from zero (docs/editing.md)")

    p = sub.add_parser(
        "merge",
        help="join databases edited from disjoint slices of the same facts (edit --slice)",
        description="Join the databases of checkpointed edits of disjoint slices of one facts file, made with the same "
        "model and hyperparameters, into one whose ids are the facts' indices in the file.",
    )
    p.add_argument("dbs", nargs="+", type=Path, metavar="DB", help="databases written by `neuraldb edit --slice`")
    p.add_argument("--out", required=True, type=Path, help="database file to write")
    p.add_argument("--allow-gaps", action="store_true", help="merge even if some facts are in none of the databases")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser(
        "generate",
        help="complete prompts with and without the edits, side by side",
        description="Greedy completions of each prompt by the unedited model and, with --db, the edited one.",
    )
    _add_model_args(p)
    p.add_argument("--db", type=Path, help="database to patch in (without it, only the unedited model answers)")
    p.add_argument(
        "--prompt", "-p", action="append", required=True, type=_utf8_text, help="prompt text (repeat for several)"
    )
    p.add_argument(
        "--chat", action="store_true",
        help="ask each prompt as a user turn in the tokenizer's chat template (for questions to an instruct model)",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=_positive_int, default=20, help="tokens to generate (default: 20)")
    p.add_argument("--gamma", type=_gamma, help="gate threshold (default: the database's)")
    p.add_argument("--force", action="store_true", help="patch even if the database was built for a different model")

    p = sub.add_parser("info", help="describe a database and list its facts", description="Describe a database.")
    p.add_argument("db", type=Path, help="database file")
    p.add_argument("--limit", type=_non_negative_int, default=20, help="facts to list (default: 20; 0: none)")
    p.add_argument("--all", action="store_true", help="list every fact")

    p = sub.add_parser(
        "delete",
        help="delete facts from a database by id",
        description="Delete facts by id (see `neuraldb info`); the other facts keep their ids.",
    )
    p.add_argument("db", type=Path, help="database file")
    p.add_argument("--ids", nargs="+", required=True, metavar="ID", help="ids to delete: 3 5-7 9,10")
    p.add_argument("--out", type=Path, help="write the result here instead of overwriting DB")

    p = sub.add_parser(
        "demo",
        help="edit a few built-in counterfactual facts into SmolLM2 and show before/after",
        description="Edit built-in counterfactual facts into a model, show answers before and after, delete one.",
    )
    p.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    p.add_argument("--max-new-tokens", type=_positive_int, default=6, help="tokens per answer (default: 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # One thread: the demo's matrices are small, and OpenMP spin-waiting on shared cores made 2 threads 10x slower.
    p.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for torch (default: 1)")

    from neuraldb.evaluation.command import add_parser as add_eval_parser  # `neuraldb eval`, defined there

    add_eval_parser(sub)
    add_calibrate_parser(sub, _add_model_args)
    serve_command.add_parser(sub, _add_model_args)
    for p in sub.choices.values():
        # SUPPRESS: a subcommand without --debug must not reset `neuraldb --debug COMMAND`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.epilog = p.epilog or _EPILOG
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neuraldb")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    """``neuraldb generate``: greedy answers of the unedited model and, with ``--db``, the edited one."""
    from neuraldb import templates
    from neuraldb.patching import disabled, patch_checked

    db = load_db(args.db) if args.db is not None else None
    if db is not None:
        check_model_config(db, args.model, force=args.force)
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    template = db.template if db is not None and db.template is not None else templates.default_template(tok)
    if args.chat and not templates.has_chat_template(tok):
        raise CLIError(
            f"--chat: the tokenizer of {args.model!r} has no chat template; drop --chat to complete the prompts as text"
        )
    if db is not None:
        _check_model(db, model, force=args.force)
        # Patched before the first answer, so that a database the model cannot take fails before any generation
        patch_checked(model, db, gamma=args.gamma)  # _check_model above decided (and warned) on identity

    prompts = args.prompt

    def answers() -> list[str]:
        return [
            generate_text(model, tok, p, template=template, max_new_tokens=args.max_new_tokens, chat=args.chat)
            for p in prompts
        ]

    with disabled(model) if db is not None else contextlib.nullcontext():
        before = answers()
    after = answers() if db is not None else None
    for i, prompt in enumerate(args.prompt):
        print(f"prompt:    {one_line(prompt)}")
        print(f"unedited:  {one_line(before[i])}")
        if after is not None:
            print(f"edited:    {one_line(after[i])}")
        print()
    ended_at_once = any(a.startswith(NO_TEXT) for a in before + (after or []))
    if ended_at_once and not args.chat and templates.has_chat_template(tok):
        print(
            "neuraldb generate: note: a chat model may end its turn at once after a question in plain text; "
            "--chat asks it in its chat template",
            file=sys.stderr,
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``neuraldb info``: a database's metadata and (some of) its facts with their ids."""
    db = load_db(args.db)
    rows = [
        ("file", str(args.db)),
        ("facts", str(len(db))),
        ("model", db.model_id or "(not recorded)"),
        ("module", db.module_path or "(not recorded)"),
        ("layer", "(not recorded)" if db.layer is None else str(db.layer)),
        ("gamma", "(model default)" if db.gamma is None else f"{db.gamma:g}"),
        ("own thresholds", f"{int((db.thresholds > -1).sum())} rows (`neuraldb calibrate` fits them)"),
        ("template", "(none)" if db.template is None else repr(db.template)),
        ("key/value dim", f"{db.key_dim}/{db.value_dim}"),
        ("dtype", str(db.dtype).removeprefix("torch.")),
        ("next id", str(db.next_id)),
    ]
    if db.config:
        rows.append(("config", ", ".join(f"{k}={v}" for k, v in sorted(db.config.items()))))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ids = db.ids()
    shown = ids if args.all else ids[: args.limit]
    if shown:
        print()
        id_width = max(2, len(str(max(shown))))
        print(f"{'id':>{id_width}}  fact")
        for i in shown:
            print(f"{i:>{id_width}}  {describe_fact(db.fact(i))}")
        if len(shown) < len(ids):
            print(f"... and {len(ids) - len(shown)} more (--all lists every fact)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """``neuraldb delete``: remove facts by id (all or nothing) and save the database."""
    try:
        spans = parse_id_ranges(args.ids)
    except argparse.ArgumentTypeError as e:
        raise CLIError(str(e)) from None
    out = args.out or args.db
    check_output(out, replace=True)
    db = load_db(args.db)
    # Lazily, range by range: a range holds at most len(db) ids that are present, so finding the first missing
    # ones, and then listing the ids to delete, is bounded by the database's size rather than the range's.
    missing = list(itertools.islice((i for r in spans for i in r if i not in db), 11))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise CLIError(f"not in {args.db}: id {shown} (`neuraldb info {args.db}` lists the ids); nothing deleted")
    ids = list(dict.fromkeys(i for r in spans for i in r))  # a repeated id is deleted once
    db.delete(ids)
    db.save(out)
    print(f"Deleted {len(ids)} fact(s); {out}: {len(db)} facts remain")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``neuraldb demo``: see :mod:`neuraldb.cli_demo`."""
    from neuraldb.cli_demo import run_demo

    return run_demo(model_name=args.model, max_new_tokens=args.max_new_tokens, progress=not args.no_progress)


def cmd_eval(args: argparse.Namespace) -> int:
    """``neuraldb eval``: see :mod:`neuraldb.evaluation.command`."""
    from neuraldb.evaluation.command import run

    return run(args)


COMMANDS = {
    "edit": cmd_edit, "generate": cmd_generate, "info": cmd_info, "delete": cmd_delete, "demo": cmd_demo,
    "eval": cmd_eval, "merge": cmd_merge, "calibrate": cmd_calibrate, "serve": serve_command.cmd_serve,
}  # fmt: skip


def describe_error(e: BaseException) -> str:
    """One line for an exception that ends a command.

    The exceptions neuraldb documents for bad input (ValueError, TypeError, OSError and their subclasses such as
    FactFormatError and ModelNotFoundError, a missing optional package) are shown by their message. Anything else is
    a bug or a failure of the machine (a torch RuntimeError, ...): shown with its type and a pointer to ``--debug``.

    Example::

        >>> describe_error(FileNotFoundError(2, "No such file or directory", "x.jsonl"))
        'x.jsonl: No such file or directory'
    """
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{os.fsdecode(e.filename)}: {e.strerror}"
    elif isinstance(e, MemoryError):
        text = f"out of memory {e}".strip()
    elif isinstance(e, (CLIError, ValueError, TypeError, OSError, ImportError)):
        text = str(e) or type(e).__name__
    else:
        text = f"unexpected {type(e).__name__}: {e} (--debug shows the traceback)"
    return one_line(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuraldb`` console script; returns the exit status (0 ok, 1 error, 2 usage, 130 Ctrl-C).

    Every error ends in one line on stderr; ``--debug`` or ``NEURALDB_DEBUG=1`` lets the exception propagate.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local files; never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # Both import torch (`eval`'s parser comes from the evaluation package; --device is checked against torch).
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("neuraldb: interrupted", file=sys.stderr)
        return 130
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    prog = f"neuraldb {args.command}"
    with warnings.catch_warnings():
        if not debug:
            # Python's format takes two lines, the second a line of neuraldb's source that means nothing to a user
            def show(message, category, filename, lineno, file=None, line=None):
                print(f"{prog}: warning: {one_line(str(message))}", file=file or sys.stderr)

            warnings.showwarning = show
        return _run(args, prog, debug)


def _run(args: argparse.Namespace, prog: str, debug: bool) -> int:
    torch = threads = None
    try:
        import torch

        threads = torch.get_num_threads()
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`neuraldb info db --all | head`): stop quietly, as Unix tools do, and keep
        # Python from failing again when it flushes stdout at exit.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if debug:
            raise
        print(f"{prog}: error: {describe_error(e)}", file=sys.stderr)
        return 1
    finally:
        if threads is not None:
            torch.set_num_threads(threads)  # for callers of main() inside a longer-lived process


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
