// AVX2 + F16C + FMA key scan (8 fp32 lanes), chosen at run time on x86 CPUs without AVX-512.
// Every function that uses intrinsics carries the target attribute; nothing here is compiled for the whole
// file, so the rest of the library keeps running on any x86-64 CPU.
#include "cpu_kernels.h"

#ifdef NEURALDB_X86
#include <immintrin.h>

#include <cstring>

#define NDB_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace neuraldb {
namespace cpu {
namespace {

struct F16 {
  using T = uint16_t;
  NDB_AVX2 static inline __m256 load(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
struct BF16 {
  using T = uint16_t;
  NDB_AVX2 static inline __m256 load(const T* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};
struct F32 {
  using T = float;
  NDB_AVX2 static inline __m256 load(const T* p) { return _mm256_loadu_ps(p); }
};

// Loads the last n < 8 elements of a row, zero filled (no read past the row).
template <class K>
NDB_AVX2 inline __m256 load_tail(const typename K::T* p, int n) {
  typename K::T buf[8] = {};
  std::memcpy(buf, p, sizeof(typename K::T) * n);
  return K::load(buf);
}

NDB_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

constexpr int kLanes = 8;
constexpr int kQB = 4;  // query rows per tile; 16 ymm registers bound KB * QB + KB + 1

template <int QB>
constexpr int key_block() {
  return QB == 1 ? 6 : QB == 2 ? 4 : QB == 3 ? 3 : 2;
}

// KB keys x QB queries of full dot products; pf (may be null) is the next key block, prefetched meanwhile.
template <class K, int KB, int QB>
NDB_AVX2 inline void tile(const typename K::T* k, int64_t ks, const float* q, int64_t qs, int64_t d1,
                          const typename K::T* pf, float* out) {
  __m256 acc[KB][QB];
#pragma GCC unroll 8
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) acc[i][b] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d1; j += kLanes) {
    __m256 kv[KB];
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) kv[i] = K::load(k + i * ks + j);
    if (pf != nullptr && (j * sizeof(typename K::T)) % 64 == 0) {
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * ks + j), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) {
      const __m256 qv = _mm256_loadu_ps(q + b * qs + j);
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i) acc[i][b] = _mm256_fmadd_ps(kv[i], qv, acc[i][b]);
    }
  }
  if (j < d1) {
    const int n = static_cast<int>(d1 - j);
    __m256 kv[KB];
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) kv[i] = load_tail<K>(k + i * ks + j, n);
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) {
      const __m256 qv = _mm256_loadu_ps(q + b * qs + j);  // queries are zero padded to qs
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i) acc[i][b] = _mm256_fmadd_ps(kv[i], qv, acc[i][b]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) out[i * QB + b] = hsum(acc[i][b]);
}

template <class K, int QB>
NDB_AVX2 void scan_qb(const Problem& p, int64_t k0, int64_t k1, int64_t t0, float* best, int64_t* best_idx) {
  constexpr int KB = key_block<QB>();
  const auto* keys = static_cast<const typename K::T*>(p.keys);
  const float* q = p.q + t0 * p.qs;
  float sc[KB * QB];
  int64_t i0 = k0;
  for (; i0 + KB <= k1; i0 += KB) {
    const typename K::T* pf = i0 + 2 * KB <= k1 ? keys + (i0 + KB) * p.ks : nullptr;
    tile<K, KB, QB>(keys + i0 * p.ks, p.ks, q, p.qs, p.d1, pf, sc);
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b)
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i)
        if (beats(sc[i * QB + b], best[t0 + b])) {
          best[t0 + b] = sc[i * QB + b];
          best_idx[t0 + b] = i0 + i;
        }
  }
  for (; i0 < k1; ++i0) {
    tile<K, 1, QB>(keys + i0 * p.ks, p.ks, q, p.qs, p.d1, nullptr, sc);
    for (int b = 0; b < QB; ++b)
      if (beats(sc[b], best[t0 + b])) {
        best[t0 + b] = sc[b];
        best_idx[t0 + b] = i0;
      }
  }
}

template <class K>
NDB_AVX2 void scan(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx) {
  // Blocks of keys small enough to stay in L1 while every query block passes over them.
  const int64_t kblock = p.T <= kQB ? (k1 - k0) : 48;
  for (int64_t a = k0; a < k1; a += kblock) {
    const int64_t b = a + kblock < k1 ? a + kblock : k1;
    for (int64_t t0 = 0; t0 < p.T; t0 += kQB) {
      switch (p.T - t0 < kQB ? p.T - t0 : kQB) {
        case 1: scan_qb<K, 1>(p, a, b, t0, best, best_idx); break;
        case 2: scan_qb<K, 2>(p, a, b, t0, best, best_idx); break;
        case 3: scan_qb<K, 3>(p, a, b, t0, best, best_idx); break;
        default: scan_qb<K, 4>(p, a, b, t0, best, best_idx); break;
      }
    }
  }
}

template <class K>
NDB_AVX2 float dot(const Problem& p, int64_t t, int64_t i) {
  float s;
  tile<K, 1, 1>(static_cast<const typename K::T*>(p.keys) + i * p.ks, p.ks, p.q + t * p.qs, p.qs, p.d1, nullptr, &s);
  return s;
}

// One group of 64: the 32 code bytes' low nibbles are elements 0..31, the high ones 32..63.
NDB_AVX2 inline __m256 sketch_group(const uint8_t* codes, const int8_t* q, const int32_t* off, float sc, __m256 acc) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i lo = _mm256_and_si256(x, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
  const __m256i qlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i qhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
  // u8 x s8 pairs: at most 2 * 15 * 127, no int16 saturation.
  __m256i d = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, qlo), ones),
                               _mm256_madd_epi16(_mm256_maddubs_epi16(hi, qhi), ones));
  // Lane l holds bytes 4l..4l+3 of both halves: its offset is the sum of the two 16-lane entries l and l + 8.
  const __m256i o = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(off)),
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + 8)));
  d = _mm256_sub_epi32(d, o);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sc), acc);
}

// Two accumulators (even and odd groups) halve the chain of dependent multiply-adds per key.
NDB_AVX2 void sketch_scores(const SketchProblem& p, int64_t k0, int64_t k1, float* s) {
  const int64_t G = p.G;
  for (int64_t i = k0; i < k1; ++i) {
    const uint8_t* row = p.sketch + i * p.ss;
    const auto* scales = reinterpret_cast<const uint16_t*>(row + kSketchHeader);
    const uint8_t* codes = row + kSketchHeader + 2 * G;
    for (int64_t t = 0; t < p.T; ++t) {
      const int8_t* q = p.q8 + t * G * kSketchGroup;
      const float* qs = p.qscale + t * G;
      const int32_t* off = p.off + t * G * 16;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 2 <= G; g += 2) {
        acc0 = sketch_group(codes + g * 32, q + g * 64, off + g * 16, _cvtsh_ss(scales[g]) * qs[g], acc0);
        acc1 = sketch_group(codes + g * 32 + 32, q + g * 64 + 64, off + g * 16 + 16,
                            _cvtsh_ss(scales[g + 1]) * qs[g + 1], acc1);
      }
      if (g < G) acc0 = sketch_group(codes + g * 32, q + g * 64, off + g * 16, _cvtsh_ss(scales[g]) * qs[g], acc0);
      s[(i - k0) * p.T + t] = hsum(_mm256_add_ps(acc0, acc1));
    }
  }
}

// 1-bit sign sketch (the first stage of the cascade). Per 32 bits: the bits are spread to one per byte (vpshufb
// copies each byte of them over 8 lanes, vpcmpeqb against the lane's own bit), pick the query codes stored + 128 and
// 128 elsewhere, and vpsadbw sums them: sum_set q8 + 128 * 32 whatever the bits.
static_assert(kSignOutliers % 8 == 0, "the outliers go in gathers of 8");
NDB_AVX2 void sign_pass(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass) {
  constexpr int64_t kAhead = 8;  // rows prefetched ahead
  const int64_t G = p.G;
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                          3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i mid = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i zero = _mm256_setzero_si256();
  const __m256i qmax = _mm256_set1_epi32(static_cast<int>(p.qs - 1));
  for (int64_t i = k0; i < k1; ++i) {
    const uint8_t* row = p.signs + i * p.ss;
    if (i + kAhead < k1) {
      const char* next = reinterpret_cast<const char*>(row + kAhead * p.ss);
      for (int64_t b = 0; b < p.ss; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
      _mm_prefetch(next + p.ss - 1, _MM_HINT_T0);
    }
    const uint16_t* oidx = reinterpret_cast<const uint16_t*>(row + kSignHeader);
    const uint16_t* oval = oidx + kSignOutliers;
    const uint8_t* bits = row + kSignHeader + 4 * kSignOutliers;
    for (int64_t t = 0; t < p.T; ++t) {
      const uint8_t* qu = p.qu + t * G * 64;
      __m256i acc = zero;
      for (int64_t h = 0; h < 2 * G; ++h) {
        int32_t b;
        std::memcpy(&b, bits + 4 * h, sizeof b);
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(b), spread), bit), bit);
        const __m256i x = _mm256_blendv_epi8(mid, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qu + 32 * h)), set);
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(x, zero));
      }
      const __m128i a2 = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
      const int64_t pos = _mm_cvtsi128_si64(a2) + _mm_extract_epi64(a2, 1) - 128 * 64 * G;
      const float* q = p.q + t * p.qs;
      __m256 s1 = _mm256_setzero_ps();
      for (int o = 0; o < kSignOutliers; o += 8) {
        // Clamped so a malformed row cannot read outside the query row.
        const __m256i j = _mm256_min_epu32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(oidx + o))), qmax);
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(oval + o)));
        s1 = _mm256_fmadd_ps(_mm256_i32gather_ps(q, j, 4), v, s1);
      }
      if (sign_bound_passes(p, row, t, static_cast<int32_t>(2 * pos - p.qsum[t]), hsum(s1))) {
        pass.push_back(i);
        pass.push_back(t);
      }
    }
  }
}

}  // namespace

void sketch_scores_avx2(const SketchProblem& p, int64_t k0, int64_t k1, float* s) { sketch_scores(p, k0, k1, s); }

void sign_pass_avx2(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass) {
  sign_pass(p, k0, k1, pass);
}

void scan_avx2(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx) {
  with_key_loader<F16, BF16, F32>(p.key_type, [&](auto k) { scan<decltype(k)>(p, k0, k1, best, best_idx); });
}

float dot_avx2(const Problem& p, int64_t t, int64_t i) {
  return with_key_loader<F16, BF16, F32>(p.key_type, [&](auto k) { return dot<decltype(k)>(p, t, i); });
}

}  // namespace cpu
}  // namespace neuraldb
#endif  // NEURALDB_X86
