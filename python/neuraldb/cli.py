"""The ``neuraldb`` command: edit facts into a model, generate with and without the edits, inspect and prune databases.

::

    neuraldb edit --model smollm2 --facts facts.jsonl --out edits.safetensors [--limit N --layer L --gamma G]
    neuraldb generate --model smollm2 --db edits.safetensors --prompt "The Eiffel Tower is located in the city of"
    neuraldb info edits.safetensors
    neuraldb delete edits.safetensors --ids 0 3 5-7
    neuraldb demo
    neuraldb eval --dataset counterfact --facts cf.json.gz --n 100 --out results/ [--general-data DIR --deletion]

Models are loaded with :func:`neuraldb.load_model` (``smollm2``, ``gemma3-270m``, a Hugging Face directory or a
``.gguf`` file; nothing is downloaded). Prompts are wrapped in the database's text template (see
:mod:`neuraldb.templates`) so that inference sees the same text the keys were built from.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from neuraldb.database import NeuralKVDatabase
    from neuraldb.database_inputs import FactLike

__all__ = ["main", "build_parser", "parse_ids"]


class CLIError(Exception):
    """An error to report on one line, without a traceback."""


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------


def parse_ids(values: Sequence[str]) -> list[int]:
    """Fact ids from command-line words: ``["3", "5-7", "9,10"]`` -> ``[3, 5, 6, 7, 9, 10]``."""
    out: list[int] = []
    for word in values:
        for part in word.split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                if sep:
                    a, b = int(lo), int(hi)
                    if b < a:
                        raise ValueError
                    out.extend(range(a, b + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid id {part!r}: use integers or ranges like 5-7") from None
    if not out:
        raise argparse.ArgumentTypeError("no ids given")
    if any(i < 0 for i in out):
        raise argparse.ArgumentTypeError("ids are non-negative integers")
    return out


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


def _gamma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"gamma must be in [-1, 1], got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (default), 'gemma3-270m', a Hugging Face model directory or a .gguf file",
    )
    p.add_argument("--dtype", default=None, help="parameter dtype: float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
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
    parser = argparse.ArgumentParser(
        prog="neuraldb",
        description="Edit facts into a Hugging Face language model with a gated neural key-value database.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "generate",
        help="complete prompts with and without the edits, side by side",
        description="Greedy completions of each prompt by the unedited model and, with --db, the edited one.",
    )
    _add_model_args(p)
    p.add_argument("--db", type=Path, help="database to patch in (without it, only the unedited model answers)")
    p.add_argument("--prompt", "-p", action="append", required=True, help="prompt text (repeat for several)")
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

    if not path.is_file():
        raise CLIError(f"database not found: {path}")
    try:
        return NeuralKVDatabase.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"cannot read database {path}: {e}") from None


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
    """``neuraldb edit``: edit the facts of a file into a new database, or append them to an existing one."""
    from neuraldb import facts as facts_mod
    from neuraldb.editing import edit

    if args.out.exists() and not (args.append or args.overwrite):
        raise CLIError(f"{args.out} exists: pass --append to add to it or --overwrite to replace it")
    try:
        facts = facts_mod.load(args.facts, limit=args.limit)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    if not facts:
        raise CLIError(f"no facts to edit in {args.facts}")
    db = load_db(args.out) if args.append and args.out.exists() else None
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    if db is not None:
        _check_model(db, model, force=False)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    db.save(args.out)
    seconds = stats.get("seconds")
    timing = f" in {seconds:.1f} s ({seconds / len(facts):.2f} s per fact)" if seconds else ""
    new_ids = db.ids()[-len(facts) :]
    print(
        f"Edited {len(facts)} facts{timing}; ids {new_ids[0]}..{new_ids[-1]}. "
        f"{args.out}: {len(db)} facts, layer {db.layer}, gamma {db.gamma}"
    )
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
    from neuraldb.patching import patch_model

    db = load_db(args.db) if args.db is not None else None
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    template = db.template if db is not None and db.template is not None else templates.default_template(tok)
    if db is not None:
        _check_model(db, model, force=args.force)
    before = [generate_text(model, tok, p, template=template, max_new_tokens=args.max_new_tokens) for p in args.prompt]
    after = None
    if db is not None:
        patch_model(model, db, gamma=args.gamma)
        after = [generate_text(model, tok, p, template=template, max_new_tokens=args.max_new_tokens) for p in args.prompt]
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
        ids = parse_ids(args.ids)
    except argparse.ArgumentTypeError as e:
        raise CLIError(str(e)) from None
    ids = list(dict.fromkeys(ids))  # a repeated id is deleted once
    db = load_db(args.db)
    missing = [i for i in ids if i not in db]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise CLIError(f"not in {args.db}: id {shown} (`neuraldb info {args.db}` lists the ids); nothing deleted")
    db.delete(ids)
    out = args.out or args.db
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
    "eval": cmd_eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuraldb`` console script; returns the exit status (0 ok, 1 error, 2 usage)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local files; never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from neuraldb.facts import FactFormatError
    from neuraldb.models import ModelNotFoundError

    import torch

    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (CLIError, ModelNotFoundError, FactFormatError, ModuleNotFoundError) as e:
        print(f"neuraldb {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # for callers of main() inside a longer-lived process


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
