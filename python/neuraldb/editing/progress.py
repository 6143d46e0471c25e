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
    """A tqdm bar over facts (None when tqdm is not importable). tqdm's own time-left field is left out: it extrapolates
    from facts finished, and facts finish in bunches at the end of their batch's steps; :class:`EditProgress` shows a
    time left from the optimisation steps instead."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
    return tqdm(total=total, initial=initial, desc=desc, unit="fact", dynamic_ncols=True, bar_format=fmt)


class EditProgress:
    """Reports one editing call's progress to whatever ``spec`` asks for (see :data:`ProgressSpec`).

    The time left it shows is an upper bound: every fact still optimising is assumed to need all its steps (a fact
    stops early once its loss is below ``stop_loss``), at the rate in fact-steps per second measured so far.
    """

    def __init__(self, spec: ProgressSpec, total: int, desc: str) -> None:
        self._own = spec is True
        self._bar = fact_bar(total, desc=desc) if self._own else (spec if hasattr(spec, "update") else None)
        self._callback = spec if (callable(spec) and self._bar is None and spec is not True) else None
        self._last_refresh = 0.0
        self._total = total
        self._done = 0
        self._start = time.monotonic()
        self._fact_steps = 0
        self._in_batch = 0

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
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(n)

    def step(self, label: str, steps: int, batch_facts: int, step: int, finished: int) -> None:
        """Optimisation step ``step`` of ``steps`` of batch ``label`` (``batch_facts`` facts) is done, and
        ``finished`` facts stopped on it (:func:`neuraldb.editing.engine.optimise`'s ``on_step`` once the first
        three are bound)."""
        if step == 1:
            self._in_batch = batch_facts
        self._fact_steps += self._in_batch
        self._in_batch -= finished
        self.finished(finished)
        text = f"{label} step {step}/{steps}"
        left = self._seconds_left(steps, step)
        if left is not None:
            from tqdm import tqdm

            text += f", \u2264{tqdm.format_interval(left)} left"
        self.status(text)

    def _seconds_left(self, steps: int, step: int) -> float | None:
        elapsed = time.monotonic() - self._start
        if self._bar is None or elapsed <= 0 or not self._fact_steps:
            return None
        # a caller's bar may span several calls (edit_checkpointed): its own count says how many facts are left
        total, n = getattr(self._bar, "total", None), getattr(self._bar, "n", None)
        facts_left = total - n if isinstance(total, int) and isinstance(n, (int, float)) else self._total - self._done
        work_left = self._in_batch * (steps - step) + max(0, facts_left - self._in_batch) * steps
        return work_left * elapsed / self._fact_steps

    def close(self) -> None:
        if self._own and self._bar is not None:
            self._bar.close()
