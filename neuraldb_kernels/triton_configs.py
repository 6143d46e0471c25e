"""The Triton scan's tile configs: the autotuning candidates per kind of call (row, decode, prefill), their pruning
by register budget, the buckets of the autotuning key, and the fixed configs used without autotuning.

Kept apart from :mod:`neuraldb_kernels.triton_kernel` (the kernels and the launcher), which tunes its scan over them.
"""

from __future__ import annotations

import triton

from neuraldb_kernels import config


def t_bucket(t: int) -> int:
    """The autotuning bucket of T: 1, 16 (2-16, decode), then 64, 256, 1024, 4096 (prefill; >= 1025 -> 4096).

    Example::

        >>> t_bucket(8), t_bucket(300)
        (16, 1024)
    """
    if t <= 1:
        return 1
    if t <= 16:
        return 16
    for b in (64, 256, 1024):
        if t <= b:
            return b
    return 4096


def _cfg(bt: int, bn: int, bd: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


# 2 <= T <= 16: one 16-row query block per program, tensor cores, memory-bound on the keys (cp.async pipelined).
_CONFIGS_DECODE = [
    _cfg(16, bn, bd, w, s)
    for bn, bd, w, s in (
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (64, 128, 8, 4),
        (128, 64, 4, 3),
        (128, 64, 8, 4),
        (128, 128, 4, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 4),
        (64, 64, 8, 3),  # what fp32 keys keep (see _prune)
    )
]
# T == 1: fp32 multiply-adds over (BLOCK_N, BLOCK_D) key tiles (BLOCK_T = 1; Triton does not software-pipeline
# these plain loads, occupancy hides the latency) or the decode path with 15 padded rows; the autotuner picks.
_CONFIGS_ROW = [
    _cfg(1, bn, bd, w, 3) for bn, bd, w in ((16, 512, 8), (32, 256, 8), (64, 128, 4), (32, 512, 8))
] + _CONFIGS_DECODE[::2]
# T > 16: a GEMM with a max/argmax epilogue; compute-bound at T in the thousands.
_CONFIGS_PREFILL = [
    _cfg(bt, bn, bd, w, s)
    for bt, bn, bd, w in (
        (64, 128, 64, 4),
        (64, 128, 64, 8),
        (128, 128, 64, 8),
        (64, 256, 64, 8),
        (128, 128, 32, 8),
        (32, 64, 64, 4),
    )
    for s in (3, 4)
] + [
    _cfg(
        128, 256, 32, 8, 4
    ),  # the fastest on an H200 (benchmarks/experiments/triton_config_sweep.py) that does not spill
    _cfg(64, 64, 32, 8, 3),  # for fp32 keys (the ieee dot runs on FMA units; see _prune)
]
# What the autotuner chooses from, per scan path.
_CONFIGS = {"row": _CONFIGS_ROW, "decode": _CONFIGS_DECODE, "prefill": _CONFIGS_PREFILL}
# The fixed configs used under the interpreter (each inner-loop iteration costs ~1 ms there: big tiles).
_INTERPRET_CONFIG = {
    "row": {"BLOCK_T": 1, "BLOCK_N": 64, "BLOCK_D": 256},
    "decode": {"BLOCK_T": 16, "BLOCK_N": 64, "BLOCK_D": 256},
    "prefill": {"BLOCK_T": 32, "BLOCK_N": 64, "BLOCK_D": 256},
}
# Per-thread budget, in fp32 values, of the accumulators (dot paths) or the upcast key tile (T == 1 path): beyond
# it ptxas spills on sm_90 (checked by compiling every config for sm_90 without a GPU). The exception: two
# warpgroups hold one 128 x 256 accumulator (128 values per thread) without spilling, but not the hi/lo pair.
_MAX_TILE_REGS = 64
_MAX_WIDE_ACC_REGS = 128


def _prune(configs, named_args, **kwargs):
    """Drop configs that only compute padding (row blocks taller than the T bucket) or would spill registers:
    the hi/lo split keeps two accumulators, and fp32 keys (ieee dot on FMA units) want small tiles over 8 warps in at
    most 3 stages (on sm_90 under Triton 3.8, with half-precision queries a 16 x 64 x 64 tile spills 232-272 bytes on
    4 warps and 32 x 64 x 64 spills 224 on 8; 16 x 64 x 64 and 64 x 64 x 32 on 8 warps in 3 stages do not)."""
    args = {**named_args, **kwargs}
    bucket = args.get("T_BUCKET", 4096)
    accs = 2 if args.get("SPLIT_Q") else 1
    kept = []
    for c in configs:
        bt, bn, bd = c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]
        threads = 32 * c.num_warps
        if bt > max(64, bucket):
            continue
        if bt == 1 and bn * bd > _MAX_TILE_REGS * threads:
            continue
        wide = accs == 1 and c.num_warps == 8
        if bt > 1 and accs * bt * bn > (_MAX_WIDE_ACC_REGS if wide else _MAX_TILE_REGS) * threads:
            continue
        ieee_spills = c.num_warps < 8 or c.num_stages > 3 or bn * bd > 64 * 64 or bt * bn > 64 * 64
        if args.get("IEEE") and bt > 1 and ieee_spills:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"])]


# Triton adds the dtypes of the tensor arguments. The split bucket is there because the best tile depends on how many
# keys a program scans: tuned once on 16-key splits (2k keys of d1 = 14336), the T = 1 scan then took 1.25x the read
# floor at 100k-1M keys on an H200, where a config tuned on 64-key splits took 0.95-0.99x.
_AUTOTUNE_KEY = ["T_BUCKET", "D1", "SPLIT_BUCKET"]


# Without autotuning (NEURALDB_TRITON_AUTOTUNE=0: CI, quick tests) the first config of these that survives the
# pruning runs. The prefill head is the fastest fp16 config measured on an H200; the rest are educated guesses.
_DEFAULT_CONFIGS = {
    "row": [_cfg(1, 32, 256, 8, 3), _cfg(16, 64, 64, 4, 3)],
    "decode": [_cfg(16, 128, 64, 4, 3), _cfg(16, 64, 64, 4, 3), _cfg(16, 64, 64, 8, 3)],
    "prefill": [
        _cfg(128, 256, 32, 8, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(64, 128, 64, 8, 3),
        _cfg(32, 64, 64, 4, 3),
        _cfg(64, 64, 32, 8, 3),
    ],
}


def split_bucket(keys_per_split: int) -> int:
    """The autotuning bucket of a split's length: the power of two at or above it, from 16 to 2048.

    Example::

        >>> split_bucket(16), split_bucket(192), split_bucket(1904), split_bucket(5000)
        (16, 256, 2048, 2048)
    """
    return min(2048, max(16, 1 << (max(1, keys_per_split) - 1).bit_length()))


def _autotuning() -> bool:
    return config.current().triton_autotune
