"""Warm starts: a new fact's residual begins at the mean residual of the database's facts that share its target.

A residual written at the subject's last token mostly says "the answer to this relation is o*": facts with the same
prompt and target end up with similar residuals whatever their subject. Starting from their mean, a fact reaches
its target in a few steps instead of ``steps`` (``EditConfig.warm_steps``). CounterFact repeats its targets: among
21,919 facts there are 6,298 (prompt, target) pairs and 749 targets, so once a database holds a few thousand facts
nearly every new one finds a start (docs/editing.md, "Warm starts").

The start of a fact is, in order of preference, the mean residual of the rows whose Fact has the same prompt and
target, or the same target; a fact with neither starts from zero and takes the full ``steps``. Only rows already in
the database count, so the result of editing a list of facts depends on the database it is appended to, not on how
the list is batched.

Example::

    >>> bank = ResidualBank.from_database(db)                              # doctest: +SKIP
    >>> init = bank.starts(new_facts)   # (n, d2) float32, NaN rows where no start was found   doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuraldb.facts import Fact

__all__ = ["ResidualBank", "check_init"]


class ResidualBank:
    """Running sums of residuals by (prompt, target) and by target."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._sums: dict[tuple, torch.Tensor] = {}
        self._counts: dict[tuple, int] = {}

    @classmethod
    def from_database(cls, db) -> ResidualBank:
        """The bank of ``db``'s rows whose metadata is a :class:`~neuraldb.facts.Fact`."""
        bank = cls(db.value_dim)
        with db.lock:
            facts = [db.fact(i) for i in db.ids()]
            values = db.values.detach().float().cpu()
        rows = [r for r, f in enumerate(facts) if isinstance(f, Fact)]
        if rows:
            bank.add([facts[r] for r in rows], values[torch.tensor(rows)])
        return bank

    def __len__(self) -> int:
        return sum(n for k, n in self._counts.items() if k[0] == "pt")

    def add(self, facts: Sequence[Fact], residuals: torch.Tensor) -> None:
        """Add one residual row per fact."""
        if residuals.shape != (len(facts), self.width):
            raise ValueError(f"residuals must be ({len(facts)}, {self.width}), got {tuple(residuals.shape)}")
        for f, r in zip(facts, residuals.detach().float().cpu()):
            for key in (("pt", f.prompt, f.target_new), ("t", f.target_new)):
                if key in self._sums:
                    self._sums[key] += r
                    self._counts[key] += 1
                else:
                    self._sums[key] = r.clone()
                    self._counts[key] = 1

    def starts(self, facts: Sequence[Fact]) -> torch.Tensor:
        """(len(facts), width) float32: each fact's start, a row of NaN where the bank has none."""
        out = torch.full((len(facts), self.width), float("nan"))
        for i, f in enumerate(facts):
            for key in (("pt", f.prompt, f.target_new), ("t", f.target_new)):
                if key in self._sums:
                    out[i] = self._sums[key] / self._counts[key]
                    break
        return out


def check_init(init: torch.Tensor | None, n: int, width: int) -> None:
    """A ValueError unless ``init`` is None or an ``(n, width)`` tensor of starts."""
    if init is not None and (not isinstance(init, torch.Tensor) or tuple(init.shape) != (n, width)):
        got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(f"init must be (number of facts, d2) = ({n}, {width}), got {got}")
