"""``neuraldb serve``: the command line of the server (see :mod:`neuraldb.serve`).

::

    neuraldb serve --model smollm2 --db facts.safetensors [--host 127.0.0.1 --port 8000 --token T]

Binds to loopback unless ``--host`` says otherwise. Writes need the bearer token (``--token`` or
``$NEURALDB_SERVE_TOKEN``); without either, one is made up and printed at start.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from neuraldb.cli_support import CLIError, _check_model, _non_negative_int, _positive_int, check_output, load_db

__all__ = ["add_parser", "cmd_serve"]


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in [0, 65535], got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``serve`` to the ``neuraldb`` subcommands; ``add_model_args`` adds --model, --dtype, --device, --threads."""
    from neuraldb.serve import TOKEN_ENV

    p = sub.add_parser(
        "serve",
        help="serve an edited model over HTTP (OpenAI-compatible), taking new facts while it runs",
        description="Serve the model patched with --db over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions) with a facts API (/v1/facts, /v1/jobs) that edits facts in while it serves. Needs "
        "FastAPI and uvicorn: pip install 'neuraldb[serve]'.",
    )
    add_model_args(p)
    p.add_argument(
        "--db", type=Path,
        help="database file: served, and every change saved to it before it is acknowledged (created if missing; "
        "without --db, facts live in memory only)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--token", help=f"bearer token that write requests must carry (default: ${TOKEN_ENV}, else a random one)"
    )
    p.add_argument("--protect-reads", action="store_true", help="require the token on every route, reads too")
    p.add_argument("--max-batch", type=_positive_int, default=8, help="requests generated together (default: 8)")
    p.add_argument(
        "--max-body-bytes", type=_positive_int, default=1 << 20, help="largest request body (default: 1 MiB)"
    )
    p.add_argument(
        "--edit-in-place", action="store_true",
        help="edit facts on the served model (pauses generation while editing) instead of on a copy of it (one more "
        "copy of the weights in memory)",
    )  # fmt: skip
    p.add_argument(
        "--no-calibrate", action="store_true",
        help="do not fit the gate (thresholds, subject gate) again after facts are added (as `neuraldb edit --no-calibrate`)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="serve even if the database was built for another model")


def cmd_serve(args: argparse.Namespace) -> int:
    """``neuraldb serve``: load, patch, serve until interrupted."""
    from neuraldb.serve import INSTALL_HINT, TOKEN_ENV, missing_dependencies

    missing = missing_dependencies()
    if missing:
        raise CLIError(f"neuraldb serve needs {' and '.join(missing)}: {INSTALL_HINT}")
    import uvicorn

    from neuraldb.cli_support import load_model_verbose
    from neuraldb.database import NeuralKVDatabase
    from neuraldb.serve.app import ServeSettings, build_app

    if args.db is not None:
        check_output(args.db, replace=True)
    db = load_db(args.db) if args.db is not None and args.db.exists() else None
    model, tok = load_model_verbose(args.model, dtype=args.dtype, device=args.device)
    if db is None:
        db = NeuralKVDatabase.for_model(model)
        if args.db is not None:
            db.save(args.db)  # the file exists from the start, so a restart finds the same (empty) database
    else:
        _check_model(db, model, force=args.force)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None:
        token = secrets.token_urlsafe(18)
        print(f"write token (pass --token or ${TOKEN_ENV} to choose it): {token}", file=sys.stderr, flush=True)
    settings = ServeSettings(
        token=token,
        protect_reads=args.protect_reads,
        model_name=str(args.model),
        max_body_bytes=args.max_body_bytes,
        max_batch=args.max_batch,
        edit_on_copy=not args.edit_in_place,
        calibrate=not args.no_calibrate,
    )
    app = build_app(model, tok, db, db_path=args.db, settings=settings)
    where = str(args.db) if args.db is not None else "memory only (no --db)"
    print(f"{len(db)} facts ({where}); serving on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
