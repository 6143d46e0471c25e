"""``neuraldb edit`` and ``neuraldb merge``: facts into a database, in one go or as a checkpointed, resumable job."""

from __future__ import annotations

import argparse
import sys

from neuraldb.cli_support import (
    CLIError,
    _check_model,
    check_model_config,
    check_output,
    load_db,
    load_model_verbose,
)


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
    if db is not None:
        check_model_config(db, args.model, force=False)
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
        warm_start=False if args.no_warm_start else None,
    )
    _calibrate(args, model, tok, db)
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
    hparams["warm_start"] = False if args.no_warm_start else None
    resuming = args.resume and args.out.exists()
    if resuming:
        check_resume(
            load_db(args.out), facts, path=args.out, start=start, stop=stop, checkpoint_every=args.checkpoint_every,
            **hparams,
        )  # fmt: skip
        check_model_config(load_db(args.out), args.model, force=False)
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
    if args.slice is None and len(db) == len(facts):  # a finished whole job; slices are calibrated after `merge`
        _calibrate(args, model, tok, db)
        db.save(args.out)
    n, seconds = stats["n"], stats["seconds"]
    timing = f" in {seconds:.1f} s ({seconds / n:.2f} s per fact)" if n else ""
    was = f"resumed at fact {stats['resumed_at']}; " if resuming else ""
    print(
        f"Edited {n} facts{timing}; {was}{args.out}: facts {db.ids()[0]}..{db.ids()[-1]} ({len(db)}) of "
        f"{len(facts)}, layer {db.layer}, gamma {db.gamma}"
    )
    return 0


def _calibrate(args: argparse.Namespace, model, tok, db) -> None:
    """Per-row gate thresholds from the database's own negatives (no text): see :mod:`neuraldb.calibration`."""
    if args.no_calibrate:
        return
    from neuraldb.gate_fit import fit_defaults

    print(
        "Fitting per-row gate thresholds and the subject gate (--no-calibrate skips) ...", file=sys.stderr, flush=True
    )
    report, keyed = fit_defaults(model, tok, db)
    gate = "" if keyed is None else f"; {keyed} facts check the token before their subject's last (subject gate)"
    print(
        f"{report.raised} of {report.fitted} facts got a gate threshold above gamma{gate}; `neuraldb calibrate "
        "--text` fits the thresholds on ordinary text too",
        file=sys.stderr,
    )


def cmd_merge(args: argparse.Namespace) -> int:
    """``neuraldb merge``: join the databases of checkpointed edits of disjoint slices (ids = the facts' indices)."""
    from neuraldb.editing import merge_databases

    check_output(args.out, replace=args.overwrite, exists_hint=": pass --overwrite to replace it")
    dbs = [load_db(p) for p in args.dbs]
    db = merge_databases(dbs, names=[str(p) for p in args.dbs], allow_gaps=args.allow_gaps)
    db.save(args.out)
    print(f"Merged {len(dbs)} databases; {args.out}: {len(db)} facts, layer {db.layer}, gamma {db.gamma}")
    return 0
