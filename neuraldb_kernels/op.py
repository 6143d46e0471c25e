"""``torch.ops.neuraldb.gated_retrieval`` and ``torch.ops.neuraldb.gated_retrieval_prefiltered``: declared once.

As bitsandbytes declares its ops: each schema once with :mod:`torch.library`, a fake kernel that makes it traceable,
and kernels registered per device. The schemas carry no backend: on "cpu" the C++ kernel serves (the reference where
the extension is missing), on "cuda" Triton or the CUDA kernel, and on every other device the op's default, the
PyTorch backend. A backend forced for tests or benchmarks comes from :mod:`neuraldb_kernels.config`
(``override(backend=...)``), which the registered kernels read when they run.

Eager calls (outside every tracer, no input requiring grad) skip the dispatcher and run the kernel itself: the
dispatch costs 10-20 us a call on a CPU, more than a decode-size kernel. :func:`gated_retrieval` and
:func:`gated_retrieval_prefiltered` are the public entry points that validate, flatten leading dims and pick the
backend; :mod:`neuraldb_kernels.plan` binds a database's tensors for its patched forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuraldb_kernels import backends, extension
from neuraldb_kernels.prefilter import check_signs, check_sketch, gated_retrieval_prefiltered_reference
from neuraldb_kernels.reference import apply_row_thresholds, gated_retrieval_torch
from neuraldb_kernels.validation import check_inputs, check_thresholds

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Device types with kernels of their own; the ops' defaults serve the rest.
DEVICE_TYPES = ("cpu", "cuda")


def _empty_outputs(queries: torch.Tensor, values: torch.Tensor) -> Outputs:
    t = queries.shape[0]
    return (
        queries.new_empty((t, values.shape[1])),
        queries.new_empty((t,), dtype=torch.int64),
        queries.new_empty((t,), dtype=torch.float32),
    )


# ---- neuraldb::gated_retrieval ----------------------------------------------------------------------------------
@torch.library.custom_op("neuraldb::gated_retrieval", mutates_args=())
def _gated_retrieval_op(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float) -> Outputs:
    # The default kernel, for devices without one of their own (the fp32 PyTorch backend there).
    return gated_retrieval_torch(queries, keys, values, gamma)


def _device_kernel(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float) -> Outputs:
    # Picked when the op runs, not when it was traced: by the device, the row count ("auto" sends single rows on
    # CUDA to the CUDA kernel) and the configured backend.
    name = backends.resolve(None, queries.device, queries.shape[0])
    return backends.kernel(name)(queries, keys, values, gamma)


_gated_retrieval_op.register_fake(lambda queries, keys, values, gamma: _empty_outputs(queries, values))
for _device in DEVICE_TYPES:
    _gated_retrieval_op.register_kernel(_device)(_device_kernel)


# ---- neuraldb::gated_retrieval_prefiltered ------------------------------------------------------------------------
def _prefiltered_kernel(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    sketch: torch.Tensor,
    signs: torch.Tensor | None,
    backend: str,
) -> Outputs:
    # "cpu" runs the C++ kernel, "triton" the Triton cascade, and so does "cuda" (the CUDA extension has no cascade
    # yet: Triton is the device's other kernel); the rest the PyTorch reference of the pre-filter.
    if backend == "cpu":
        ext = extension.load()
        assert ext is not None
        return ext.gated_retrieval_prefiltered_cpu(queries, keys, values, gamma, sketch, signs)
    if backends.prefiltered_on_triton(backend, queries.device):
        return backends.prefiltered_triton_kernel()(queries, keys, values, gamma, sketch, signs)
    return gated_retrieval_prefiltered_reference(queries, keys, values, gamma, sketch, signs)


@torch.library.custom_op("neuraldb::gated_retrieval_prefiltered", mutates_args=())
def _gated_retrieval_prefiltered_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    sketch: torch.Tensor,
    signs: torch.Tensor | None,
) -> Outputs:
    return gated_retrieval_prefiltered_reference(queries, keys, values, gamma, sketch, signs)


def _prefiltered_device_kernel(queries, keys, values, gamma, sketch, signs):
    name = backends.resolve(None, queries.device, queries.shape[0])
    return _prefiltered_kernel(queries, keys, values, gamma, sketch, signs, name)


for _device in DEVICE_TYPES:
    _gated_retrieval_prefiltered_op.register_kernel(_device)(_prefiltered_device_kernel)


_gated_retrieval_prefiltered_op.register_fake(
    lambda queries, keys, values, gamma, sketch, signs: _empty_outputs(queries, values)
)


# ---- the eager bypass -------------------------------------------------------------------------------------------
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def runs_eagerly(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensors runs outside every tracer and transform (torch.compile, export, make_fx,
    torch.func, fake or meta tensors).

    Only tracers need the custom ops: an eager call that skips their dispatch saves 10-20 us a call on a CPU, more
    than a decode-size kernel itself, and on a GPU that host time is what a launch-bound decode step adds. A plain
    loop and module-level names: inside a model's forward this runs with cold caches, where a generator expression
    and attribute lookups cost tens of microseconds.

    Example::

        >>> runs_eagerly(torch.zeros(2)), runs_eagerly(torch.zeros(2, device="meta"))
        (True, False)
    """
    if torch.compiler.is_compiling() or _dispatch_modes():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or t.is_meta or _functorch_wrapped(t)):
            return False
    return True


def _direct(*tensors: torch.Tensor | None) -> bool:
    # The ops have no derivative, so autograd must see them: inputs that require grad keep the dispatch.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return runs_eagerly(*tensors)


def _unflatten(lead: torch.Size, out: torch.Tensor, idx: torch.Tensor, score: torch.Tensor) -> Outputs:
    # Skipped for 2-D queries: a reshape costs a few microseconds, ~the kernel's host time at decode sizes.
    if len(lead) == 1:
        return out, idx, score
    return out.reshape(*lead, out.shape[1]), idx.reshape(lead), score.reshape(lead)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # Kernels need unit-stride rows; a row-strided view (e.g. a slice of a bigger buffer) is fine as it is.
    return t if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def _check_traced_backend(backend: str, queries: torch.Tensor) -> None:
    # A traced op chooses its kernel when it runs, from the device and the configuration: a per-call name cannot
    # travel with it, so a name the op would not choose is refused rather than silently replaced.
    if backend != backends.resolve(None, queries.device, queries.shape[0]):
        raise ValueError(
            f"backend={backend!r} cannot be picked per call under torch.compile, make_fx, torch.func or fake "
            "tensors: the traced op picks its kernel by device when it runs. Wrap the calls in "
            f"neuraldb_kernels.config.override(backend={backend!r}) instead"
        )


# ---- public entry points ----------------------------------------------------------------------------------------
def gated_retrieval(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    *,
    backend: str | None = None,
    thresholds: torch.Tensor | None = None,
) -> Outputs:
    """Gated nearest-key lookup: the residual of the best-matching key where its cosine exceeds ``gamma``.

    Args:
        queries: ``(..., d1)`` fp32/fp16/bf16; normalised inside the op (rows of zeros stay zero).
        keys: ``(m, d1)`` fp16 (bf16/fp32 accepted) with rows of unit length. The op does **not**
            renormalise them: :class:`neuraldb.NeuralKVDatabase` stores them normalised.
        values: ``(m, d2)`` fp16/bf16/fp32 residual rows.
        gamma: gate threshold in [-1, 1]; a row retrieves only where ``score > gamma`` (strictly).
        backend: None or "auto" (best for the device and the number of query rows, see
            :func:`neuraldb_kernels.backends.resolve`; the configured backend, ``$NEURALDB_BACKEND``, when set),
            "torch" (the PyTorch backend), "cpu" (C++), "triton" or "cuda". Under a tracer only the backend the
            device would pick is accepted; force another with :func:`neuraldb_kernels.config.override`.
        thresholds: None, or per-row gate thresholds ``(m,)`` float32 on the keys' device, in [-1, 1]: the best row
            ``idx`` also needs ``score > thresholds[idx]`` (-1, or anything at or below gamma: gamma alone). Applied
            right after the scan at gamma (:func:`neuraldb_kernels.reference.apply_row_thresholds`), so it is exact
            on every backend; ``idx`` and ``score`` are the scan's either way.

    Returns:
        ``out (..., d2)`` in the queries' dtype (``values[idx]`` where the gate opens, else zeros),
        ``idx (...)`` int64 (the smallest index reaching the best score; -1 when ``m == 0`` or the query row is not
        finite) and ``score (...)`` float32 (the best cosine; ``-inf`` where ``idx`` is -1), all on the queries'
        device.

    Which differences between backends are possible, and why: the specification
    (:func:`neuraldb_kernels.reference.gated_retrieval_reference`) rounds the exact cosine once to fp32; the backends
    sum in fp32 in their own orders (SIMD width, tiles, splits), so a score may differ from the specification's by
    up to :func:`~neuraldb_kernels.reference.score_error_bound` (``2 (d1 + 8) 2^-24 + 2^-16``: 8.5e-5 at d1 = 576,
    1.7e-3 at d1 = 14336). Hence ``idx`` may differ only where the two best exact scores are within that bound of
    each other, and the gate only where the best exact score is within it of gamma; everywhere else ``idx`` and
    ``out`` are the same on every backend and every machine. Identical key rows get identical scores in every
    backend, so an exact tie always goes to the lowest index. Non-finite input is never retrieved: a key row with
    an inf or NaN element never wins, and a query row with one gets ``(zeros, -1, -inf)``. Queries whose squared
    norm overflows fp32 (``||q|| > 1.8e19``) are outside the contract.

    Example::

        >>> import torch, neuraldb_kernels
        >>> keys = torch.nn.functional.normalize(torch.randn(1000, 64), dim=1).half()
        >>> values = torch.randn(1000, 32).half()
        >>> out, idx, score = neuraldb_kernels.gated_retrieval(keys[:3].float() * 5, keys, values, 0.65)
        >>> idx.tolist()
        [0, 1, 2]
    """
    g = check_inputs(queries, keys, values, gamma)
    thresholds = check_thresholds(thresholds, keys)
    lead = queries.shape[:-1]
    q2 = queries.reshape(-1, queries.shape[-1])
    name = backends.resolve(backend, queries.device, q2.shape[0])
    out, idx, score = gated_retrieval_unchecked(q2, _rows(keys), _rows(values), g, name)
    if thresholds is not None:
        out = apply_row_thresholds(out, idx, score, thresholds)
    return _unflatten(lead, out, idx, score)


def gated_retrieval_unchecked(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    backend: str,
    sketch: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
) -> Outputs:
    """:func:`gated_retrieval` (:func:`gated_retrieval_prefiltered` when ``sketch`` is given) without the argument
    checks, for callers that own consistent tensors (:class:`neuraldb.NeuralKVDatabase`): 2-D ``queries``,
    ``keys``/``values`` (and the sketches) with unit-stride rows, a float ``gamma`` in [-1, 1] and a backend name from
    :func:`neuraldb_kernels.backends.resolve`. Eager calls run the kernel itself; tracers and inputs that require grad
    get the custom op.

    Example::

        >>> keys = torch.nn.functional.normalize(torch.randn(100, 16), dim=1).half()
        >>> gated_retrieval_unchecked(keys[:2].float(), keys, torch.eye(100)[:, :4], 0.5, "torch")[1].tolist()
        [0, 1]
    """
    q = _rows(queries)
    if _direct(q, keys, values):
        if sketch is None:
            return backends.kernel(backend)(q, keys, values, gamma)
        return _prefiltered_kernel(q, keys, values, gamma, sketch, signs, backend)
    _check_traced_backend(backend, q)
    if sketch is None:
        return torch.ops.neuraldb.gated_retrieval(q, keys, values, gamma)
    return torch.ops.neuraldb.gated_retrieval_prefiltered(q, keys, values, gamma, sketch, signs)


def bind_cpu_residuals(
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    sketch: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
    sketch_max_rows: int = 0,
    thresholds: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """The C++ CPU kernel with all but the queries bound, for a patched eager forward (the function inside a
    :class:`neuraldb_kernels.plan.RetrievalPlan`; :func:`neuraldb_kernels.plan.plan_retrieval` decides its arguments).

    ``fn(queries)`` takes queries ``(..., d1)`` (fp32/fp16/bf16 on the CPU, not requiring grad, outside every tracer:
    check :func:`runs_eagerly`) and returns the gated residuals ``(..., d2)`` in their dtype, or None when no row's
    gate opens, so that the caller adds nothing. With a ``sketch`` (and ``signs``, as for
    :func:`gated_retrieval_prefiltered`), calls of at most ``sketch_max_rows`` rows take the pre-filtered kernel.
    The flattening, the choice and the gate test run in C++: on a decode step every tensor method called from Python
    costs host time, with its caches cold from the model's weights. With ``thresholds`` (as for
    :func:`gated_retrieval`), the query rows whose gate opened at gamma are scanned again for their best row and
    score, and kept only where that row's own threshold passes: the common call, where no gate opens, costs nothing
    more.

    Example::

        >>> keys = torch.nn.functional.normalize(torch.randn(100, 16), dim=1).half()
        >>> fn = bind_cpu_residuals(keys, torch.randn(100, 4), 0.65)
        >>> fn(torch.randn(1, 1, 16)) is None, fn(keys[3:4].float().view(1, 1, 16)).shape
        (True, torch.Size([1, 1, 4]))
    """
    ext = extension.load()
    if ext is None:
        raise RuntimeError(f"bind_cpu_residuals needs the compiled extension: {extension.missing_reason()}")
    f = ext.gated_residuals_cpu
    if thresholds is None:
        return lambda queries: f(queries, keys, values, gamma, sketch, signs, sketch_max_rows)
    scan = ext.gated_retrieval_cpu

    def residuals(queries: torch.Tensor) -> torch.Tensor | None:
        out = f(queries, keys, values, gamma, sketch, signs, sketch_max_rows)
        if out is None:
            return None
        flat = out.view(-1, out.shape[-1])
        rows = flat.ne(0).any(dim=1).nonzero().flatten()
        _, idx, score = scan(queries.reshape(-1, queries.shape[-1]).index_select(0, rows), keys, values, gamma)
        shut = rows[score <= thresholds[idx.clamp_min(0)]]
        if shut.numel() == rows.numel():
            return None
        flat.index_fill_(0, shut, 0)
        return out

    return residuals


def gated_retrieval_prefiltered(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    sketch: torch.Tensor,
    signs: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    thresholds: torch.Tensor | None = None,
) -> Outputs:
    """:func:`gated_retrieval` that scans the int4 ``sketch`` of the keys and rescores only the keys that can
    pass the gate (see :mod:`neuraldb_kernels.prefilter`): ``out`` is exactly the plain op's.

    Args:
        queries, keys, values, gamma, thresholds: as for :func:`gated_retrieval`.
        sketch: ``build_sketch(keys)``, kept in step with ``keys`` (row ``i`` sketches key ``i``).
        signs: None, or ``build_signs(keys)`` (kept in step likewise): an exact 1-bit first stage, so that only the
            keys it cannot rule out have their int4 sketch read (~10% of the fp16 key bytes per key at d1 = 1536).
        backend: resolved as for :func:`gated_retrieval`; "cpu" runs the C++ kernel, which rescores with the plain
            CPU kernel's own dot (so its output is bitwise the plain "cpu" output); "triton" (and "cuda", which has
            no cascade of its own yet) the Triton cascade (:mod:`neuraldb_kernels.triton_cascade`, bitwise the plain
            "triton" output where the gate opens); "torch" the PyTorch reference of the pre-filter.

    Returns:
        ``(out, idx, score)``: where the gate opens, the plain op's; where it stays closed, ``out`` zeros (as the
        plain op), ``idx = -1`` and ``score = -inf`` (the argmax below gamma is not computed).

    Example::

        >>> import torch, neuraldb_kernels
        >>> keys = torch.nn.functional.normalize(torch.randn(1000, 64), dim=1).half()
        >>> sketch = neuraldb_kernels.build_sketch(keys)
        >>> q = torch.cat([keys[:2].float() * 5, torch.randn(1, 64)])
        >>> out, idx, score = neuraldb_kernels.gated_retrieval_prefiltered(q, keys, torch.randn(1000, 8), 0.65, sketch)
        >>> idx.tolist()
        [0, 1, -1]
    """
    g = check_inputs(queries, keys, values, gamma)
    check_sketch(sketch, keys)
    if signs is not None:
        check_signs(signs, keys)
    thresholds = check_thresholds(thresholds, keys)
    lead = queries.shape[:-1]
    q2 = queries.reshape(-1, queries.shape[-1])
    name = backends.resolve(backend, queries.device, q2.shape[0])
    signs = None if signs is None else _rows(signs)
    out, idx, score = gated_retrieval_unchecked(q2, _rows(keys), _rows(values), g, name, _rows(sketch), signs)
    if thresholds is not None:
        out = apply_row_thresholds(out, idx, score, thresholds)
    return _unflatten(lead, out, idx, score)
