"""Editing progress: facts finished (as each one stops optimising, not per batch), the batch's optimisation step,
and tqdm's rate and ETA, on one bar whose unit is ``fact``.

Facts are optimised in batches of ``batch_size`` (32 by default); a bar that moved per batch sat at 0/N for the
whole first batch. The optimisation reports every step (:func:`neuraldb.editing.engine.optimise`'s ``on_step``), so
the bar advances as facts reach their stopping loss and its postfix counts steps in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["EditProgress", "ProgressSpec", "fact_bar"]


class _Bar(Protocol):
    def update(self, n: int) -> Any: ...


# True: a bar of its own; False/None: silent; a callable: told how many facts just finished; an object with
# ``update`` (a tqdm bar): advanced in place, its postfix showing the step, left open for its owner.
ProgressSpec = bool | None | Callable[[int], Any] | _Bar


def fact_bar(total: int, *, desc: str = "editing", initial: int = 0):
    """A tqdm bar over facts (None when tqdm is not importable)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="fact", dynamic_ncols=True)


class EditProgress:
    """Reports one editing call's progress to whatever ``spec`` asks for (see :data:`ProgressSpec`)."""

    def __init__(self, spec: ProgressSpec, total: int, desc: str) -> None:
        self._own = spec is True
        self._bar = fact_bar(total, desc=desc) if self._own else (spec if hasattr(spec, "update") else None)
        self._callback = spec if (callable(spec) and self._bar is None and spec is not True) else None
        self._last_refresh = 0.0

    def status(self, text: str) -> None:
        """Show ``text`` (e.g. the batch and step) beside the count, at most a few times a second: on a GPU a step
        takes milliseconds, and redrawing every one would cost more than the step."""
        if self._bar is None or not hasattr(self._bar, "set_postfix_str"):
            return
        now = time.monotonic()
        force = now - self._last_refresh >= 0.2
        self._bar.set_postfix_str(text, refresh=force)
        if force:
            self._last_refresh = now

    def finished(self, n: int) -> None:
        """``n`` more facts are done."""
        if n <= 0:
            return
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(n)

    def step(self, label: str, steps: int, step: int, finished: int) -> None:
        """Optimisation step ``step`` of ``steps`` of batch ``label`` is done, and ``finished`` facts stopped on it
        (the shape of :func:`neuraldb.editing.engine.optimise`'s ``on_step`` once ``label`` and ``steps`` are
        bound)."""
        self.status(f"{label} step {step}/{steps}")
        self.finished(finished)

    def close(self) -> None:
        if self._own and self._bar is not None:
            self._bar.close()
