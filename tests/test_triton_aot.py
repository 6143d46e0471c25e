"""The Triton kernels compiled ahead of time for Hopper (sm_90) and Ampere (sm_80), without a GPU.

``triton.compile`` with an explicit target lowers to PTX and runs Triton's bundled ptxas, so a kernel or config
that does not lower (bad tl.dot shapes, dtype mixes, shared-memory overflow) fails here on CPU-only CI rather than
on the first GPU run. Checked per scan path: the MMA kind (wgmma on sm_90, mma.sync on sm_80), that the loads are
software-pipelined (cp.async), and that the default configs do not spill registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for real GPUs; meaningless under the interpreter", allow_module_level=True)

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from neuraldb_kernels import triton_kernel as tk

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (NVIDIA_BIN / "ptxas").exists(), reason="triton without its bundled ptxas")

# Pointer alignment and 16-divisible sizes/strides, as the JIT specialises a d1 = 4096 call.
_DIV16_SCAN = (0, 1, 2, 3, 4, 7, 8, 9, 10)


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run(
            [str(NVIDIA_BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, out
    return {"reg": int(m[1]), "stack": int(m[2]), "local": int(m[4])}


def _modes(qdt, kdt):
    """(SPLIT_Q, IEEE) as the wrapper sets them for these dtype names."""
    import torch

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return tk._split_q(dt[qdt], dt[kdt]), kdt == "fp32"


def compile_scan(arch, qdt, kdt, config, *, bucket):
    split, ieee = _modes(qdt, kdt)
    sig = {
        "q_ptr": f"*{qdt}",
        "nrm_ptr": "*fp32",
        "k_ptr": f"*{kdt}",
        "ps_ptr": "*fp32",
        "pi_ptr": "*i32",
        "T": "i32",
        "M": "i32",
        "D1": "i32",
        "stride_q": "i32",
        "stride_k": "i32",
        "keys_per_split": "i32",
        "SPLIT_BUCKET": "i32",
    }
    consts = dict(T_BUCKET=bucket, SPLIT_Q=split, LO_SCALE=2048.0, UPCAST=False, IEEE=ieee, **config.kwargs)
    sig.update({k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in _DIV16_SCAN}
    src = ASTSource(tk._scan_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


def default_config(kind, qdt, kdt, bucket):
    split, ieee = _modes(qdt, kdt)
    return tk._prune(tk._DEFAULT_CONFIGS[kind], {}, T_BUCKET=bucket, SPLIT_Q=split, IEEE=ieee)[0]


@pytest.mark.parametrize("kind,bucket", [("row", 1), ("decode", 16), ("prefill", 4096)])
@pytest.mark.parametrize("qdt,kdt", [("fp16", "fp16"), ("bf16", "fp16"), ("fp32", "fp32"), ("fp16", "fp32")])
def test_default_configs_compile_for_hopper(kind, bucket, qdt, kdt):
    cfg = default_config(kind, qdt, kdt, bucket)
    k = compile_scan(90, qdt, kdt, cfg, bucket=bucket)
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    res = _resources(k.asm["cubin"])
    if cfg.kwargs["BLOCK_T"] > 1 and kdt != "fp32":
        assert "wgmma" in ptx, "the tensor-core path should use Hopper's wgmma"
        assert "async_copy_global_to_local" in ttgir, "key/query tiles should be cp.async-pipelined"
    assert res["local"] == 0 and res["stack"] == 0, f"{cfg} spills: {res}"


@pytest.mark.parametrize("qdt,kdt", [("bf16", "fp16"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp32")])
def test_every_decode_and_row_config_compiles_for_hopper_without_spills(qdt, kdt):
    # fp32 keys take the ieee dot, which spills on 4 warps: the pruning rule must drop those configs.
    split, ieee = _modes(qdt, kdt)
    for configs, bucket in ((tk._CONFIGS_DECODE, 16), (tk._CONFIGS_ROW, 1)):
        for cfg in tk._prune(configs, {}, T_BUCKET=bucket, SPLIT_Q=split, IEEE=ieee):
            res = _resources(compile_scan(90, qdt, kdt, cfg, bucket=bucket).asm["cubin"])
            assert res["local"] == 0 and res["stack"] == 0, f"{cfg} (T bucket {bucket}): {res}"


@pytest.mark.parametrize("qdt,kdt", [("fp16", "fp16"), ("bf16", "fp16"), ("bf16", "fp32"), ("fp32", "fp32")])
def test_every_prefill_config_compiles_for_hopper_without_spills(qdt, kdt):
    # The widest tiles hold 128 fp32 accumulators per thread: the pruning rule must drop those that spill.
    split, ieee = _modes(qdt, kdt)
    for cfg in tk._prune(tk._CONFIGS_PREFILL, {}, T_BUCKET=4096, SPLIT_Q=split, IEEE=ieee):
        res = _resources(compile_scan(90, qdt, kdt, cfg, bucket=4096).asm["cubin"])
        assert res["local"] == 0 and res["stack"] == 0, f"{cfg}: {res}"


def test_ampere_lowering():
    for kind, bucket in (("decode", 16), ("prefill", 4096)):
        cfg = default_config(kind, "fp16", "fp16", bucket)
        ptx = compile_scan(80, "fp16", "fp16", cfg, bucket=bucket).asm["ptx"]
        assert "mma.sync" in ptx


def test_finish_and_norm_kernels_compile():
    for qdt, vdt in (("bf16", "fp16"), ("fp32", "bf16"), ("fp16", "fp32")):
        sig = {
            "q_ptr": f"*{qdt}",
            "k_ptr": "*fp16",
            "v_ptr": f"*{vdt}",
            "ps_ptr": "*fp32",
            "pi_ptr": "*i32",
            "out_ptr": f"*{qdt}",
            "idx_ptr": "*i64",
            "score_ptr": "*fp32",
            "gamma": "fp32",
            "T": "i32",
            "M": "i32",
            "D1": "i32",
            "D2": "i32",
            "stride_q": "i32",
            "stride_k": "i32",
            "stride_v": "i32",
            "stride_o": "i32",
            "num_splits": "i32",
        }
        for closed_empty in (False, True):  # the plain op's contract, and the pre-filtered one's
            consts = {"EPS": 1e-12, "RNE_BF16": False, "CLOSED_EMPTY": closed_empty}
            consts.update(BLOCK_S=2048, BLOCK_D=1024, BLOCK_V=1024)
            sig.update({k: "constexpr" for k in consts})
            k = triton.compile(
                ASTSource(tk._finish_kernel, sig, constexprs=consts),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": 4},
            )
            assert _resources(k.asm["cubin"])["stack"] == 0
    sig = {
        "q_ptr": "*bf16",
        "nrm_ptr": "*fp32",
        "D1": "i32",
        "stride_q": "i32",
        "EPS": "constexpr",
        "BLOCK_D": "constexpr",
    }
    triton.compile(
        ASTSource(tk._norm_kernel, sig, constexprs={"EPS": 1e-12, "BLOCK_D": 1024}),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )


def compile_cascade(qdt, kdt, config, *, signs, bucket):
    from neuraldb_kernels import triton_cascade as tc

    split, ieee = _modes(qdt, kdt)
    ptrs = {"q_ptr": qdt, "nrm_ptr": "fp32", "k_ptr": kdt, "qn_ptr": "fp32", "q8_ptr": "fp16", "rc_ptr": "fp32"}
    ptrs.update(s32="fp32", s16="i16", s8="u8", k32="fp32", k16="i16", k8="u8", ps_ptr="fp32", pi_ptr="i32")
    sig = {name: f"*{dt}" for name, dt in ptrs.items()}
    sig["gamma"] = "fp32"
    for name in ("T", "M", "D1", "G", "stride_q", "stride_k", "stride_s32", "stride_s16", "stride_s"):
        sig[name] = "i32"
    for name in ("stride_k32", "stride_k16", "stride_sk", "keys_per_split"):
        sig[name] = "i32"
    consts = {"HAS_SIGNS": signs, "NOUT": tc.SIGN_OUTLIERS, "NCONST": tc._NCONST, "SPLIT_Q": split}
    consts["LO_SCALE"] = 2048.0
    consts.update(UPCAST=False, IEEE=ieee, STAGE_D=tc.stage_d(config.kwargs["BLOCK_T"]), **config.kwargs)
    sig.update({k: "constexpr" for k in consts})
    return triton.compile(
        ASTSource(tc._cascade_kernel, sig, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


@pytest.mark.parametrize("signs", [True, False])
@pytest.mark.parametrize("kind,bucket", [("row", 1), ("decode", 16)])
@pytest.mark.parametrize("qdt,kdt", [("fp16", "fp16"), ("bf16", "fp16")])
def test_cascade_compiles_for_hopper(signs, kind, bucket, qdt, kdt):
    # The cascade rescores with the plain scan's config (triton_kernel.plain_config), so it must lower with each
    # default config. Its bound stages spill at the 16-row decode config (stack ~1.2 KB at d1 chunks of 32): printed
    # for the GPU session to weigh, not asserted yet; the one-row config does not.
    cfg = default_config(kind, qdt, kdt, bucket)
    res = _resources(compile_cascade(qdt, kdt, cfg, signs=signs, bucket=bucket).asm["cubin"])
    print(f"cascade {kind} {qdt}/{kdt} signs={signs} {cfg}: {res}")
    if kind == "row":
        assert res["local"] == 0 and res["stack"] == 0, res
