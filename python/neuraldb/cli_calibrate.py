"""``neuraldb calibrate``: fit each row's gate threshold from a text corpus and the database's own facts.

::

    neuraldb calibrate edits.safetensors --text corpus.txt [--tokens 65536 --skip 0 --delta 0.05 --margin 0.1]
    neuraldb calibrate edits.safetensors --text corpus.txt --eval-text other.txt --dry-run   # report, change nothing

See :mod:`neuraldb.calibration` for what is fitted. The database is saved in place (or to ``--out``) atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuraldb.cli_support import (
    CLIError,
    _check_model,
    _non_negative_int,
    _positive_int,
    check_model_config,
    check_output,
    load_db,
)

__all__ = ["add_parser", "cmd_calibrate"]


def _unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def add_parser(sub, add_model_args) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "calibrate",
        help="fit each fact's own gate threshold from ordinary text, so that text opens fewer gates",
        description="Fit per-row gate thresholds: above each fact's hardest negative (positions of --text, other "
        "facts' prompts, every other position of the facts' own prompts + answers, its subject's last word alone), "
        "below its own prompt; then save the database.",
    )
    p.add_argument("db", type=Path, help="database file (built by `neuraldb edit`)")
    add_model_args(p)
    p.add_argument("--text", type=Path, nargs="+", required=True, help="calibration corpus: UTF-8 text files (.gz ok)")
    p.add_argument("--tokens", type=_positive_int, default=65536, help="tokens of --text to read (default 65536)")
    p.add_argument("--skip", type=_non_negative_int, default=0, help="skip this many tokens of --text first")
    p.add_argument("--delta", type=_unit, default=0.05, help="threshold above the hardest negative (default 0.05)")
    p.add_argument("--margin", type=_unit, default=0.1, help="threshold below the fact's own prompt (default 0.1)")
    p.add_argument(
        "--eval-text", type=Path, nargs="+", help="text to report gate openings on (keep it apart from --text)"
    )
    p.add_argument(
        "--relation-gate", type=_unit, metavar="RHO",
        help="also give each fact a relation key and open its row only where its relation is asked (cosine > RHO "
        "within --relation-window tokens after the subject; suits question-style facts, see the docs)",
    )  # fmt: skip
    p.add_argument(
        "--relation-window", type=_non_negative_int, default=24, help="tokens after the subject (default 24)"
    )
    p.add_argument(
        "--subject-gate", type=_unit, metavar="RHO",
        help="also give each fact of a several-token subject the state at the token before its subject's last, and "
        "open its row only where the text before that token matches (cosine > RHO; 0.3 measured on CounterFact): "
        "names that only end like an edited subject stay shut. A row holds a relation or a subject key, not both",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="write the calibrated database here instead of overwriting DB")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.add_argument("--force", action="store_true", help="calibrate even if the database was built for another model")
    return p


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``neuraldb calibrate``: fit, report, save."""
    from neuraldb.calibration import calibrate, read_corpus, text_openings
    from neuraldb.cli_support import load_model_verbose

    if args.relation_gate is not None and args.subject_gate is not None:
        raise CLIError("--relation-gate and --subject-gate: a row holds one of their keys; give one of them")
    out = args.out or args.db
    if not args.dry_run:
        check_output(out, replace=True)
    db = load_db(args.db)
    if db.layer is None:
        raise CLIError(f"{args.db} records no layer: calibrate databases built by `neuraldb edit`")
    texts = [read_corpus(p) for p in args.text]
    evals = [read_corpus(p) for p in args.eval_text] if args.eval_text else None
    check_model_config(db, args.model, force=args.force)
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    _check_model(db, model, force=args.force)
    before = text_openings(model, tok, db, evals, tokens=args.tokens) if evals else None
    report = calibrate(
        model, tok, db, texts, tokens=args.tokens, skip=args.skip, delta=args.delta, margin=args.margin,
        dry_run=args.dry_run, progress=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(report.summary())
    if args.subject_gate is not None and not args.dry_run:
        from neuraldb.subject_gate import enable_subject_gate

        given = enable_subject_gate(model, tok, db, rho=args.subject_gate)
        print(f"subject gate on (rho {args.subject_gate:g}): {given} facts with a previous-token key")
    if args.relation_gate is not None and not args.dry_run:
        from neuraldb.calibration import enable_relation_gate

        given = enable_relation_gate(model, tok, db, rho=args.relation_gate, window=args.relation_window)
        print(f"relation gate on (rho {args.relation_gate:g}, window {args.relation_window}): {given} relation keys")
    if evals:
        if args.dry_run:
            db.set_thresholds(db.ids(), report.thresholds)  # only in memory: nothing is saved
        after = text_openings(model, tok, db, evals, tokens=args.tokens)
        print(
            f"--eval-text: {after['positions']} positions; open before {before['open_pct']:.3f}%, "
            f"after {after['open_pct']:.3f}%"
        )
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    db.save(out)
    print(f"{out}: {len(db)} facts, {report.raised} with a threshold above gamma")
    return 0
