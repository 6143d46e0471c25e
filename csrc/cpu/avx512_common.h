// What the AVX-512 and AMX scan files share: the target attributes and the key loaders (16 fp32 lanes per load).
// Every function carries a target attribute instead of its file being compiled for AVX-512, so the library still
// loads and runs on CPUs without it.
#pragma once

#include "cpu_kernels.h"

#ifdef NEURALDB_X86
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstring>

#define NDB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define NDB_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace neuraldb {
namespace cpu {
namespace avx512 {

constexpr int kLanes = 16;

NDB_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u);
}

struct F16 {
  using T = uint16_t;
  NDB_AVX512 static inline __m512 load(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  NDB_AVX512 static inline __m512 load(const T* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};
struct BF16 {
  using T = uint16_t;
  NDB_AVX512 static inline __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  NDB_AVX512 static inline __m512 load(const T* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  NDB_AVX512 static inline __m512 load(const T* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};
struct F32 {
  using T = float;
  NDB_AVX512 static inline __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  NDB_AVX512 static inline __m512 load(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};

}  // namespace avx512
}  // namespace cpu
}  // namespace neuraldb
#endif  // NEURALDB_X86
