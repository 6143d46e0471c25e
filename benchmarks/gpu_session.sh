#!/usr/bin/env bash
# One GPU session's checks, in order of what the project needs from a GPU, each with its own time limit so that one
# hang cannot cost the others, and the last ones cut off first by a 10-minute device call:
#   1. build the CUDA extension in the background while tests/test_gpu.py runs for Triton (~3 min);
#   2. the Llama-3-8B-shaped decode step captured in CUDA graphs, patched (Triton, CUDA) against unpatched, m = 0 to
#      1M (issue 6's floor target: in a replayed graph the patch adds its kernels' device time and no host time);
#   3. tests/test_gpu.py for the CUDA kernel;
#   4. the eager decode steps with each backend paired (in a launch-bound eager step the host time is what the patch
#      adds), the op table at the targets (with the exact cascade's column), the host time of each layer of
#      the patched path;
#   5. the Triton cascade against the plain Triton scan at 2k-1M keys (issue 27): its table goes to bench.log only.
# OUTDIR gets 8 files (the device tool returns at most 8): env.txt, build.log, tests.log, bench.log and four JSON
# results.
# The 1M-fact points of 8B width peak at ~75 GB (the database doubling its buffers next to a 16 GB model): on the
# device tool, name nvidia-h200.
#   bash benchmarks/gpu_session.sh [OUTDIR]        (OUTDIR defaults to benchmarks/results/gpu_session)
set -u
OUTDIR=${1:-benchmarks/results/gpu_session}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
ROOT=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/neuraldb-triton-cache}
WORK=$(mktemp -d)

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    "$PY" -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
    nvcc --version | tail -2
    nproc
} >"$OUTDIR/env.txt" 2>&1

# Built outside the tree and copied in after the Triton tests, so no test process sees a half-written _C.
(
    NEURALDB_CUDA_ARCHS=${NEURALDB_CUDA_ARCHS:-90} MAX_JOBS=$(nproc) timeout 240 \
        "$PY" setup.py build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp"
    echo "build rc=$?"
) >"$OUTDIR/build.log" 2>&1 &
build_pid=$!

timeout 170 "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 120 tests/test_gpu.py -k triton \
    >"$OUTDIR/tests.log" 2>&1
echo "pytest triton rc=$?" >>"$OUTDIR/tests.log"

wait "$build_pid"
cp "$WORK"/lib/neuraldb_kernels/_C*.so neuraldb_kernels/ 2>>"$OUTDIR/build.log"

# The graphs need the built kernel for the CUDA variant; captures warm up first, so Triton autotunes outside them.
# 100 pairs: at 2k facts the floor is ~0.04 ms, and a replayed step varies by a few hundredths of a ms (~60 s of replays).
timeout 200 "$PY" benchmarks/bench_overhead.py --model llama3-8b-shape --device cuda --scenarios graph_b1,graph_b8 \
    --m 0,2000,10000,20000,100000,1000000 --backend triton,cuda --reps 100 --out "$OUTDIR/overhead_graph.json" \
    >"$OUTDIR/bench.log" 2>&1
echo "overhead graph rc=$?" >>"$OUTDIR/bench.log"

timeout 100 "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 90 tests/test_gpu.py -k "not triton or auto_picks" \
    >>"$OUTDIR/tests.log" 2>&1
echo "pytest cuda rc=$?" >>"$OUTDIR/tests.log"

timeout 200 "$PY" benchmarks/bench_overhead.py --model llama3-8b-shape --device cuda --m 0,2000,10000,20000,100000,1000000 \
    --scenarios decode_b1,decode_b8 --backend triton,cuda,auto --reps 30 --out "$OUTDIR/overhead_backends.json" \
    >>"$OUTDIR/bench.log" 2>&1
echo "overhead backends rc=$?" >>"$OUTDIR/bench.log"

timeout 170 "$PY" benchmarks/gpu_op_table.py --T 1 8 16 2048 --m 100000 --d1 14336 --out "$OUTDIR/op_table.json" \
    >>"$OUTDIR/bench.log" 2>&1
echo "op table rc=$?" >>"$OUTDIR/bench.log"

# 90 s: the first Triton call autotunes.
timeout 90 "$PY" benchmarks/experiments/host_overhead.py --device cuda --calls 300 --out "$OUTDIR/host_overhead.json" \
    >>"$OUTDIR/bench.log" 2>&1
echo "host overhead rc=$?" >>"$OUTDIR/bench.log"
# JSON kept out of OUTDIR (8 files at most); the 1M point needs ~46 GB (keys, values, sketches).
timeout 150 "$PY" benchmarks/gpu_op_table.py --T 1 8 --m 2000 10000 100000 1000000 --d1 14336 \
    --peers triton cascade read_probe --out "$WORK/op_table_cascade.json" >>"$OUTDIR/bench.log" 2>&1
echo "op table cascade rc=$?" >>"$OUTDIR/bench.log"
rm -rf "$WORK"
