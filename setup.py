"""Builds neuraldb_kernels._C: the C++ CPU kernel always, the CUDA kernel when torch has CUDA and nvcc is found; and
neuraldb_kernels._probe, the benchmarks' read-bandwidth probe (csrc/bench/), kept out of the production extension.

Switches (environment):
  NEURALDB_SKIP_CUDA_BUILD=1   build the CPU kernel only
  NEURALDB_SKIP_PROBE_BUILD=1  leave out the benchmark probe (neuraldb_kernels.probe then reports it missing)
  NEURALDB_CUDA_ARCHS="90;100" compute capabilities for the CUDA kernel (default: 80;90)
  MAX_JOBS=N                   parallel compile jobs (read by torch.utils.cpp_extension)
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


def _want_cuda() -> bool:
    if os.environ.get("NEURALDB_SKIP_CUDA_BUILD", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and bool(_rel("csrc/cuda/*.cu"))


def _cuda_include_dirs() -> list[str]:
    # pip's CUDA 13 torch ships the runtime headers (cuda_runtime_api.h, cublas, ...) under nvidia/cu13.
    site = Path(sysconfig.get_paths()["purelib"])
    return [str(p) for p in (site / "nvidia" / "cu13" / "include",) if p.is_dir()]


def _cuda_library_dirs() -> list[str]:
    # torch derives CUDA_HOME from the nvcc on PATH; where that is a wrapper script (/usr/local/bin/nvcc here),
    # CUDA_HOME/lib64 has no libcudart.so and the link fails: add the toolkit's own library directory.
    dirs = [Path(CUDA_HOME or "") / "lib64", Path(CUDA_HOME or "") / "lib", Path("/usr/local/cuda/lib64")]
    return [str(d) for d in dict.fromkeys(dirs) if (d / "libcudart.so").exists()]


def _gencode(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


# torch >= 2.10 headers need C++20.
_CXX = ["-O3", "-fopenmp", "-std=c++20"]


def _extension():
    cxx = _CXX
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    include_dirs = [str(ROOT / "csrc")]
    if _want_cuda():
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        nvcc += _gencode(os.environ.get("NEURALDB_CUDA_ARCHS", "80;90"))
        return CUDAExtension(
            "neuraldb_kernels._C",
            sources + _rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs + _cuda_include_dirs(),
            library_dirs=_cuda_library_dirs(),
            define_macros=[("NEURALDB_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "neuraldb_kernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


def _probe_extension():
    return CppExtension(
        "neuraldb_kernels._probe",
        _rel("csrc/bench/*.cpp"),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": _CXX},
        extra_link_args=["-fopenmp"],
    )


_EXTENSIONS = [_extension()]
if os.environ.get("NEURALDB_SKIP_PROBE_BUILD", "0") != "1":
    _EXTENSIONS.append(_probe_extension())

setup(ext_modules=_EXTENSIONS, cmdclass={"build_ext": BuildExtension})
