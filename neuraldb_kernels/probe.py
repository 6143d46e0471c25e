"""The benchmarks' read-bandwidth probe: how long reading a tensor once takes with the CPU kernels' own threading.

It lives in its own small extension, ``neuraldb_kernels._probe`` (csrc/bench/read_probe.cpp), so the production
extension ``neuraldb_kernels._C`` carries only the op. Its knobs come from :mod:`neuraldb_kernels.config`: the same
thread team as the kernels (``cpu_parallel_min_us``, ``cpu_chunk``), 512-bit loads unless ``cpu_isa`` is "scalar" or
"avx2", and ``read_prefetch`` bytes of software prefetch.
"""

from __future__ import annotations

from types import ModuleType

import torch

from neuraldb_kernels import config


def _module() -> ModuleType:
    try:
        from neuraldb_kernels import _probe  # type: ignore[attr-defined]
    except ImportError as exc:
        raise RuntimeError(
            f"the benchmark probe neuraldb_kernels._probe is not built ({exc}); reinstall without "
            "NEURALDB_SKIP_PROBE_BUILD=1"
        ) from None
    return _probe


def probe_built() -> bool:
    """Whether the probe's extension was built (a benchmark falls back to a PyTorch read without it)."""
    try:
        _module()
    except RuntimeError:
        return False
    return True


def read_probe(tensor: torch.Tensor) -> int:
    """Reads every byte of a contiguous CPU ``tensor`` once; returns the XOR of its 64-bit words, XOR its trailing
    ``nbytes % 8`` bytes, masked to 63 bits (a checksum that shows every byte was read).

    Example::

        >>> read_probe(torch.tensor([1, 2], dtype=torch.int64))
        3
    """
    cfg = config.current()
    return _module().read_probe(
        tensor,
        wide=cfg.cpu_isa not in ("scalar", "avx2"),
        prefetch_bytes=cfg.read_prefetch,
        parallel_min_us=float(cfg.cpu_parallel_min_us),
        chunk=cfg.cpu_chunk,
    )
