"""The database's CPU buffers in 2 MB pages (neuraldb.host_memory): alignment, fallbacks, release, and that the OS
really backs them with huge pages where it offers them."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from neuraldb import NeuralKVDatabase, host_memory
from neuraldb.host_memory import HUGE_PAGE, empty

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_HUGEPAGE) is Linux's")


def _mapping(addr: int) -> dict[str, str] | None:
    """The /proc/self/smaps entry of the mapping that holds ``addr`` (None when none does)."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            entry = {} if lo <= addr < hi else None
        elif entry is not None and ":" in head:
            entry[head.rstrip(":")] = line.split(":", 1)[1].strip()
            if head == "VmFlags:":
                return entry
    return entry


@linux_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.uint8])
def test_large_cpu_buffers_start_on_a_huge_page_advised_for_huge_pages(dtype):
    rows = HUGE_PAGE // (300 * dtype.itemsize) + 7  # over 2 MB, not a multiple of it
    buf = empty((rows, 300), dtype, "cpu")
    assert buf.shape == (rows, 300) and buf.dtype == dtype and buf.is_contiguous()
    assert buf.data_ptr() % HUGE_PAGE == 0
    assert "hg" in _mapping(buf.data_ptr())["VmFlags"].split()  # madvise(MADV_HUGEPAGE) reached the kernel
    buf.fill_(3)
    assert buf[-1, -1].item() == 3 and buf[0, 0].item() == 3


@pytest.mark.parametrize("shape, device", [((16, 8), "cpu"), ((0, 1536), "cpu"), ((4096, 1536), "meta")])
def test_small_and_non_cpu_buffers_are_torch_empty(shape, device, monkeypatch):
    # Whether malloc's heap around a small tensor is advised for huge pages depends on what else the process
    # allocated (it was, once, after the whole suite), so the test checks that no mapping of its own is made.
    def no_mapping(*args, **kwargs):
        raise AssertionError("host_memory.empty mapped memory of its own for a small or non-CPU buffer")

    monkeypatch.setattr(host_memory.mmap, "mmap", no_mapping)
    buf = empty(shape, torch.float16, device)
    assert buf.shape == shape and buf.dtype == torch.float16 and buf.device.type == device


@linux_only
def test_a_buffer_is_unmapped_with_its_last_view():
    buf = empty((HUGE_PAGE,), torch.uint8, "cpu")
    head = buf[:10]
    addr = buf.data_ptr()
    del buf
    gc.collect()
    assert _mapping(addr) is not None, "a view keeps the mapping"
    head.fill_(1)
    del head
    gc.collect()
    assert _mapping(addr) is None


@linux_only
@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(), reason="transparent huge pages are off")
def test_the_os_backs_a_touched_buffer_with_huge_pages():
    buf = empty((4 * HUGE_PAGE,), torch.uint8, "cpu")
    buf.fill_(1)
    assert int(_mapping(buf.data_ptr())["AnonHugePages"].split()[0]) * 1024 >= HUGE_PAGE


@linux_only
def test_database_buffers_grow_and_sketch_in_huge_pages():
    db = NeuralKVDatabase(1536, 576)
    g = torch.Generator().manual_seed(0)
    db.add(torch.randn(5000, 1536, generator=g), torch.randn(5000, 576, generator=g))
    db.retrieve_residuals(torch.randn(1, 1536, generator=g), 0.65)  # builds the sketches
    buffers = {name: getattr(db._storage, name) for name in ("keys_buf", "values_buf", "sketch_buf", "signs_buf")}
    assert all(b.numel() * b.element_size() >= HUGE_PAGE for b in buffers.values())
    for name, b in buffers.items():
        assert b.data_ptr() % HUGE_PAGE == 0, name


@linux_only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_database_moved_back_to_the_cpu_is_in_huge_pages():
    db = NeuralKVDatabase(1536, 576, device="cuda")
    db.add(torch.randn(1000, 1536), torch.randn(1000, 576))
    keys = db.keys.cpu()
    db.to("cpu")
    assert db._storage.keys_buf.data_ptr() % HUGE_PAGE == 0 and torch.equal(db.keys, keys)
