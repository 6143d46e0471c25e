"""Helpers the benchmark scripts share: machine description, JSON results, read-bandwidth probe, memory, timing.

Import from a script in this folder with ``from _common import ...`` (each script puts this folder, the repo root and
``python/`` on ``sys.path``, so the scripts run from a checkout without installing anything).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
for _p in (str(ROOT / "python"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch
from typing_extensions import Self

# ---------------------------------------------------------------------------------------------------------------------
# What ran where
# ---------------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The ISA extensions the CPU kernels care about that ``/proc/cpuinfo`` lists (sorted; [] off Linux)."""
    wanted = ("avx2", "f16c", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return sorted(x for x in wanted if x in have)
    except OSError:
        pass
    return []


def _lscpu_field(name: str) -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(rf"^{re.escape(name)}:\s*(.+)$", out, re.MULTILINE)
    return m.group(1).strip() if m else None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def mem_total_bytes() -> int | None:
    """``MemTotal`` in bytes; None off Linux."""
    return _proc_kib("/proc/meminfo", "MemTotal")


def mem_available_bytes() -> int | None:
    """``MemAvailable`` in bytes (what can be allocated without swapping); None off Linux."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded to 0.01 ([] where unsupported)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_description(device: str | torch.device = "cpu") -> dict:
    """Everything a reader needs to compare numbers across runs: CPU/GPU, threads, ISA, versions, load, commit."""
    import neuraldb_kernels

    desc: dict = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "l3_cache": _lscpu_field("L3 cache"),
        "mem_total_gib": round((mem_total_bytes() or 0) / 2**30, 1),
        "mem_available_gib": round((mem_available_bytes() or 0) / 2**30, 1),
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "neuraldb_kernels": neuraldb_kernels.__version__,
        "backends": neuraldb_kernels.available_backends(device),
        "git_commit": _git_commit(),
    }
    try:
        import transformers

        desc["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        from neuraldb_kernels import extension

        ext = extension.load()
        if ext is not None and hasattr(ext, "cpu_isas"):
            desc["cpu_isas"] = list(ext.cpu_isas())
    except Exception:
        pass
    for var in ("NEURALDB_BACKEND", "NEURALDB_CPU_ISA", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            desc.setdefault("env", {})[var] = os.environ[var]
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        desc["gpu"] = props.name
        desc["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        desc["cuda"] = torch.version.cuda
    return desc


def write_json(path: Path, obj: object, **dumps_kwargs: object) -> Path:
    """Write ``obj`` as indented JSON to ``path`` (creating its folder); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, **dumps_kwargs))  # type: ignore[arg-type]
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work when ``device`` is a CUDA device (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds one call of ``fn`` takes (synchronising CUDA before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed_both(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call of ``fn``.

    On a CPU shared with other jobs, wall time includes the time slices other processes take, CPU time does not: with
    one torch thread, the CPU time is the work this call did (still slowed by shared caches and memory bandwidth, but
    not by the scheduler). With several threads it also counts OpenMP workers spinning at barriers.
    """
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def median(xs: list[float]) -> float:
    """The median of ``xs``; NaN when empty."""
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Read bandwidth: the floor of any scan over the keys
# ---------------------------------------------------------------------------------------------------------------------


def read_bandwidth(buf: torch.Tensor, reps: int = 5) -> dict:
    """Measured read bandwidth (bytes/s) over ``buf``'s bytes, on its device, with torch's threads.

    Several reads are tried (``neuraldb_kernels.probe.read_probe`` where built, int64 sum, int32 max) and the fastest
    median wins: the floor computed from it is the most demanding one. ``buf`` should be the very tensor the
    kernel reads (the database's keys), so cache residency is the same as the kernel's.
    """
    flat = buf.detach().reshape(-1) if buf.is_contiguous() else buf.detach().contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes < 64:
        return {"bytes": nbytes, "bytes_per_s": float("nan"), "probe": None}
    raw = flat.view(torch.uint8)[: nbytes - nbytes % 8]
    probes = {
        "int64_sum": lambda: raw.view(torch.int64).sum(),
        "int32_max": lambda: raw.view(torch.int32).max(),
    }
    if buf.device.type == "cpu":
        from neuraldb_kernels.probe import probe_built, read_probe

        if probe_built():
            # The C++ loop XOR-ing every 64-bit word with the kernel's own threading: the fastest read we have.
            probes["read_probe"] = lambda: read_probe(raw)
    best_name, best_t, best_cpu = None, float("inf"), float("inf")
    per: dict[str, float] = {}
    for name, fn in probes.items():
        fn()  # warm up (and fault in) once
        both = [timed_both(fn, buf.device) for _ in range(reps)]
        t = median([w for w, _ in both])
        per[name] = raw.numel() / t
        if t < best_t:
            best_name, best_t = name, t
        best_cpu = min(best_cpu, median([c for _, c in both]))
    return {
        "bytes": raw.numel(),
        "bytes_per_s": raw.numel() / best_t,
        "probe": best_name,
        "per_probe_bytes_per_s": per,
        "bytes_per_cpu_s": raw.numel() / best_cpu if best_cpu > 0 else float("nan"),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------


def _proc_kib(path: str, field: str) -> int | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> int | None:
    """Resident set size now (``VmRSS``); None off Linux."""
    return _proc_kib("/proc/self/status", "VmRSS")


def peak_rss_bytes() -> int | None:
    """Peak resident set size since start or the last :func:`reset_peak_rss` (``VmHWM``); None off Linux."""
    return _proc_kib("/proc/self/status", "VmHWM")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: write 5 to ``/proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gib(n: float | None) -> float | None:
    """Bytes to GiB, rounded to 3 decimals (None stays None)."""
    return None if n is None else round(n / 2**30, 3)


class PeakSampler:
    """Samples ``RssAnon`` (anonymous memory: tensors, Python objects) every ``interval`` seconds in a thread.

    ``VmHWM`` also counts file-backed pages mapped while they are mapped (a safetensors file being read through mmap is
    page cache, reclaimable), so it overstates what a load costs; the anonymous peak is what must fit in memory.

        with PeakSampler() as s:
            work()
        s.peak_anon_bytes
    """

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        self.interval = interval
        self.peak_anon_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        anon = _proc_kib("/proc/self/status", "RssAnon")
        if anon is not None and anon > self.peak_anon_bytes:
            self.peak_anon_bytes = anon

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def anon_bytes() -> int | None:
    """Anonymous resident memory now (``RssAnon``)."""
    return _proc_kib("/proc/self/status", "RssAnon")
