"""The backends of ``gated_retrieval``, when each can run, and which one "auto" picks.

Every backend takes 2-D queries (T, d1) with unit-stride rows, keys (m, d1), values (m, d2) on the queries'
device and a validated gamma, and returns ``(out, idx, score)`` by the rules of :mod:`neuraldb_kernels.reference`,
each score within :func:`~neuraldb_kernels.reference.score_error_bound` of the specification's.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuraldb_kernels import config, extension
from neuraldb_kernels.reference import gated_retrieval_torch

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """One entry of ``BACKENDS``: whether it can run on a device type, and its kernel (imported on first use)."""

    name: str
    # Returns None when the backend can run on that device type, else a sentence saying why not.
    unavailable_reason: Callable[[str], str | None]
    kernel: Callable[[], Kernel]


def _reference_reason(device_type: str) -> str | None:
    return None


def _cpu_reason(device_type: str) -> str | None:
    if device_type != "cpu":
        return f"the 'cpu' backend runs on CPU tensors, got tensors on {device_type}"
    ext = extension.load()
    if ext is None:
        return extension.missing_reason()
    return None


def _cpu_kernel() -> Kernel:
    ext = extension.load()
    assert ext is not None
    return ext.gated_retrieval_cpu


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once: resolve() runs inside torch.compile'd code, and dynamo cannot trace importlib.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Likewise the extension is loaded now, not by the first availability check, which may be inside a compiled function.
extension.load()


def _triton_reason(device_type: str) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed (`pip install triton`)"
    if device_type == "cuda":
        return None
    if device_type == "cpu" and _triton_interpreting():
        return None
    return (
        f"the 'triton' backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got tensors on {device_type}"
    )


def _triton_kernel() -> Kernel:
    from neuraldb_kernels.triton_kernel import gated_retrieval_triton

    return gated_retrieval_triton


def _cuda_reason(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors, got tensors on {device_type}"
    ext = extension.load()
    if ext is None:
        return extension.missing_reason()
    if not hasattr(ext, "gated_retrieval_cuda"):
        return "neuraldb_kernels._C was built without CUDA (torch without CUDA, no nvcc, or NEURALDB_SKIP_CUDA_BUILD=1)"
    return None


def _cuda_kernel() -> Kernel:
    ext = extension.load()
    assert ext is not None
    return ext.gated_retrieval_cuda


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", _reference_reason, lambda: gated_retrieval_torch),
        Backend("cpu", _cpu_reason, _cpu_kernel),
        Backend("triton", _triton_reason, _triton_kernel),
        Backend("cuda", _cuda_reason, _cuda_kernel),
    )
}

# Preference order of "auto" per device type; the reference is always last and always available.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
# ... and for calls with a single query row (decode at batch 1). On an H200 at 100k x 14336 fp16 keys the CUDA kernel
# reads the keys at 98% of the read probe against Triton's 103%, but its one C++ launch costs ~0.3 ms less host time
# than Triton's Python launcher and autotuner (hook 0.17 against 0.47 ms in an 8B-shaped decode step), and an eager
# decode step is launch-bound: the host time is what the patch adds. docs/gpu.md has the measurements.
_AUTO_ORDER_ONE_ROW = {"cuda": ("cuda", "triton", "torch")}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``, best first.

    Example::

        >>> available_backends("cpu")
        ['cpu', 'torch']
    """
    device_type = torch.device(device).type
    order = _AUTO_ORDER.get(device_type, ("torch",))
    extra = [n for n in BACKENDS if n not in order]
    return [n for n in (*order, *extra) if BACKENDS[n].unavailable_reason(device_type) is None]


def resolve(backend: str | None, device: torch.device, rows: int | None = None) -> str:
    """The concrete backend name for ``backend`` (None/"auto": the configured one, :attr:`KernelConfig.backend
    <neuraldb_kernels.config.KernelConfig.backend>`, from ``$NEURALDB_BACKEND``) on ``device``, for a
    call with ``rows`` query rows (None: any number). "auto" on CUDA picks Triton, except for a single row, which
    goes to the CUDA kernel where it is built (as fast on the device, far cheaper to launch).

    Raises ValueError for an unknown name and RuntimeError, saying why, for one that cannot run there.

    Example::

        >>> resolve(None, torch.device("cpu"), rows=1)
        'cpu'
    """
    name = backend if backend not in (None, "auto") else config.current().backend
    device_type = device.type
    if name == "auto":
        order = _AUTO_ORDER_ONE_ROW.get(device_type) if rows == 1 else None
        for candidate in order or _AUTO_ORDER.get(device_type, ("torch",)):
            if BACKENDS[candidate].unavailable_reason(device_type) is None:
                return candidate
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of None, 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")
    reason = BACKENDS[name].unavailable_reason(device_type)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
    return name


def prefiltered_on_triton(name: str, device: torch.device) -> bool:
    """Whether ``gated_retrieval_prefiltered`` with the resolved backend ``name`` runs the Triton cascade on
    ``device``: for "triton", and for "cuda", whose extension has no cascade (the plain op's "cuda" and "triton"
    kernels differ only in near-ties, as the contract allows).

    Example::

        >>> prefiltered_on_triton("cpu", torch.device("cpu")), prefiltered_on_triton("torch", torch.device("cpu"))
        (False, False)
    """
    return name in ("triton", "cuda") and _triton_reason(device.type) is None


def prefiltered_triton_kernel():
    """The Triton cascade (imported on first use, as the plain kernels)."""
    from neuraldb_kernels.triton_cascade import gated_retrieval_prefiltered_triton

    return gated_retrieval_prefiltered_triton


_kernels: dict[Backend, Kernel] = {}


def kernel(name: str) -> Kernel:
    """The kernel function of a resolved backend name.

    Example::

        >>> q = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
        >>> kernel(resolve("torch", q.device))(q, q.half(), torch.eye(2), 0.5)[1].tolist()
        [0, 1]
    """
    # Cached: the kernel factories import modules or load the extension, per-call costs on a decode step.
    entry = BACKENDS[name]
    fn = _kernels.get(entry)
    if fn is None:
        fn = _kernels[entry] = entry.kernel()
    return fn
