"""The kernels' configuration: every ``NEURALDB_*`` switch of :mod:`neuraldb_kernels`, read from the environment once.

Importing the package reads the environment into a frozen :class:`KernelConfig`; later changes to
``os.environ`` have no effect (the kernels never read it per call: a decode step cannot afford it). Tests and
benchmarks change it with :func:`override`, which also hands the C++ kernels' part to the compiled extension
(``set_cpu_options``) once, not per call.

=================================  ===================  =============================================================
variable                           field                meaning
=================================  ===================  =============================================================
``NEURALDB_BACKEND``               ``backend``          "auto" (default), "torch", "cpu", "triton" or "cuda"
``NEURALDB_CPU_ISA``               ``cpu_isa``          auto|scalar|avx2|avx512|amx: the C++ kernel's code path
``NEURALDB_CPU_CHUNK``             ``cpu_chunk``        keys per work chunk (0: sized from the row bytes)
``NEURALDB_CPU_PARALLEL_MIN_US``   ``cpu_parallel_min_us``  estimated single-thread time below which no thread team
                                                        starts (default 300; 0 always starts it)
``NEURALDB_CPU_AMX_MIN_T``         ``cpu_amx_min_t``    smallest T for which "auto" takes the AMX pre-filter (12)
``NEURALDB_CPU_AMX_CAP``           ``cpu_amx_cap``      candidates per query and thread before an exact rescan (512)
``NEURALDB_CPU_AMX_TIGHT``         ``cpu_amx_tight``    measure each key's bf16 error: 1, 0, or unset (d1 > 2048)
``NEURALDB_CPU_AMX_BLOCKS``        ``cpu_amx_blocks``   blocks of 32 keys sharing packed queries (1..4, default 1)
``NEURALDB_CPU_DEBUG``             ``cpu_debug``        1: the pre-filters print their statistics to stderr
``NEURALDB_READ_PREFETCH``         ``read_prefetch``    the read probe's prefetch distance in bytes (1024; 0: none)
``NEURALDB_TRITON_AUTOTUNE``       ``triton_autotune``  0: one fixed Triton config per path instead of autotuning
=================================  ===================  =============================================================

``TRITON_INTERPRET`` is Triton's own switch and is read where Triton reads it.

Example::

    >>> from neuraldb_kernels import config
    >>> with config.override(cpu_isa="scalar", cpu_parallel_min_us=0):
    ...     config.current().cpu_isa
    'scalar'
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "cuda")
CPU_ISAS = ("auto", "scalar", "avx2", "avx512", "amx")


@dataclass(frozen=True)
class KernelConfig:
    """Every switch of the kernels (see the module's table for the environment variable of each field)."""

    backend: str = "auto"
    cpu_isa: str = "auto"
    cpu_chunk: int = 0
    cpu_parallel_min_us: float = 300.0
    cpu_amx_min_t: int = 12
    cpu_amx_cap: int = 512
    cpu_amx_tight: int | None = None
    cpu_amx_blocks: int = 1
    cpu_debug: bool = False
    read_prefetch: int = 1024
    triton_autotune: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}; got {self.backend!r}")
        if self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"NEURALDB_CPU_ISA must be auto, scalar, avx2, avx512 or amx; got '{self.cpu_isa}'")

    def cpu_options(self) -> dict[str, object]:
        """The keywords of the extension's ``set_cpu_options`` (csrc/gated_retrieval.h: ``CpuOptions``)."""
        return {
            "isa": self.cpu_isa,
            "chunk": self.cpu_chunk,
            "parallel_min_us": float(self.cpu_parallel_min_us),
            "amx_min_t": self.cpu_amx_min_t,
            "amx_cap": self.cpu_amx_cap,
            "amx_tight": -1 if self.cpu_amx_tight is None else int(bool(self.cpu_amx_tight)),
            "amx_blocks": self.cpu_amx_blocks,
            "debug": self.cpu_debug,
        }


def _int(text: str) -> int:
    return int(text)


def _flag(text: str) -> bool:
    return _int(text) != 0


_KINDS: dict[Callable[[str], object], str] = {_int: "an integer", _flag: "0 or 1", float: "a number"}
# field -> (environment variable, parser of its text)
ENVIRONMENT: dict[str, tuple[str, Callable[[str], object]]] = {
    "backend": ("NEURALDB_BACKEND", str),
    "cpu_isa": ("NEURALDB_CPU_ISA", str),
    "cpu_chunk": ("NEURALDB_CPU_CHUNK", _int),
    "cpu_parallel_min_us": ("NEURALDB_CPU_PARALLEL_MIN_US", float),
    "cpu_amx_min_t": ("NEURALDB_CPU_AMX_MIN_T", _int),
    "cpu_amx_cap": ("NEURALDB_CPU_AMX_CAP", _int),
    "cpu_amx_tight": ("NEURALDB_CPU_AMX_TIGHT", _int),
    "cpu_amx_blocks": ("NEURALDB_CPU_AMX_BLOCKS", _int),
    "cpu_debug": ("NEURALDB_CPU_DEBUG", _flag),
    "read_prefetch": ("NEURALDB_READ_PREFETCH", _int),
    "triton_autotune": ("NEURALDB_TRITON_AUTOTUNE", _flag),
}


def from_environ(environ: Mapping[str, str] | None = None) -> KernelConfig:
    """The configuration ``environ`` (default ``os.environ``) describes; unset or empty variables keep defaults.

    Raises ValueError naming the variable whose text does not parse.

    Example::

        >>> from_environ({"NEURALDB_CPU_ISA": "avx2", "NEURALDB_TRITON_AUTOTUNE": "0"}).triton_autotune
        False
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for field, (var, parse) in ENVIRONMENT.items():
        text = env.get(var)
        if not text:
            continue
        try:
            values[field] = parse(text)
        except ValueError:
            raise ValueError(f"${var} must be {_KINDS.get(parse, 'text')}, got {text!r}") from None
    try:
        return KernelConfig(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        if "backend must be" in str(exc):
            raise ValueError(f"${ENVIRONMENT['backend'][0]} {str(exc).removeprefix('backend ')}") from None
        raise


def _from_process_environ() -> tuple[KernelConfig | None, ValueError | None]:
    try:
        return from_environ(), None
    except ValueError as exc:
        return None, exc


# Read when the package is imported, so that current() is a plain read, traceable by torch.compile (an op's first
# call may be inside a compiled function); a malformed variable is reported by the first call that needs it.
_current, _environ_error = _from_process_environ()
_lock = threading.Lock()
# Called with each new configuration (the extension loader pushes the C++ options); see on_change.
_listeners: list[Callable[[KernelConfig], None]] = []


def current() -> KernelConfig:
    """The configuration in force: the environment's as the package was imported, or an :func:`override`'s.

    Raises the ValueError of a malformed ``NEURALDB_*`` variable.

    Example::

        >>> current().backend in BACKEND_NAMES
        True
    """
    cfg = _current
    if cfg is None:
        assert _environ_error is not None
        raise _environ_error
    return cfg


def _publish(cfg: KernelConfig) -> None:
    global _current
    for listener in _listeners:
        listener(cfg)
    _current = cfg


def on_change(listener: Callable[[KernelConfig], None]) -> None:
    """Calls ``listener(cfg)`` now (if a configuration is in force) and with every later configuration."""
    with _lock:
        _listeners.append(listener)
        if _current is not None:
            listener(_current)


@contextmanager
def override(**changes: object) -> Iterator[KernelConfig]:
    """Runs the block with ``current()`` replaced by a copy with ``changes`` (fields of :class:`KernelConfig`), and
    restores the previous configuration on exit. Meant for tests and benchmarks: it is process-wide, so calls
    running in other threads meanwhile see it too.

    Example::

        >>> with override(backend="torch") as cfg:
        ...     cfg.backend
        'torch'
    """
    previous = current()
    cfg = dataclasses.replace(previous, **changes)  # type: ignore[arg-type]
    with _lock:
        _publish(cfg)
    try:
        yield cfg
    finally:
        with _lock:
            _publish(previous)
