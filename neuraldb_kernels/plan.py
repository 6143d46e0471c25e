"""When a call takes the exact key sketches, and the eager CPU plan a database binds once per state.

A database (:class:`neuraldb.NeuralKVDatabase`) owns its keys, values and their sketches (``build_sketch``,
``build_signs``, kept in step with every change); this module owns the rule that decides which of them a call reads
(:class:`PrefilterPolicy`) and the one object its patched eager forward calls (:class:`RetrievalPlan`). The database
calls, per forward::

    policy.wants_sketch(backend, m, rows, gamma)   # build the sketches first (once) when this is True
    plan = plan_retrieval(keys, values, gamma, sketch=..., signs=..., policy=policy)   # once per database state
    plan.residuals(queries)                        # eager CPU calls: one call into C++, None where no gate opens
    retrieve_residuals(queries, keys, values, gamma, backend, sketch=..., signs=..., policy=policy)   # any other call
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuraldb_kernels.backends import prefiltered_on_triton
from neuraldb_kernels.op import bind_cpu_residuals, gated_retrieval_unchecked
from neuraldb_kernels.reference import apply_row_thresholds

# The backends other than "cpu" that run a cascade ("triton", "cuda") serve CUDA tensors (and CPU ones only under
# the Triton interpreter, in tests).
_CUDA = torch.device("cuda")


@dataclass(frozen=True)
class PrefilterPolicy:
    """Which calls scan the exact key sketches instead of every key (the output is bitwise the same either way).

    The C++ CPU kernel runs the sketch stages, and with ``gpu`` the Triton cascade on CUDA tensors ("triton" and
    "cuda" backends; :mod:`neuraldb_kernels.triton_cascade`); the defaults were measured on a 2-core AVX-512 CPU
    (Zen 4), 1 thread, d1 = 1536 (docs/overhead.md):

    * ``min_keys``, ``max_rows``: the int4 sketch scan wins for one query row from ~500 keys (0.12 -> 0.09 ms;
      10k: 1.2 -> 0.54 ms) and breaks even at two rows, since it scores each row separately while the exact scan
      shares every key load across rows.
    * ``signs``: the 1-bit first stage in front of the int4 sketch (one row, 10k / 100k keys: 0.62 / 3.6 ms of CPU
      against 1.03 / 8.2 for the int4 sketch alone).
    * ``signs_min_gamma``: its bound cannot go below ~||k - a s - v_J|| (~0.55 of a unit key at d1 = 1536, random or
      real SmolLM2 keys), so at a lower gamma it passes most keys and costs more than the int4 stage alone (gamma
      0.5, 10k random keys: 99% pass, 1.13 ms against 0.66).
    * ``signs_max_rows``: rows up to which the cascade still beats the exact scan, sharing each key's sign row across
      the rows (gamma 0.65, 10k / 100k keys: 8 rows 3.7 / 26.6 ms against 4.7 / 37.3 for the exact scan).
    * ``gpu``: off until the GPU cascade is measured against the plain scan (docs/gpu.md); on, CUDA calls follow
      the same thresholds.

    Example::

        >>> p = PrefilterPolicy()
        >>> p.wants_sketch("cpu", 10_000, 1, 0.65), p.uses_signs(0.65), p.max_rows_at(0.65), p.max_rows_at(0.5)
        (True, True, 8, 1)
        >>> p.wants_sketch("triton", 10_000, 1, 0.65)
        False
    """

    min_keys: int = 1000
    max_rows: int = 1
    signs: bool = True
    signs_min_gamma: float = 0.6
    signs_max_rows: int = 8
    gpu: bool = False

    def uses_signs(self, gamma: float) -> bool:
        """Whether calls at ``gamma`` run the 1-bit stage in front of the int4 one."""
        return self.signs and gamma >= self.signs_min_gamma

    def max_rows_at(self, gamma: float) -> int:
        """Query rows up to which a call at ``gamma`` takes the sketches: more with the 1-bit stage in front."""
        return max(self.max_rows, self.signs_max_rows if self.uses_signs(gamma) else 0)

    def wants_sketch(self, backend: str, keys: int, rows: int, gamma: float) -> bool:
        """Whether a call of ``rows`` query rows on ``keys`` keys, served by ``backend``, takes the sketches."""
        if backend != "cpu" and not (self.gpu and prefiltered_on_triton(backend, _CUDA)):
            return False
        return keys >= self.min_keys and rows <= self.max_rows_at(gamma)


DEFAULT_POLICY = PrefilterPolicy()


@dataclass(frozen=True)
class RetrievalPlan:
    """The eager CPU fast path of one database state: the C++ kernel with the keys, values, gamma and the sketch
    choice bound, so that a patched decode step makes one call into C++ and no other Python step.

    ``residuals(queries)`` takes queries ``(..., d1)`` (fp32/fp16/bf16 CPU tensors, not requiring grad, outside every
    tracer: check :func:`neuraldb_kernels.op.runs_eagerly`) and returns the gated residuals ``(..., d2)`` in their
    dtype, or None where no row's gate opens. Calls of at most ``sketch_max_rows`` rows read the sketches (when
    bound). A plan stays valid while the tensors it holds are the database's current ones: build a new one after
    every write. The kernel configuration (:mod:`neuraldb_kernels.config`) is read by each call, not bound.

    Calls through the plan skip the custom op's dispatch, which costs 10-20 us a call on a CPU: more than a
    decode-size kernel.
    """

    keys: torch.Tensor
    values: torch.Tensor
    gamma: float
    sketch: torch.Tensor | None
    signs: torch.Tensor | None
    sketch_max_rows: int
    residuals: Callable[[torch.Tensor], torch.Tensor | None]
    thresholds: torch.Tensor | None = None


def plan_retrieval(
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    *,
    sketch: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
    policy: PrefilterPolicy = DEFAULT_POLICY,
    thresholds: torch.Tensor | None = None,
) -> RetrievalPlan:
    """The :class:`RetrievalPlan` of CPU ``keys`` ``(m, d1)``, ``values`` ``(m, d2)`` (unit-stride rows) and a float
    ``gamma`` in [-1, 1]; ``sketch``/``signs`` (``build_sketch``/``build_signs`` of the keys, or None) are bound where
    ``policy`` lets calls use them; ``thresholds`` (per-row gate thresholds, as for
    :func:`neuraldb_kernels.gated_retrieval`) are enforced on the rows whose gate opens. Needs the compiled extension
    (RuntimeError otherwise).

    Example::

        >>> import neuraldb_kernels
        >>> keys = torch.nn.functional.normalize(torch.randn(2000, 64), dim=1).half()
        >>> sketch, signs = neuraldb_kernels.build_sketch(keys), neuraldb_kernels.build_signs(keys)
        >>> plan = plan_retrieval(keys, torch.randn(2000, 8), 0.65, sketch=sketch, signs=signs)
        >>> plan.sketch_max_rows, plan.residuals(keys[7:8].float()).shape, plan.residuals(torch.randn(1, 64))
        (8, torch.Size([1, 8]), None)
    """
    use = sketch is not None and keys.shape[0] >= policy.min_keys
    sketch = sketch if use else None
    signs = signs if use and policy.uses_signs(gamma) else None
    max_rows = policy.max_rows_at(gamma) if use else 0
    fn = bind_cpu_residuals(keys, values, gamma, sketch, signs, max_rows, thresholds)
    return RetrievalPlan(keys, values, gamma, sketch, signs, max_rows, fn, thresholds)


def retrieve_residuals(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    backend: str,
    *,
    sketch: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
    policy: PrefilterPolicy = DEFAULT_POLICY,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gated residuals of 2-D ``queries`` ``(T, d1)`` on any device, under any tracer: the pre-filtered op where
    ``policy`` wants the sketches for this call (and ``sketch`` is given), else the plain op. Arguments are unchecked
    as for :func:`neuraldb_kernels.op.gated_retrieval_unchecked`; ``backend`` comes from
    :func:`neuraldb_kernels.backends.resolve`; ``thresholds`` as for :func:`neuraldb_kernels.gated_retrieval`.

    Example::

        >>> keys = torch.nn.functional.normalize(torch.randn(50, 16), dim=1).half()
        >>> retrieve_residuals(keys[:2].float(), keys, torch.eye(50)[:, :3], 0.5, "torch").shape
        torch.Size([2, 3])
    """
    if sketch is not None and policy.wants_sketch(backend, keys.shape[0], queries.shape[0], gamma):
        signs = signs if policy.uses_signs(gamma) else None
        out, idx, score = gated_retrieval_unchecked(queries, keys, values, gamma, backend, sketch, signs)
    else:
        out, idx, score = gated_retrieval_unchecked(queries, keys, values, gamma, backend)
    return out if thresholds is None else apply_row_thresholds(out, idx, score, thresholds)
