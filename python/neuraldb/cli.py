"""The ``neuraldb`` command: edit facts into a model, generate with and without the edits, inspect and prune databases.

::

    neuraldb edit --model smollm2 --facts facts.jsonl --out edits.safetensors [--limit N --layer L --gamma G]
    neuraldb edit --facts cf.json.gz --out part0.safetensors --checkpoint-every 256 --slice 0:10240 [--resume]
    neuraldb merge part0.safetensors part1.safetensors --out all.safetensors
    neuraldb generate --model smollm2 --db edits.safetensors --prompt "The Eiffel Tower is located in the city of"
    neuraldb info edits.safetensors
    neuraldb delete edits.safetensors --ids 0 3 5-7
    neuraldb demo
    neuraldb eval --dataset counterfact --facts cf.json.gz --n 100 --out results/ [--general-data DIR --deletion]

Models are loaded with :func:`neuraldb.load_model` (``smollm2``, ``gemma3-270m``, a Hugging Face directory or a
``.gguf`` file; nothing is downloaded). Prompts are wrapped in the database's text template (see
:mod:`neuraldb.templates`) so that inference sees the same text the keys were built from.

Errors are one line on stderr (``neuraldb COMMAND: error: ...``) and a non-zero exit: 1 for an error, 2 for a usage
error, 130 for Ctrl-C. Inputs are checked before the work they would spoil (an output path before editing, a
database against the model before generating). ``--debug`` (or ``NEURALDB_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from neuraldb.database import NeuralKVDatabase
    from neuraldb.database_inputs import FactLike

__all__ = ["build_parser", "main", "parse_id_ranges", "parse_ids"]

DEBUG_ENV = "NEURALDB_DEBUG"
_EPILOG = (
    "Errors are one line on stderr and a non-zero exit status (1 error, 2 usage, 130 interrupted); "
    f"--debug or {DEBUG_ENV}=1 shows the traceback instead."
)


class CLIError(Exception):
    """An error to report on one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like the commands' own errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------


def parse_id_ranges(values: Sequence[str]) -> list[range]:
    """Fact ids from command-line words as ranges, never expanded (``0-1000000000`` costs nothing).

    Example::

        >>> parse_id_ranges(["3", "5-7", "9,10"])
        [range(3, 4), range(5, 8), range(9, 10), range(10, 11)]
    """
    out: list[range] = []
    for word in values:
        for part in word.split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")  # "-" is the separator, so no id can be negative
            try:
                a = int(lo)
                b = int(hi) if sep else a
                if b < a:
                    raise ValueError
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"invalid id {part!r}: use non-negative integers or ranges like 5-7"
                ) from None
            out.append(range(a, b + 1))
    if not out:
        raise argparse.ArgumentTypeError("no ids given")
    return out


def parse_ids(values: Sequence[str]) -> list[int]:
    """Fact ids from command-line words: ``["3", "5-7", "9,10"]`` -> ``[3, 5, 6, 7, 9, 10]``."""
    return [i for r in parse_id_ranges(values) for i in r]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _slice(text: str) -> tuple[int, int | None]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = int(start or 0), (int(stop) if stop else None)
        if a < 0 or (b is not None and b <= a):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid slice {text!r}: use START:STOP with 0 <= START < STOP (STOP may be left out: START:)"
        ) from None
    return a, b


def _gamma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"gamma must be in [-1, 1], got {value}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


def _utf8_text(text: str) -> str:
    # Arguments that are not UTF-8 arrive with lone surrogates (Python's surrogateescape), which tokenizers reject
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 text: {text.encode('utf-8', 'backslashreplace').decode('ascii', 'replace')}"
        ) from None
    return text


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
    p.add_argument("--facts", required=True, type=Path, help="facts file: JSONL, CounterFact (ROME/MEND) or ZsRE (MEND)")
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
    p.add_argument("--max-new-tokens", type=_positive_int, default=20, help="tokens to generate (default: 20)")
    p.add_argument("--gamma", type=_gamma, help="gate threshold (default: the database's)")
    p.add_argument(
        "--force", action="store_true", help="patch even if the database was built for a different model"
    )

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
    # One thread by default: the demo's matrices are small, and a single thread cannot be slowed down by
    # OpenMP spin-waiting when other work shares the cores (two threads made it 10x slower on a busy machine).
    p.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for torch (default: 1)")

    from neuraldb.evaluation.command import add_parser as add_eval_parser  # `neuraldb eval`, defined there

    add_eval_parser(sub)
    for p in sub.choices.values():
        # SUPPRESS: a subcommand without --debug must not reset `neuraldb --debug COMMAND`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.epilog = p.epilog or _EPILOG
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("neuraldb")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared with the demo
# ---------------------------------------------------------------------------------------------------------------------


def load_model_verbose(
    name: str, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu", out: TextIO = sys.stderr
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`neuraldb.load_model`, saying on ``out`` what it loads and how long that took."""
    from neuraldb.models import load_model

    t0 = time.perf_counter()
    print(f"Loading model {name!r} ...", file=out, flush=True)
    model, tok = load_model(name, dtype, device=device)
    print(f"Loaded in {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    return model, tok


def generate_text(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, *, template: str | None, max_new_tokens: int
) -> str:
    """Greedy continuation of ``prompt`` (wrapped in ``template``), without the prompt."""
    import torch

    from neuraldb import templates

    ids = torch.tensor([templates.encode(tok, template, prompt)], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def one_line(text: str, width: int | None = None) -> str:
    """``text`` with its whitespace runs collapsed to single spaces, cut to ``width`` characters with an ellipsis.

    Example::

        >>> one_line("Rome   is  the capital", width=12)
        'Rome is the…'
    """
    text = " ".join(text.split())
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def load_db(path: Path) -> NeuralKVDatabase:
    """``NeuralKVDatabase.load(path)``, failing with a one-line CLIError when the file is missing or invalid."""
    from neuraldb.database import NeuralKVDatabase

    if not path.exists():
        raise CLIError(f"database not found: {path}")
    try:
        return NeuralKVDatabase.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"cannot read database {path}: {e}") from None


def check_output(path: Path, *, replace: bool, exists_hint: str = "") -> None:
    """Fail with a CLIError, before any work, when a command could not write its result to ``path``.

    Refused: what :func:`neuraldb.atomic.resolve_target` refuses (a directory or other non-regular file, a missing
    directory), an existing file unless ``replace``, and a directory where no file can be created. The last is probed
    by creating (and removing) a file beside the target: permission bits do not tell for root, a read-only mount or a
    pseudo file system like /proc.
    """
    from neuraldb.atomic import resolve_target

    try:
        real = resolve_target(path)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:  # EACCES, ELOOP ...
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None
    if real.exists() and not replace:
        raise CLIError(f"{path} exists{exists_hint}")
    try:
        with tempfile.NamedTemporaryFile(dir=real.parent, prefix=f".{real.name}.probe-"):
            pass
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def describe_fact(fact: FactLike) -> str:
    """One line for ``neuraldb info``: ``prompt -> new  (was: old)`` for a Fact, JSON for a dict.

    Example::

        >>> from neuraldb.facts import Fact
        >>> describe_fact(Fact("Eiffel Tower", "The {} is in", "Rome", target_true="Paris"))
        'The Eiffel Tower is in -> Rome  (was: Paris)'
    """
    from neuraldb.facts import Fact

    if fact is None:
        return "(no metadata)"
    if isinstance(fact, Fact):
        was = f"  (was: {fact.target_true})" if fact.target_true else ""
        return f"{fact.text} -> {fact.target_new}{was}"
    import json

    return json.dumps(fact, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def cmd_edit(args: argparse.Namespace) -> int:
    """``neuraldb edit``: edit the facts of a file into a new database, or append them to an existing one; with
    ``--checkpoint-every``/``--resume``/``--slice``, as a checkpointed job (:mod:`neuraldb.editing.jobs`)."""
    from neuraldb import facts as facts_mod
    from neuraldb.editing import edit
    from neuraldb.patching import patch_model, unpatch_model

    checkpointed = args.resume or args.checkpoint_every is not None or args.slice is not None
    if checkpointed and args.append:
        raise CLIError("--append cannot be combined with --checkpoint-every or --slice (use --resume)")
    # The output is checked first: editing takes minutes, and nothing should be lost to a path that cannot be saved.
    if not args.out.is_dir():
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"cannot create the directory of {args.out}: {e.strerror or e}") from None
    check_output(
        args.out,
        replace=args.append or args.overwrite or args.resume,
        exists_hint=": pass --append to add to it, --overwrite to replace it, or --resume to continue its job",
    )
    facts = facts_mod.load(args.facts, limit=args.limit)
    if not facts:
        raise CLIError(f"no facts to edit in {args.facts}")
    if checkpointed:
        return _edit_job(args, facts)
    db = load_db(args.out) if args.append and args.out.exists() else None
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    if db is not None:
        _check_model(db, model, force=False)
        # patch_model's checks (module, layer, dimensions) refuse a database that the edits could not be added to
        unpatch_model(patch_model(model, db))
    print(f"Editing {len(facts)} facts from {args.facts} ...", file=sys.stderr, flush=True)
    stats: dict = {}
    db = edit(
        model,
        tok,
        facts,
        layer=args.layer,
        gamma=args.gamma,
        db=db,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        stats=stats,
    )
    db.save(args.out)
    seconds = stats.get("seconds")
    timing = f" in {seconds:.1f} s ({seconds / len(facts):.2f} s per fact)" if seconds else ""
    new_ids = db.ids()[-len(facts) :]
    print(
        f"Edited {len(facts)} facts{timing}; ids {new_ids[0]}..{new_ids[-1]}. "
        f"{args.out}: {len(db)} facts, layer {db.layer}, gamma {db.gamma}"
    )
    return 0


def _edit_job(args: argparse.Namespace, facts: list) -> int:
    """The checkpointed ``edit``: everything the job could refuse is checked before the model loads."""
    from neuraldb.editing import check_resume, edit_checkpointed

    start, stop = args.slice or (0, None)
    if start >= len(facts) or (stop is not None and stop > len(facts)):
        shown = f"{start}:{'' if stop is None else stop}"
        raise CLIError(f"--slice {shown} is outside the {len(facts)} facts of {args.facts}")
    hparams = {"layer": args.layer, "gamma": args.gamma, "batch_size": args.batch_size}
    resuming = args.resume and args.out.exists()
    if resuming:
        check_resume(
            load_db(args.out), facts, path=args.out, start=start, stop=stop, checkpoint_every=args.checkpoint_every,
            **hparams,
        )  # fmt: skip
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    if resuming:
        _check_model(load_db(args.out), model, force=False)
    elif args.out.exists():  # --overwrite: the job starts afresh
        args.out.unlink()
    source = {"path": str(args.facts.resolve()), "size": args.facts.stat().st_size, "limit": args.limit}
    stats: dict = {}

    def flushed(db, done: int) -> None:
        if args.no_progress:
            print(f"{args.out}: facts {start}..{done - 1} saved", file=sys.stderr, flush=True)

    db = edit_checkpointed(
        model, tok, facts, args.out, checkpoint_every=args.checkpoint_every, resume=args.resume, start=start,
        stop=stop, source=source, progress=not args.no_progress, on_flush=flushed, stats=stats, **hparams,
    )  # fmt: skip
    n, seconds = stats["n"], stats["seconds"]
    timing = f" in {seconds:.1f} s ({seconds / n:.2f} s per fact)" if n else ""
    was = f"resumed at fact {stats['resumed_at']}; " if resuming else ""
    print(
        f"Edited {n} facts{timing}; {was}{args.out}: facts {db.ids()[0]}..{db.ids()[-1]} ({len(db)}) of "
        f"{len(facts)}, layer {db.layer}, gamma {db.gamma}"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``neuraldb merge``: join the databases of checkpointed edits of disjoint slices (ids = the facts' indices)."""
    from neuraldb.editing import merge_databases

    check_output(args.out, replace=args.overwrite, exists_hint=": pass --overwrite to replace it")
    dbs = [load_db(p) for p in args.dbs]
    db = merge_databases(dbs, names=[str(p) for p in args.dbs], allow_gaps=args.allow_gaps)
    db.save(args.out)
    print(f"Merged {len(dbs)} databases; {args.out}: {len(db)} facts, layer {db.layer}, gamma {db.gamma}")
    return 0


def _check_model(db: NeuralKVDatabase, model: PreTrainedModel, *, force: bool) -> None:
    from neuraldb.models import model_id

    mid = model_id(model)
    if db.model_id and mid and db.model_id != mid:
        msg = f"the database was built for model {db.model_id!r}, but the loaded model is {mid!r}"
        if not force:
            raise CLIError(msg + " (pass the matching --model, or --force to patch anyway)")
        print(f"warning: {msg}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    """``neuraldb generate``: greedy answers of the unedited model and, with ``--db``, the edited one."""
    from neuraldb import templates
    from neuraldb.patching import disabled, patch_model

    db = load_db(args.db) if args.db is not None else None
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    template = db.template if db is not None and db.template is not None else templates.default_template(tok)
    if db is not None:
        _check_model(db, model, force=args.force)
        # Patched before the first answer, so that a database the model cannot take fails before any generation
        patch_model(model, db, gamma=args.gamma)

    prompts = args.prompt

    def answers() -> list[str]:
        return [generate_text(model, tok, p, template=template, max_new_tokens=args.max_new_tokens) for p in prompts]

    with disabled(model) if db is not None else contextlib.nullcontext():
        before = answers()
    after = answers() if db is not None else None
    for i, prompt in enumerate(args.prompt):
        print(f"prompt:    {one_line(prompt)}")
        print(f"unedited:  {one_line(before[i])}")
        if after is not None:
            print(f"edited:    {one_line(after[i])}")
        print()
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
        ("template", "(none)" if db.template is None else repr(db.template)),
        ("key dim", str(db.key_dim)),
        ("value dim", str(db.value_dim)),
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
    "eval": cmd_eval, "merge": cmd_merge,
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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # parsing imports torch (--device)
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
