"""Loads the compiled ``neuraldb_kernels._C`` once; without it the package still works on the reference."""

from __future__ import annotations

import warnings
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def load() -> ModuleType | None:
    """The compiled extension, or None (with one warning per process) when it is missing or broken.

    Example::

        >>> ext = load()
        >>> ext is None or callable(ext.gated_retrieval_cpu)
        True
    """
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            from neuraldb_kernels import _C  # type: ignore[attr-defined]

            _module = _C
        except ImportError as exc:
            _error = f"the compiled extension neuraldb_kernels._C could not be imported ({exc})"
            warnings.warn(
                f"{_error}; serving the PyTorch reference. Reinstall with "
                "`pip install --no-build-isolation .` to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
        if _module is not None:
            _configure(_module)
    return _module


def _configure(module: ModuleType) -> None:
    # The C++ kernels read their options from the extension, set here once per configuration (never per call).
    from neuraldb_kernels import config

    config.on_change(lambda cfg: module.set_cpu_options(**cfg.cpu_options()))


def missing_reason() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    load()
    return _error
