"""The CUDA kernels of csrc/cuda/ run on the CPU: no GPU needed.

csrc/cuda/gated_retrieval_kernels.cuh holds the device code and the launch sequence the CUDA backend runs;
csrc/cuda/emulate/ compiles that very header as host C++ against a small fake of the CUDA runtime (each CUDA
thread is a fiber; shuffles and __syncthreads are barriers) and runs it on files. This checks the kernels'
indexing, vector and scalar paths, row blocks of 1-16 queries, split reduction, tie-breaking and gate against the
reference, everywhere CI has a C++20 compiler. It does not check anything about speed, nor the 128-bit load
intrinsics' hardware behaviour, nor the host wrapper in gated_retrieval_cuda.cu (tests/test_gpu.py does).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from retrieval_checks import adversarial_cases, assert_matches_reference
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
EMULATE = ROOT / "csrc" / "cuda" / "emulate"
CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++20 compiler (g++ or $CXX)")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emulate") / "run_kernels"
    cmd = [
        CXX,
        "-std=c++20",
        "-O1",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-o",
        str(exe),
        str(EMULATE / "run_kernels.cpp"),
    ] + [f"-I{p}" for p in include_paths()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling the emulated CUDA kernels failed:\n{proc.stderr[-4000:]}"
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    return (t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().tobytes()


def run_emulated(exe, q, keys, values, gamma, *, sms=4, key_pad=0, key_offset=0):
    """Run the kernels; ``key_pad`` widens the key rows (stride d1 + pad), ``key_offset`` misaligns their base."""
    t, d1 = q.shape
    m, d2 = keys.shape[0], values.shape[1]
    kp = torch.zeros(m, d1 + key_pad, dtype=keys.dtype)
    kp[:, :d1] = keys
    header = struct.pack(
        "12q",
        CODES[q.dtype],
        CODES[keys.dtype],
        CODES[values.dtype],
        t,
        m,
        d1,
        d2,
        d1,
        d1 + key_pad,
        d2,
        sms,
        key_offset,
    ) + struct.pack("d", gamma)
    work = Path(str(exe) + f".{os.getpid()}")
    (work.with_suffix(".in")).write_bytes(header + _raw(q) + _raw(kp) + _raw(values))
    proc = subprocess.run(
        [str(exe), str(work.with_suffix(".in")), str(work.with_suffix(".out"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = work.with_suffix(".out").read_bytes()
    n_out = t * d2 * q.element_size()
    raw_dtype = torch.float32 if q.dtype == torch.float32 else torch.int16
    out = (
        torch.frombuffer(bytearray(data[:n_out]), dtype=raw_dtype).view(q.dtype).reshape(t, d2).clone()
        if n_out
        else torch.zeros(t, d2, dtype=q.dtype)
    )
    idx = torch.frombuffer(bytearray(data[n_out : n_out + 8 * t]), dtype=torch.int64).clone()
    score = torch.frombuffer(bytearray(data[n_out + 8 * t :]), dtype=torch.float32).clone()
    return (out, idx, score), proc.stdout.strip()


CASES = [
    c
    for c in adversarial_cases(
        m=300, d1=64, d1_odd=37, d2=12, t=5, key_dtypes=(torch.float16, torch.bfloat16, torch.float32)
    )
    if c.keys.shape[0] > 0
]  # m == 0 never reaches the kernels (the host code returns early)
SELECTED = {
    "random-qtorch.float32-ktorch.float16",
    "random-qtorch.bfloat16-ktorch.bfloat16",
    "random-qtorch.float16-ktorch.float32",
    "T=1",
    "values-bf16",
    "m=1",
    "odd-d1",
    "exact-ties",
    "score-at-gamma-qtorch.bfloat16",
    "score-just-above-gamma",
    "zero-rows-gamma-neg",
    "all-keys-equal",
}


@pytest.mark.parametrize("case", [c for c in CASES if c.name in SELECTED], ids=lambda c: c.name)
def test_adversarial_case(runner, case):
    res, _info = run_emulated(runner, case.queries, case.keys, case.values, case.gamma)
    assert_matches_reference(res, case.queries, case.keys, case.values, case.gamma, tol=case.tol)


@pytest.mark.parametrize("t", [2, 3, 12, 20])
def test_row_blocks(runner, t):
    # T = 2 -> one 2-row block, 3 -> 4-row block, 12 -> one 16-row block (4 padding rows), 20 -> two 16-row blocks.
    g = torch.Generator().manual_seed(t)
    keys = torch.nn.functional.normalize(torch.randn(200, 40, generator=g), dim=1).half()
    q = keys[torch.randint(0, 200, (t,), generator=g)].float() + 0.1 * torch.randn(t, 40, generator=g)
    values = torch.randn(200, 6, generator=g).half()
    res, info = run_emulated(runner, q, keys, values, 0.5, sms=2)
    assert f"tq={ {2: 2, 3: 4, 12: 16, 20: 16}[t] } " in info + " "
    assert_matches_reference(res, q, keys, values, 0.5)


@pytest.mark.parametrize("key_pad,key_offset,vec", [(0, 0, 1), (8, 0, 1), (3, 0, 0), (0, 1, 0)])
def test_vector_and_scalar_loads(runner, key_pad, key_offset, vec):
    g = torch.Generator().manual_seed(7)
    keys = torch.nn.functional.normalize(torch.randn(150, 48, generator=g), dim=1).half()
    keys[140] = keys[20]  # a tie across splits
    q = keys[[20, 75, 3]].float() * 2 + 0.05 * torch.randn(3, 48, generator=g)
    values = torch.randn(150, 5, generator=g).half()
    res, info = run_emulated(runner, q, keys, values, 0.5, key_pad=key_pad, key_offset=key_offset, sms=8)
    assert f"vec={vec}" in info
    assert "splits=1 " not in info
    assert_matches_reference(res, q, keys, values, 0.5)
    assert res[1][0].item() == 20


def test_wide_rows_split_finer(runner):
    # 128 KiB of keys is enough for a split: 8 KiB rows (d1 = 4096, fp16) go in one-step splits of 32 keys, where 64
    # keys was the minimum for every width (on a 132-SM GPU, 2k keys of d1 = 14336 got 32 blocks).
    g = torch.Generator().manual_seed(11)
    keys = torch.nn.functional.normalize(torch.randn(300, 4096, generator=g), dim=1).half()
    keys[290] = keys[5]  # a tie across splits
    q = keys[[5]].float() + 0.01 * torch.randn(1, 4096, generator=g)
    values = torch.randn(300, 4, generator=g).half()
    res, info = run_emulated(runner, q, keys, values, 0.5, sms=132)
    assert "splits=10 per=32 " in info + " "
    assert_matches_reference(res, q, keys, values, 0.5)
    assert res[1][0].item() == 5
