"""The read path of :class:`~neuraldb.NeuralKVDatabase`, as a base class: the gate's settings (per-row thresholds,
relation keys and the relation gate), retrieval (plain, residuals only, the eager CPU plan) with them applied on the
way out, and the dtype check a patch makes.

It works on the database's storage, lock, policy and metadata and holds no state of its own; the database inherits
it so that its public surface stays one object.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from neuraldb.database_inputs import check_ids, check_row_thresholds, dtype_name
from neuraldb.relation_gate import check_relation_gate, confirm
from neuraldb_kernels import (
    RetrievalPlan,
    check_gamma,
    check_queries,
    gated_retrieval,
    plan_retrieval,
    resolve,
    retrieve_residuals,
)


class DatabaseRetrieval:
    """The retrieval methods of :class:`~neuraldb.NeuralKVDatabase` and its gate settings (see there)."""

    @property
    def thresholds(self) -> torch.Tensor:
        """A copy of the rows' gate thresholds, float32 ``(n,)`` in row order (-1: the row has none of its own)."""
        with self._lock:
            return self._storage.thresholds.clone()

    @property
    def relation_keys(self) -> torch.Tensor | None:
        """A copy of the rows' relation keys ``(n, key_dim)`` in row order (zero rows: none), or None when no row has
        one."""
        with self._lock:
            r = self._storage.relation_keys
            return None if r is None else r.clone()

    @property
    def relation_gate(self) -> dict | None:
        """``{"rho": float, "window": int}`` when retrieval checks the rows' relation keys (see
        :mod:`neuraldb.relation_gate`), else None. Kept in :attr:`config`, so files and copies keep it."""
        return self.config.get("relation_gate")

    @relation_gate.setter
    def relation_gate(self, value: dict | None) -> None:
        checked = check_relation_gate(value)
        with self._lock:
            self.config = {k: v for k, v in self.config.items() if k != "relation_gate"}
            if checked is not None:
                self.config["relation_gate"] = checked
            self._storage.changed()

    def set_thresholds(self, ids: int | Iterable[int], thresholds: float | Sequence[float] | torch.Tensor) -> None:
        """Give rows ``ids`` their own gate thresholds (one number for all, or one per id; each in [-1, 1], -1 to
        remove a row's threshold). A row's residual is then retrieved only where the best key's cosine exceeds both
        gamma and its threshold. KeyError for unknown ids, TypeError/ValueError for bad thresholds; nothing changes
        on error.

        Example::

            >>> db = NeuralKVDatabase(4, 2); ids = db.add(torch.eye(4)[:2], torch.ones(2, 2))
            >>> db.set_thresholds(ids[1], 0.9); db.thresholds.tolist()
            [-1.0, 0.8999999761581543]
        """
        id_list = check_ids(ids)
        t = check_row_thresholds(thresholds, len(id_list))
        with self._lock:
            self._check_known(id_list)
            if id_list:
                self._storage.write_at([self._rows[i] for i in id_list], None, None, t)
                self._version += 1

    def check_values_fit(self, dtype: torch.dtype) -> None:
        """ValueError unless every residual is finite in ``dtype`` (a patched model's dtype): a residual beyond its
        range would turn the patched layer's output, then the logits, into inf. Free when the storage dtype's range
        fits in ``dtype``'s (fp16 storage, or any storage into a bf16/fp32 model); otherwise one scan of the values."""
        if not dtype.is_floating_point or torch.finfo(self.dtype).max <= torch.finfo(dtype).max:
            return
        with self._lock:
            rows, top = self._storage.overflowing_rows(dtype)
            if rows:
                ids = [self._row_ids[r] for r in rows[:5]]
                raise ValueError(
                    f"db holds residuals up to {top:g} in magnitude (ids {ids}), beyond {dtype_name(dtype)}'s "
                    f"largest value {torch.finfo(dtype).max:g}: the patched {dtype_name(dtype)} model would compute "
                    "inf. Scale those residuals down, or run the model in bfloat16 or float32"
                )

    # -- retrieval --------------------------------------------------------------------------------------------

    def retrieve(
        self, queries: torch.Tensor, gamma: float, *, backend: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``gated_retrieval(queries, keys, values, gamma)`` on this database, under its lock: ``(out, idx, score)``.

        This is the one method :func:`neuraldb.patch_model` needs of a database; any object with the same method
        and attributes (e.g. :class:`neuraldb.ShardedNeuralKVDatabase`) can be patched in.
        """
        with self._lock:
            views = self._storage.views()
            out, idx, score = gated_retrieval(
                queries, views.keys, views.values, gamma, backend=backend, thresholds=views.thresholds
            )
            return self._relation_checked(queries, out, idx, views.relation_keys), idx, score

    def _relation_checked(
        self, queries: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, relation_keys: torch.Tensor | None
    ) -> torch.Tensor:
        gate = self.relation_gate
        if gate is None or relation_keys is None:
            return out
        return confirm(
            queries, out, idx, relation_keys, rho=gate["rho"], window=gate["window"], offset=gate.get("offset", 0)
        )

    def retrieve_residuals(self, queries: torch.Tensor, gamma: float, *, backend: str | None = None) -> torch.Tensor:
        """``retrieve(queries, gamma)[0]``, the gated residuals alone: what a patched forward adds.

        Where ``prefilter_policy`` sends the call to the key sketches (the C++ CPU kernel, or the Triton cascade on
        CUDA where the policy's ``gpu`` is set; enough keys, few query rows: decode), it scans them and rescores only
        the keys that can pass the gate
        (:func:`neuraldb_kernels.gated_retrieval_prefiltered`): the result is bitwise the same. The first such call
        builds both sketches (one pass over the keys, under the lock). ``db.prefilter = False`` turns that off.
        """
        check_queries(queries, self.key_dim, self.device)
        rows = queries.numel() // self.key_dim if self.key_dim else 0
        return self.gated_residuals(queries, check_gamma(gamma), resolve(backend, queries.device, rows))

    def gated_residuals(self, queries: torch.Tensor, gamma: float, backend: str) -> torch.Tensor:
        """:meth:`retrieve_residuals` on checked arguments: queries ``(..., key_dim)`` of a query dtype on this
        database's device, a float gamma and a backend resolved by :func:`neuraldb_kernels.resolve`. The patch calls
        it on every forward that has no eager plan (:meth:`eager_plan`): on a decode step the checks' host time
        (caches cold from the model's weights) would be much of what the patch adds."""
        q2 = queries if queries.dim() == 2 else queries.reshape(-1, self.key_dim)
        storage, policy = self._storage, self._policy
        with self._lock:
            if self._prefilter and policy.wants_sketch(backend, storage.n, q2.shape[0], gamma):
                storage.ensure_sketch()
            _, keys, values, sketch, signs, thresholds, relations = storage.views()
            if relations is not None and self.relation_gate is not None:
                # The check needs each opened position's row: the plain op, then the check on the sequences.
                out, idx, _ = gated_retrieval(q2, keys, values, gamma, backend=backend, thresholds=thresholds)
                shaped = out.view(*queries.shape[:-1], self.value_dim)
                return self._relation_checked(queries, shaped, idx.view(queries.shape[:-1]), relations)
            if not self._prefilter:
                sketch = None
            out = retrieve_residuals(
                q2, keys, values, gamma, backend, sketch=sketch, signs=signs, policy=policy, thresholds=thresholds
            )
        return out if queries.dim() == 2 else out.view(*queries.shape[:-1], self.value_dim)

    def eager_plan(self, gamma: float, rows: int) -> tuple[object, RetrievalPlan] | None:
        """``(token, plan)``: the :class:`neuraldb_kernels.RetrievalPlan` of this state for a patched eager forward on
        the C++ CPU kernel (call with the lock held). ``plan.residuals(queries)`` is :meth:`gated_residuals` with
        this state's tensors and sketch choice bound, returning None where no gate opens; it stays valid while
        ``self.state_token() is token`` (every write that changes the rows, the buffers or the policy replaces it).
        None while the policy wants a sketch that is not built and a call of ``rows`` rows would not build it."""
        storage, policy = self._storage, self._policy
        gate = self.relation_gate if storage.relation_buf is not None else None
        if gate is not None and gate.get("offset", 0) + gate["window"] >= 0:
            return None  # the relation check runs on the retrieval's rows and positions: gated_residuals does it
        use = self._prefilter and storage.n >= policy.min_keys
        if use and storage.sketch_buf is None:
            if rows > policy.max_rows_at(gamma):
                return None
            storage.ensure_sketch()
        views = storage.views()
        _, keys, values, sketch, signs, thresholds, _ = views
        if not use:
            sketch = signs = None
        plan = plan_retrieval(keys, values, gamma, sketch=sketch, signs=signs, policy=policy, thresholds=thresholds)
        if gate is not None:  # a gate that only looks back (the subject gate)
            plan = _DecodePlan(plan, lambda q: self.gated_residuals(q, gamma, "cpu"))
        return views, plan

    def state_token(self) -> object:
        """An object that stays the same (``is``) while the rows, buffers and policy do: what :meth:`eager_plan`'s
        token is compared with (call with the lock held)."""
        return self._storage.cached_views


class _DecodePlan:
    """A plan for a database whose gate only looks back: a forward of one position per sequence (a decode step,
    queries ``(batch, 1, d1)``) has nothing before it to check, so it takes the plan; longer forwards the checked
    path."""

    def __init__(self, plan: RetrievalPlan, checked) -> None:
        self.plan, self.checked = plan, checked

    def residuals(self, queries: torch.Tensor) -> torch.Tensor | None:
        if queries.dim() == 3 and queries.shape[1] == 1:
            return self.plan.residuals(queries)
        return self.checked(queries)


__all__ = ["DatabaseRetrieval"]
