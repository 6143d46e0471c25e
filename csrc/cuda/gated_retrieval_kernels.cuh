// Device code of the CUDA gated_retrieval kernel (csrc/cuda/gated_retrieval_cuda.cu holds the host side).
// Kept in a header so that csrc/cuda/emulate/ can compile the very same kernels as host code and run them on a CPU
// (tests/test_gpu_emulated.py): it only needs what fake_cuda.h provides there.
//
//   1. normalize_kernel: qn = q / max(||q||, 1e-12) in fp32, rows padded to a multiple of 8 floats and to a whole
//      number of query-row blocks (padding is zero), so the scan reads it with aligned 128-bit loads.
//   2. scan_kernel<KeyT, TQ, VEC>, grid (row blocks, splits): each block takes TQ query rows and a contiguous range
//      of keys. Each warp scores kKeysPerWarp keys at a time: a lane reads 8 key elements with one 128-bit load per
//      key (VEC: d1 % 8 == 0 and aligned rows; otherwise one element per lane and step), upcasts them to fp32 and
//      accumulates qn . key in fp32; a warp-shuffle sum finishes each dot product. Each warp keeps a running
//      (max, first index) per row; a warp-shuffle max/argmax across the warps (lowest index on ties) gives the
//      block's pair, written to the per-split workspace.
//   3. finish_kernel<ValueT, OutT>, one block per query row: reduces the splits' pairs (max, then lowest index),
//      applies the strict gate score > gamma (gamma rounded to fp32, as torch compares an fp32 tensor with a
//      Python float) and writes values[idx] cast to the queries' dtype, or zeros.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifndef NEURALDB_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace neuraldb {
namespace cuda_detail {

constexpr int kWarp = 32;
constexpr int kScanWarps = 8;
constexpr int kScanThreads = kScanWarps * kWarp;
constexpr int kKeysPerWarp = 4;
constexpr int kKeysPerStep = kScanWarps * kKeysPerWarp;  // keys a block scores per outer step
constexpr int kNormThreads = 256;
constexpr int kFinishThreads = 256;
constexpr float kNormEps = 1e-12f;
constexpr int32_t kNoIndex = std::numeric_limits<int32_t>::max();
// Splits: aim for kWaves blocks per SM in all, none shorter than kMinSplitBytes of keys nor one step of keys; narrow
// rows keep the old two-step minimum (the byte rule was measured at d1 = 14336 only). In bytes: at d1 = 14336 a 64-key
// minimum left 2k-10k keys 32-157 blocks on an H200's 132 SMs.
constexpr int64_t kWaves = 4;
constexpr int64_t kMinSplitBytes = 128 * 1024;
constexpr int64_t kMinSplitKeysCap = 2 * kKeysPerStep;
constexpr int64_t kMaxSplits = 4096;

// The launch geometry for T query rows over m > 0 keys of width d1 (key_bytes bytes a row) on a device with `sms`
// multiprocessors.
struct Plan {
  int tq;              // query rows per scan block: 1, 2, 4, 8 or 16
  int64_t row_blocks;  // ceil(T / tq)
  int64_t ldq;         // row stride of the normalised queries: d1 rounded up to 8 floats
  int64_t splits;      // key ranges, one per block column
  int64_t per;         // keys per range, a multiple of kKeysPerStep
};

inline Plan make_plan(int64_t t_rows, int64_t m, int64_t d1, int64_t key_bytes, int64_t sms) {
  Plan p{};
  p.tq = t_rows <= 1 ? 1 : t_rows == 2 ? 2 : t_rows <= 4 ? 4 : t_rows <= 8 ? 8 : 16;
  p.row_blocks = (t_rows + p.tq - 1) / p.tq;
  p.ldq = (d1 + 7) / 8 * 8;
  int64_t splits = (kWaves * sms + p.row_blocks - 1) / p.row_blocks;
  const int64_t row_bytes = std::max<int64_t>(1, key_bytes);
  const int64_t min_keys =
      std::min(kMinSplitKeysCap, std::max<int64_t>(kKeysPerStep, (kMinSplitBytes + row_bytes - 1) / row_bytes));
  splits = std::max<int64_t>(1, std::min({splits, (m + min_keys - 1) / min_keys, kMaxSplits}));
  p.per = (m + splits - 1) / splits;
  p.per = (p.per + kKeysPerStep - 1) / kKeysPerStep * kKeysPerStep;
  p.splits = (m + p.per - 1) / p.per;
  return p;
}

// Whether the scan may read the keys with 16-byte vector loads.
inline bool can_vectorize(const void* keys, int64_t ldk, int64_t d1) {
  return d1 % 8 == 0 && ldk % 8 == 0 && reinterpret_cast<uintptr_t>(keys) % 16 == 0;
}

// ----------------------------------------------------------------------------------------------------------------
// Loads: V consecutive elements upcast to fp32.

template <typename T>
struct Load8;  // 8 elements from a 16-byte aligned address

template <>
struct Load8<c10::Half> {
  static __device__ __forceinline__ void run(const c10::Half* p, float (&f)[8]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
};

template <>
struct Load8<c10::BFloat16> {
  static __device__ __forceinline__ void run(const c10::BFloat16* p, float (&f)[8]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
};

template <>
struct Load8<float> {
  static __device__ __forceinline__ void run(const float* p, float (&f)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
    f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  }
};

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[V]) {
  if constexpr (V == 8) {
    Load8<T>::run(p, f);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = static_cast<float>(p[i]);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Reductions.

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;  // identical in every lane: each butterfly step adds the same two operands
}

// (score, index) order: higher score first, then lower index.
__device__ __forceinline__ void take_better(float& b, int32_t& i, float ob, int32_t oi) {
  if (ob > b || (ob == b && oi < i)) {
    b = ob;
    i = oi;
  }
}

__device__ __forceinline__ void warp_argmax(float& b, int32_t& i) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, b, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    take_better(b, i, ob, oi);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Kernels.

template <typename QT>
__global__ void __launch_bounds__(kNormThreads)
    normalize_kernel(const QT* __restrict__ q, int64_t ldq_in, int64_t t_rows, int64_t d1, float* __restrict__ qn,
                     int64_t ldq) {
  const int64_t t = blockIdx.x;
  float* dst = qn + t * ldq;
  if (t >= t_rows) {  // padding row of the last row block
    for (int64_t j = threadIdx.x; j < ldq; j += blockDim.x) dst[j] = 0.f;
    return;
  }
  const QT* src = q + t * ldq_in;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < d1; j += blockDim.x) {
    const float x = static_cast<float>(src[j]);
    ss = fmaf(x, x, ss);
  }
  __shared__ float partial[kNormThreads / kWarp];
  ss = warp_sum(ss);
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kNormThreads / kWarp; ++w) total += partial[w];
  // Correctly rounded sqrt and division even under --use_fast_math: the reference divides elementwise.
  const float nrm = fmaxf(__fsqrt_rn(total), kNormEps);
  for (int64_t j = threadIdx.x; j < ldq; j += blockDim.x) {
    dst[j] = j < d1 ? __fdiv_rn(static_cast<float>(src[j]), nrm) : 0.f;
  }
}

template <typename KT, int TQ, bool VEC>
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(const float* __restrict__ qn, int64_t ldq, const KT* __restrict__ keys, int64_t ldk, int64_t m,
                int64_t d1, int64_t keys_per_split, int64_t t_rows, float* __restrict__ part_score,
                int32_t* __restrict__ part_idx) {
  constexpr int V = VEC ? 8 : 1;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * TQ;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * keys_per_split;
  const int64_t end = min(start + keys_per_split, m);
  const float* q = qn + row0 * ldq;

  float best[TQ];
  int32_t best_i[TQ];
#pragma unroll
  for (int t = 0; t < TQ; ++t) {
    best[t] = -INFINITY;
    best_i[t] = kNoIndex;
  }

  // Warp w scores keys base .. base + kKeysPerWarp - 1, base = start + w * kKeysPerWarp + s * kKeysPerStep: each
  // warp sees its keys in increasing order, so a strict ">" keeps the first index on ties.
  for (int64_t base = start + warp * kKeysPerWarp; base < end; base += kKeysPerStep) {
    const KT* kp[kKeysPerWarp];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
      const int64_t key = base + j < end ? base + j : base;  // out-of-range slots re-read a valid row
      kp[j] = keys + key * ldk;
    }
    float acc[kKeysPerWarp][TQ];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j)
#pragma unroll
      for (int t = 0; t < TQ; ++t) acc[j][t] = 0.f;

    for (int64_t e = static_cast<int64_t>(lane) * V; e < d1; e += kWarp * V) {
      float kv[kKeysPerWarp][V];
#pragma unroll
      for (int j = 0; j < kKeysPerWarp; ++j) load_vec<KT, V>(kp[j] + e, kv[j]);
#pragma unroll
      for (int t = 0; t < TQ; ++t) {
        float qv[V];
        load_vec<float, V>(q + t * ldq + e, qv);
#pragma unroll
        for (int j = 0; j < kKeysPerWarp; ++j)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[j][t] = fmaf(kv[j][v], qv[v], acc[j][t]);
      }
    }

#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
      const bool ok = base + j < end;
#pragma unroll
      for (int t = 0; t < TQ; ++t) {
        const float s = warp_sum(acc[j][t]);
        // Non-finite scores never win (the op's contract; NaN already fails ">").
        if (ok && s > best[t] && s < INFINITY) {
          best[t] = s;
          best_i[t] = static_cast<int32_t>(base + j);
        }
      }
    }
  }

  // Across the warps (their keys interleave, so ties go to the lower index explicitly).
  __shared__ float s_best[TQ][kScanWarps];
  __shared__ int32_t s_idx[TQ][kScanWarps];
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < TQ; ++t) {
      s_best[t][warp] = best[t];
      s_idx[t][warp] = best_i[t];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int t = 0; t < TQ; ++t) {
      float b = lane < kScanWarps ? s_best[t][lane] : -INFINITY;
      int32_t i = lane < kScanWarps ? s_idx[t][lane] : kNoIndex;
      warp_argmax(b, i);
      if (lane == 0 && row0 + t < t_rows) {
        part_score[blockIdx.y * t_rows + row0 + t] = b;
        part_idx[blockIdx.y * t_rows + row0 + t] = i;
      }
    }
  }
}

template <typename VT, typename OT>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const float* __restrict__ part_score, const int32_t* __restrict__ part_idx, int64_t splits,
                  int64_t t_rows, int64_t m, const VT* __restrict__ values, int64_t ldv, int64_t d2, float gamma,
                  OT* __restrict__ out, int64_t ldo, int64_t* __restrict__ idx_out, float* __restrict__ score_out) {
  const int64_t t = blockIdx.x;
  float b = -INFINITY;
  int32_t i = kNoIndex;
  for (int64_t s = threadIdx.x; s < splits; s += blockDim.x) {
    take_better(b, i, part_score[s * t_rows + t], part_idx[s * t_rows + t]);
  }
  __shared__ float s_best[kFinishThreads / kWarp];
  __shared__ int32_t s_idx[kFinishThreads / kWarp];
  warp_argmax(b, i);
  if (threadIdx.x % kWarp == 0) {
    s_best[threadIdx.x / kWarp] = b;
    s_idx[threadIdx.x / kWarp] = i;
  }
  __syncthreads();
  b = s_best[0];
  i = s_idx[0];
#pragma unroll
  for (int w = 1; w < kFinishThreads / kWarp; ++w) take_better(b, i, s_best[w], s_idx[w]);

  // No index: every score was non-finite (a non-finite query row). The contract's answer is (-1, -inf, zeros).
  const bool valid = i >= 0 && i < m;
  const bool gate = valid && b > gamma;
  if (threadIdx.x == 0) {
    idx_out[t] = valid ? i : -1;
    score_out[t] = valid ? b : -INFINITY;
  }
  const VT* src = values + (valid ? static_cast<int64_t>(i) : 0) * ldv;
  OT* dst = out + t * ldo;
  for (int64_t c = threadIdx.x; c < d2; c += blockDim.x) {
    dst[c] = gate ? static_cast<OT>(static_cast<float>(src[c])) : static_cast<OT>(0.f);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// The launch sequence, shared by the CUDA host code and the CPU emulation. `launch(kernel, grid, block, args...)`
// runs one kernel (on the current stream there, on CPU threads in the emulation).

template <typename KT, int TQ, typename Launch>
void launch_scan(Launch& launch, bool vec, dim3 grid, const float* qn, int64_t ldq, const KT* keys, int64_t ldk,
                 int64_t m, int64_t d1, int64_t per, int64_t t_rows, float* ps, int32_t* pi) {
  if (vec) {
    launch(scan_kernel<KT, TQ, true>, grid, dim3(kScanThreads), qn, ldq, keys, ldk, m, d1, per, t_rows, ps, pi);
  } else {
    launch(scan_kernel<KT, TQ, false>, grid, dim3(kScanThreads), qn, ldq, keys, ldk, m, d1, per, t_rows, ps, pi);
  }
}

// Workspace: qn (p.row_blocks * p.tq, p.ldq) fp32, ps (p.splits, t_rows) fp32, pi (p.splits, t_rows) int32.
// Requires t_rows > 0 and m > 0 (the callers handle the empty cases).
template <typename QT, typename KT, typename VT, typename Launch>
void run_gated_retrieval(Launch&& launch, const Plan& p, const QT* q, int64_t ldq_in, int64_t t_rows, int64_t d1,
                         const KT* keys, int64_t ldk, int64_t m, const VT* values, int64_t ldv, int64_t d2,
                         float gamma, float* qn, float* ps, int32_t* pi, QT* out, int64_t ldo, int64_t* idx,
                         float* score) {
  launch(normalize_kernel<QT>, dim3(static_cast<unsigned>(p.row_blocks * p.tq)), dim3(kNormThreads), q, ldq_in,
         t_rows, d1, qn, p.ldq);
  const bool vec = can_vectorize(keys, ldk, d1);
  const dim3 grid(static_cast<unsigned>(p.row_blocks), static_cast<unsigned>(p.splits));
  switch (p.tq) {
    case 1:
      launch_scan<KT, 1>(launch, vec, grid, qn, p.ldq, keys, ldk, m, d1, p.per, t_rows, ps, pi);
      break;
    case 2:
      launch_scan<KT, 2>(launch, vec, grid, qn, p.ldq, keys, ldk, m, d1, p.per, t_rows, ps, pi);
      break;
    case 4:
      launch_scan<KT, 4>(launch, vec, grid, qn, p.ldq, keys, ldk, m, d1, p.per, t_rows, ps, pi);
      break;
    case 8:
      launch_scan<KT, 8>(launch, vec, grid, qn, p.ldq, keys, ldk, m, d1, p.per, t_rows, ps, pi);
      break;
    default:
      launch_scan<KT, 16>(launch, vec, grid, qn, p.ldq, keys, ldk, m, d1, p.per, t_rows, ps, pi);
  }
  launch(finish_kernel<VT, QT>, dim3(static_cast<unsigned>(t_rows)), dim3(kFinishThreads), ps,
         static_cast<const int32_t*>(pi), p.splits, t_rows, m, values, ldv, d2, gamma, out, ldo, idx, score);
}

}  // namespace cuda_detail
}  // namespace neuraldb
