"""``neuraldb serve``: an edited model behind an OpenAI-compatible HTTP server whose facts change while it runs.

Modules: ``app`` (the routes and :func:`~neuraldb.serve.app.build_app`), ``schemas`` (request bodies),
``generation`` (the batching worker), ``store`` (the durable facts and the edit worker), ``command`` (the CLI).
FastAPI and uvicorn are an optional extra (``pip install 'neuraldb[serve]'``); this package imports without them,
and only ``app`` and ``schemas`` need them.

Example::

    >>> from neuraldb.serve import build_app, ServeSettings                          # doctest: +SKIP
    >>> model, tok = neuraldb.load_model("smollm2")                                    # doctest: +SKIP
    >>> db = neuraldb.NeuralKVDatabase.for_model(model)                                # doctest: +SKIP
    >>> app = build_app(model, tok, db, db_path="facts.safetensors",
    ...                 settings=ServeSettings(token="secret"))                        # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from neuraldb.serve.threaded import serving

__all__ = ["INSTALL_HINT", "TOKEN_ENV", "ServeSettings", "build_app", "missing_dependencies", "serving"]

TOKEN_ENV = "NEURALDB_SERVE_TOKEN"

INSTALL_HINT = "pip install 'neuraldb[serve]' (or: pip install fastapi uvicorn)"


def missing_dependencies() -> list[str]:
    """The packages ``neuraldb serve`` needs that are not installed (empty when it can run)."""
    import importlib

    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(name)  # an import, not find_spec: a package that is present but broken is missing
        except ImportError:
            missing.append(name)
    return missing


def __getattr__(name: str) -> Any:
    # build_app and ServeSettings import FastAPI: only when asked for
    if name in ("build_app", "ServeSettings"):
        from neuraldb.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'neuraldb.serve' has no attribute {name!r}")
