"""CPU buffers in 2 MB pages: where the database keeps its keys, values and sketches on the CPU.

Why: a CPU decode step streams the model's weights, hundreds of MB in 4 KB pages, so the TLB holds none of the
database's pages when the patched layer scans it, and each 4 KB page costs a page walk (two-dimensional, so dearer,
in a virtual machine). At 10k facts the first stage of the scan reads 3 MB: 750 pages in 4 KB pages, 2 in 2 MB
pages. On SmolLM2-135M at 10k facts (1 thread, 800 alternated pairs, ``benchmarks/ab_pages.py``) the patch's hook
took 0.32 ms less per decode step with the database in 2 MB pages, and the step 0.52 ms less (``docs/overhead.md``).
The cost: a touched 2 MB page is resident whole, so each buffer may hold up to 2 MB more than its rows.

Linux gives 2 MB pages (transparent huge pages) to memory that asks for them with ``madvise(MADV_HUGEPAGE)``, unless
``/sys/kernel/mm/transparent_hugepage/enabled`` says ``never``. Elsewhere, and for buffers under 2 MB, :func:`empty`
is ``torch.empty``. The tensor keeps its mapping alive; it is unmapped when the last view of it goes.

Example::

    >>> import torch
    >>> from neuraldb.host_memory import empty
    >>> buf = empty((4096, 1536), torch.float16, "cpu")
    >>> buf.shape, buf.dtype, buf.device.type
    (torch.Size([4096, 1536]), torch.float16, 'cpu')
"""

from __future__ import annotations

import ctypes
import math
import mmap

import torch

HUGE_PAGE = 2 << 20
_MADVISE = getattr(mmap, "MADV_HUGEPAGE", None)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised contiguous tensor like ``torch.empty(shape, dtype=dtype, device=device)``; on the CPU, from
    ``HUGE_PAGE`` bytes up, its data starts on a 2 MB boundary in memory advised for 2 MB pages (Linux)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE or _MADVISE is None:
        return torch.empty(shape, dtype=dtype, device=device)
    # Private: shared anonymous memory is shmem, whose huge pages are a separate setting that is usually off.
    # One spare 2 MB page, so the data can start on a 2 MB boundary wherever the kernel puts the mapping.
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(mm)
    offset = -ctypes.addressof(view) % HUGE_PAGE
    del view  # an exported buffer would keep the mapping from being closed
    try:
        mm.madvise(_MADVISE)
    except OSError:  # a kernel built without transparent huge pages: 4 KB pages, nothing else changes
        pass
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)
