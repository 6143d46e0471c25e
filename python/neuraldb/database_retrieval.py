"""The read path of :class:`neuraldb.NeuralKVDatabase`: ``retrieve``, ``retrieve_residuals`` and the patch's bound CPU
plan, with the rule for when a decode call takes the exact key sketches (the 1-bit + int4 cascade, or the int4 stage
alone) instead of the plain scan. A base class of the database, which holds the storage these methods read
(``_lock``, ``_n``, ``_prefilter``, ``_views``, ``_live_views``, ``_ensure_sketch``); it has no use on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuraldb_kernels.backends import resolve
from neuraldb_kernels.op import bind_cpu_residuals, gated_retrieval_unchecked
from neuraldb_kernels.validation import check_gamma, check_queries


class PrefilteredRetrieval:
    """Retrieval for :class:`neuraldb.NeuralKVDatabase` (see there). The ``PREFILTER_*`` settings are class
    attributes a database may override per instance."""

    # Measured on a 2-core AVX-512 CPU, 1 thread, d1 = 1536 (docs/overhead.md): the sketch scan wins for one query
    # row from ~500 keys (0.12 -> 0.09 ms; 10k: 1.2 -> 0.54 ms) and breaks even at two rows, since it scores each
    # row separately while the exact scan shares every key load across rows.
    PREFILTER_MIN_KEYS = 1000
    PREFILTER_MAX_ROWS = 1
    # The 1-bit first stage in front of the int4 sketch (docs/overhead.md: one query row at d1 = 1536, 10k / 100k
    # keys: 0.62 / 3.6 ms of CPU against 1.03 / 8.2 for the int4 sketch alone).
    PREFILTER_SIGNS = True
    # Its bound cannot go below ~||k - a s - v_J|| (~0.55 of a unit key at d1 = 1536, random or real SmolLM2 keys),
    # so at a lower gamma it passes most keys and costs more than the int4 stage alone (gamma 0.5, 10k random keys:
    # 99% pass, 1.13 ms against 0.66).
    PREFILTER_SIGNS_MIN_GAMMA = 0.6
    # Query rows up to which the cascade (1-bit stage in front) still beats the exact scan: its scan shares each
    # key's sign row across the rows (gamma 0.65, d1 = 1536, 1 thread, random queries; 10k / 100k keys: 8 rows
    # 3.7 / 26.6 ms against 4.7 / 37.3 for the exact scan; 2 rows 1.0 / 5.9 against 2.3 / 20.8).
    PREFILTER_SIGNS_MAX_ROWS = 8

    def retrieve(
        self, queries: torch.Tensor, gamma: float, *, backend: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``gated_retrieval(queries, keys, values, gamma)`` on this database, under its lock: ``(out, idx, score)``.

        This is the one method :func:`neuraldb.patch_model` calls per forward; any object with the same method
        and attributes (e.g. :class:`neuraldb.ShardedNeuralKVDatabase`) can be patched in.
        """
        from neuraldb_kernels import gated_retrieval

        with self._lock:
            return gated_retrieval(queries, self.keys, self.values, gamma, backend=backend)

    def retrieve_residuals(self, queries: torch.Tensor, gamma: float, *, backend: str | None = None) -> torch.Tensor:
        """``retrieve(queries, gamma)[0]``, the gated residuals alone: what a patched forward adds.

        When the C++ CPU kernel serves the call, the database holds at least ``PREFILTER_MIN_KEYS`` keys and the
        queries have at most ``PREFILTER_MAX_ROWS`` rows (decode; ``PREFILTER_SIGNS_MAX_ROWS`` where the 1-bit stage
        below applies), it scans the keys' int4 sketch and rescores only
        the keys that can pass the gate (:func:`neuraldb_kernels.gated_retrieval_prefiltered`): the result is
        bitwise the same. With ``PREFILTER_SIGNS`` (default) and ``gamma >= PREFILTER_SIGNS_MIN_GAMMA`` a 1-bit
        stage runs first and only its survivors' int4 rows are read (~10% of the key bytes per step); otherwise the
        int4 sketch of every key (~27%). The first
        such call builds both sketches (one pass over the keys, under the lock). ``db.prefilter = False`` turns
        that off.
        """
        check_queries(queries, self.key_dim, self.device)
        rows = queries.numel() // self.key_dim if self.key_dim else 0
        return self._residuals(queries, check_gamma(gamma), resolve(backend, queries.device, rows))

    def _residuals(self, queries: torch.Tensor, gamma: float, backend: str) -> torch.Tensor:
        """:meth:`retrieve_residuals` on checked arguments: queries ``(..., key_dim)`` of a query dtype on this
        database's device, a float gamma and a resolved backend name. The patch calls it once per forward: the
        database's own tensors are consistent by construction and go to the kernel unchecked, because on a decode
        step this host time is much of what the patch adds (it runs with caches cold from the model's weights)."""
        q2 = queries if queries.dim() == 2 else queries.reshape(-1, self.key_dim)
        with self._lock:
            if (
                self._prefilter
                and backend == "cpu"
                and self._n >= self.PREFILTER_MIN_KEYS
                and q2.shape[0] <= self._prefilter_max_rows(gamma)
            ):
                self._ensure_sketch()
                keys, values, sketch, signs = self._live_views()
                signs = signs if self._use_signs(gamma) else None
                out = gated_retrieval_unchecked(q2, keys, values, gamma, backend, sketch, signs)[0]
            else:
                keys, values, _, _ = self._live_views()
                out = gated_retrieval_unchecked(q2, keys, values, gamma, backend)[0]
        return out if queries.dim() == 2 else out.view(*queries.shape[:-1], self.value_dim)

    def _cpu_residuals_plan(self, gamma: float, rows: int) -> tuple[tuple, Callable] | None:
        """``(token, fn)`` for a patched eager forward on the C++ CPU kernel (call with the lock held): ``fn(queries)``
        is :meth:`_residuals` with this state's tensors and pre-filter choice bound, returning None where no gate
        opens (:func:`neuraldb_kernels.op.bind_cpu_residuals`). It stays valid while ``self._views is token``: every
        write that changes the rows or the buffers replaces ``_views``. The ``PREFILTER_*`` settings are read here,
        so a change to them reaches a patched model at its next write (the output is the same either way). None
        while this state wants a sketch that is not built and a call of ``rows`` rows would not build it."""
        keys, values, sketch, signs = self._live_views()
        use = self._prefilter and self._n >= self.PREFILTER_MIN_KEYS
        max_rows = self._prefilter_max_rows(gamma)
        if use and sketch is None:
            if rows > max_rows:
                return None
            self._ensure_sketch()
            keys, values, sketch, signs = self._live_views()
        use_signs = use and self._use_signs(gamma)
        fn = bind_cpu_residuals(keys, values, gamma, sketch if use else None, signs if use_signs else None, max_rows)
        return self._views, fn

    def _use_signs(self, gamma: float) -> bool:
        return self.PREFILTER_SIGNS and gamma >= self.PREFILTER_SIGNS_MIN_GAMMA

    def _prefilter_max_rows(self, gamma: float) -> int:
        """Query rows up to which a call at ``gamma`` takes the pre-filter: more with the 1-bit stage in front."""
        return max(self.PREFILTER_MAX_ROWS, self.PREFILTER_SIGNS_MAX_ROWS if self._use_signs(gamma) else 0)
