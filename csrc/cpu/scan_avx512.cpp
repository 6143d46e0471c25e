// AVX-512 key scans, chosen at run time: the exact fp32 scan (16 lanes; keys converted on load; register tiles of
// up to 8 queries) and its dot, the int4 sketch scores and the 1-bit sign pass of the pre-filtered op. The AMX bf16
// pre-filter, which rescores its candidates with dot_avx512, is in scan_amx.cpp.
#include "avx512_common.h"

#ifdef NEURALDB_X86
namespace neuraldb {
namespace cpu {
namespace {

using namespace avx512;

// ------------------------------------------------------------------------------------------------
// Exact fp32 scan
// ------------------------------------------------------------------------------------------------
constexpr int kQB = 8;  // query rows per register tile

// Keys per tile for QB queries: KB * QB accumulators + KB keys + 1 query fit the 32 zmm registers.
template <int QB>
constexpr int key_block() {
  return QB <= 2 ? 8 : QB <= 4 ? 6 : QB <= 6 ? 4 : 3;
}

// KB keys x QB queries of full-length dot products, one accumulator per pair (so every pair is summed in the
// same order as dot()). pf, when not null, is the next tile's first key, prefetched while this one runs.
template <class K, int KB, int QB>
NDB_AVX512 inline void tile(const typename K::T* k, int64_t ks, const float* q, int64_t qs, int64_t d1,
                            const typename K::T* pf, float* out) {
  __m512 acc[KB][QB];
#pragma GCC unroll 8
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) acc[i][b] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d1; j += kLanes) {
    __m512 kv[KB];
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) kv[i] = K::load(k + i * ks + j);
    if (pf != nullptr && (j * sizeof(typename K::T)) % 64 == 0) {
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * ks + j), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) {
      __m512 qv = _mm512_loadu_ps(q + b * qs + j);
      // Keep the query in a register: GCC otherwise folds one load of it into each of the KB multiply-adds.
      if (KB > 1) asm("" : "+v"(qv));
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i) acc[i][b] = _mm512_fmadd_ps(kv[i], qv, acc[i][b]);
    }
  }
  if (j < d1) {
    const __mmask16 m = tail_mask(d1 - j);
    __m512 kv[KB];
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) kv[i] = K::load(k + i * ks + j, m);
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) {
      const __m512 qv = _mm512_loadu_ps(q + b * qs + j);  // queries are zero padded to qs
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i) acc[i][b] = _mm512_fmadd_ps(kv[i], qv, acc[i][b]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b) out[i * QB + b] = _mm512_reduce_add_ps(acc[i][b]);
}

template <class K, int QB>
NDB_AVX512 void scan_qb(const Problem& p, int64_t k0, int64_t k1, int64_t t0, bool prefetch, float* best,
                        int64_t* best_idx) {
  constexpr int KB = key_block<QB>();
  const auto* keys = static_cast<const typename K::T*>(p.keys);
  const float* q = p.q + t0 * p.qs;
  float sc[KB * QB];
  int64_t i0 = k0;
  for (; i0 + KB <= k1; i0 += KB) {
    // Prefetching the next tile's rows (into L2) beat no prefetch (-25% time at T = 1, 8), a fixed distance
    // ahead in the same rows (256 .. 1024 elements), 3 or 7 tiles ahead, and prefetching into L1 (-10% at T = 8)
    // on the development machine.
    const typename K::T* pf = prefetch && i0 + 2 * KB <= p.m ? keys + (i0 + KB) * p.ks : nullptr;
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
NDB_AVX512 void scan(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx) {
  // With more than one query block, walk the keys in blocks that stay in L1/L2 while every query block
  // passes over them; only the first pass over a block prefetches.
  const int64_t row_bytes = p.d1 * static_cast<int64_t>(sizeof(typename K::T));
  int64_t kblock = k1 - k0;
  if (p.T > kQB) {
    kblock = 32768 / (row_bytes > 0 ? row_bytes : 1);
    kblock = (kblock / 24 + 1) * 24;
  }
  for (int64_t a = k0; a < k1; a += kblock) {
    const int64_t b = a + kblock < k1 ? a + kblock : k1;
    for (int64_t t0 = 0; t0 < p.T; t0 += kQB) {
      const bool pf = t0 == 0;
      switch (p.T - t0 < kQB ? p.T - t0 : kQB) {
        case 1: scan_qb<K, 1>(p, a, b, t0, pf, best, best_idx); break;
        case 2: scan_qb<K, 2>(p, a, b, t0, pf, best, best_idx); break;
        case 3: scan_qb<K, 3>(p, a, b, t0, pf, best, best_idx); break;
        case 4: scan_qb<K, 4>(p, a, b, t0, pf, best, best_idx); break;
        case 5: scan_qb<K, 5>(p, a, b, t0, pf, best, best_idx); break;
        case 6: scan_qb<K, 6>(p, a, b, t0, pf, best, best_idx); break;
        case 7: scan_qb<K, 7>(p, a, b, t0, pf, best, best_idx); break;
        default: scan_qb<K, 8>(p, a, b, t0, pf, best, best_idx); break;
      }
    }
  }
}

template <class K>
NDB_AVX512 float dot(const Problem& p, int64_t t, int64_t i) {
  float s;
  tile<K, 1, 1>(static_cast<const typename K::T*>(p.keys) + i * p.ks, p.ks, p.q + t * p.qs, p.qs, p.d1, nullptr, &s);
  return s;
}

// ------------------------------------------------------------------------------------------------
// int4 sketch scores (the exact pre-filter of gated_retrieval_prefiltered_cpu)
// ------------------------------------------------------------------------------------------------
// One 64-byte vector per group: the 32 code bytes' low nibbles are elements 0..31 and the high ones 32..63, so
// widening them side by side gives the group in element order.
NDB_AVX512 inline __m512 sketch_group(const uint8_t* codes, const int8_t* q, const int32_t* off, float sc,
                                      __m512 acc) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i lo = _mm256_and_si256(x, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
  const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  // u8 x s8 pairs: at most 2 * 15 * 127, no int16 saturation.
  __m512i d = _mm512_madd_epi16(_mm512_maddubs_epi16(c, _mm512_loadu_si512(q)), _mm512_set1_epi16(1));
  d = _mm512_sub_epi32(d, _mm512_loadu_si512(off));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sc), acc);
}

// Two accumulators (even and odd groups) halve the chain of dependent multiply-adds per key.
NDB_AVX512 void sketch_scores(const SketchProblem& p, int64_t k0, int64_t k1, float* s) {
  constexpr int64_t kAhead = 4;  // 2-16 rows ahead, into L1 or L2, or none: 4 into L1 was fastest at T = 1
  float sc[kSketchMaxSimdGroups];
  const int64_t G = p.G;
  for (int64_t i = k0; i < k1; ++i) {
    const uint8_t* row = p.sketch + i * p.ss;
    if (i + kAhead < k1) {
      const char* next = reinterpret_cast<const char*>(row + kAhead * p.ss);
      for (int64_t b = 0; b < p.ss; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    const uint8_t* scales = row + kSketchHeader;
    const uint8_t* codes = row + kSketchHeader + 2 * G;
    for (int64_t t = 0; t < p.T; ++t) {
      const int8_t* q = p.q8 + t * G * kSketchGroup;
      const float* qs = p.qscale + t * G;
      const int32_t* off = p.off + t * G * 16;
      for (int64_t g = 0; g < G; g += kLanes) {
        const __mmask16 m = tail_mask(G - g);
        const __m512 ks = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + 2 * g));
        _mm512_storeu_ps(sc + g, _mm512_mul_ps(ks, _mm512_maskz_loadu_ps(m, qs + g)));
      }
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t g = 0;
      for (; g + 2 <= G; g += 2) {
        acc0 = sketch_group(codes + g * 32, q + g * 64, off + g * 16, sc[g], acc0);
        acc1 = sketch_group(codes + g * 32 + 32, q + g * 64 + 64, off + g * 16 + 16, sc[g + 1], acc1);
      }
      if (g < G) acc0 = sketch_group(codes + g * 32, q + g * 64, off + g * 16, sc[g], acc0);
      s[(i - k0) * p.T + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 1-bit sign sketch (the first stage of the cascade in gated_retrieval_prefiltered_cpu)
// ------------------------------------------------------------------------------------------------
// Keys go in blocks of 8: each key's integer dot and outlier sum stay as 8-lane fp32 partial sums, one transposing
// reduction per block turns them into one lane per key, and the bound (sign_bound_passes' arithmetic) is evaluated
// for the 8 keys at once in float64. The partial sums are integers below 2^24 (d1 <= 65535 bytes of at most 255 each),
// so their fp32 sums are exact in any order.
constexpr int64_t kSignBlock = 8;
// Rows prefetched ahead into L1: two blocks (~4.8 KB at d1 = 1536), the best of 1 to 4 blocks with the rows coming
// from memory (all within 3%).
constexpr int64_t kSignAhead = 2 * kSignBlock;
static_assert(255 * (kMaxSignD1 + 1) < (1LL << 24), "sign dots must stay exact in fp32");

// Unaligned: sign rows are 300 bytes at d1 = 1536. The compiler turns this into one kmovq from memory.
NDB_AVX512 inline __mmask64 mask_at(const uint8_t* p) {
  __mmask64 m;
  std::memcpy(&m, p, sizeof m);
  return m;
}

// Lane k of the result is the sum of the lanes of v[k].
NDB_AVX512 inline __m256 sum_lanes8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

NDB_AVX512 inline __m256 fold(__m512 x) { return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)); }

// sum_j q8_j over the set bits of one key, as 8 partial sums. With VNNI the bits expand to 0/1 bytes that vpdpbusd
// multiplies into the signed codes. It is written as inline asm so that this file keeps to the baseline AVX-512
// target and no VNNI instruction can reach the path for CPUs without it. Without VNNI the bits pick the codes
// stored + 128 (unsigned) and 128 elsewhere, and vpsadbw sums the bytes: sum_set q8 + 128 * 64 G whatever the bits.
NDB_AVX512 inline __m512i add_set_bits_vnni(__m512i acc, const uint8_t* bits, const int8_t* q8) {
  const __m512i b = _mm512_maskz_mov_epi8(mask_at(bits), _mm512_set1_epi8(1));
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "m"(*reinterpret_cast<const __m512i*>(q8)));
  return acc;
}

NDB_AVX512 inline __m512i add_set_bits_sad(__m512i acc, const uint8_t* bits, const uint8_t* qu) {
  const __m512i x = _mm512_mask_mov_epi8(_mm512_set1_epi8(static_cast<char>(0x80)), mask_at(bits), _mm512_loadu_si512(qu));
  return _mm512_add_epi64(acc, _mm512_sad_epu8(x, _mm512_setzero_si512()));
}

template <bool kVnni>
NDB_AVX512 inline __m256 set_bit_sums(const SignProblem& p, const uint8_t* bits, int64_t t) {
  const int64_t G = p.G;
  const int8_t* q8 = p.q8 + t * G * 64;
  const uint8_t* qu = p.qu + t * G * 64;
  __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) {
    if constexpr (kVnni) {
      acc0 = add_set_bits_vnni(acc0, bits + 8 * g, q8 + 64 * g);
      acc1 = add_set_bits_vnni(acc1, bits + 8 * g + 8, q8 + 64 * g + 64);
    } else {
      acc0 = add_set_bits_sad(acc0, bits + 8 * g, qu + 64 * g);
      acc1 = add_set_bits_sad(acc1, bits + 8 * g + 8, qu + 64 * g + 64);
    }
  }
  if (g < G) acc0 = kVnni ? add_set_bits_vnni(acc0, bits + 8 * g, q8 + 64 * g) : add_set_bits_sad(acc0, bits + 8 * g, qu + 64 * g);
  if constexpr (kVnni) return fold(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1)));
  return _mm512_cvtepi64_ps(_mm512_add_epi64(acc0, acc1));
}

// The fp32 products q_j v_j over the key's outliers, as 8 partial sums (one 16-lane and one 8-lane gather).
static_assert(kSignOutliers == 24, "outlier_sums gathers 16 + 8 outliers");
NDB_AVX512 inline __m256 outlier_sums(const SignProblem& p, const uint8_t* row, const float* q) {
  const uint16_t* oidx = reinterpret_cast<const uint16_t*>(row + kSignHeader);
  const uint16_t* oval = oidx + kSignOutliers;
  // Clamped so a malformed row cannot read outside the query row.
  const int qmax = static_cast<int>(p.qs - 1);
  const __m512i j0 = _mm512_min_epu32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(oidx))),
                                      _mm512_set1_epi32(qmax));
  const __m256i j1 = _mm256_min_epu32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(oidx + 16))),
                                      _mm256_set1_epi32(qmax));
  const __m512 v0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(oval)));
  const __m256 v1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(oval + 16)));
  return _mm256_add_ps(fold(_mm512_mul_ps(_mm512_i32gather_ps(j0, q, 4), v0)),
                       _mm256_mul_ps(_mm256_i32gather_ps(q, j1, 4), v1));
}

template <bool kVnni>
NDB_AVX512 void sign_pass(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass) {
  // Without VNNI the byte sums carry 128 per element (see set_bit_sums).
  const double offset = kVnni ? 0.0 : 128.0 * 64 * p.G;
  // Row k of a block starts k * ss bytes after row 0: where its a, r and n are gathered from (byte offsets: the
  // stride of a row-strided view need not be a multiple of 4).
  const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int>(p.ss)));
  std::vector<__mmask8> keep(static_cast<size_t>(p.T));
  for (int64_t i0 = k0; i0 < k1; i0 += kSignBlock) {
    const int64_t n = std::min(kSignBlock, k1 - i0);
    const __mmask8 live = static_cast<__mmask8>((1u << n) - 1u);
    const uint8_t* block = p.signs + i0 * p.ss;
    const __m256 zero = _mm256_setzero_ps();
    const __m512d a = _mm512_cvtps_pd(_mm256_mmask_i32gather_ps(zero, live, rows, block, 1));
    const __m512d r = _mm512_cvtps_pd(_mm256_mmask_i32gather_ps(zero, live, rows, block + 4, 1));
    const __m512d nk = _mm512_cvtps_pd(_mm256_mmask_i32gather_ps(zero, live, rows, block + 8, 1));
    for (int64_t t = 0; t < p.T; ++t) {
      const float* q = p.q + t * p.qs;
      __m256 pos[kSignBlock], s1[kSignBlock];
      for (int64_t k = 0; k < kSignBlock; ++k) {
        if (k >= n) {
          pos[k] = s1[k] = zero;
          continue;
        }
        const uint8_t* row = block + k * p.ss;
        if (t == 0 && i0 + k + kSignAhead < k1) {
          // Row by row, spread over the block: a whole block's lines requested at once stalled the scan.
          const char* ahead = reinterpret_cast<const char*>(row + kSignAhead * p.ss);
          for (int64_t b = 0; b < p.ss; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
          _mm_prefetch(ahead + p.ss - 1, _MM_HINT_T0);
        }
        pos[k] = set_bit_sums<kVnni>(p, row + kSignHeader + 4 * kSignOutliers, t);
        s1[k] = outlier_sums(p, row, q);
      }
      // sign_bound_passes for 8 keys, term by term.
      const __m512d sum = _mm512_sub_pd(_mm512_cvtps_pd(sum_lanes8(pos)), _mm512_set1_pd(offset));
      const __m512d dot = _mm512_sub_pd(_mm512_add_pd(sum, sum), _mm512_set1_pd(p.qsum[t]));
      const __m512d s = _mm512_cvtps_pd(sum_lanes8(s1));
      const __m512d cd = _mm512_mul_pd(_mm512_set1_pd(p.c[t]), dot), l1 = _mm512_set1_pd(p.l1[t]);
      const __m512d rest = _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(p.a[t]), r), _mm512_mul_pd(_mm512_set1_pd(p.b[t]), nk));
      const __m512d terms = _mm512_add_pd(_mm512_mul_pd(a, _mm512_add_pd(_mm512_abs_pd(cd), l1)), rest);
      const __m512d ub = _mm512_add_pd(_mm512_add_pd(s, _mm512_mul_pd(a, _mm512_add_pd(cd, l1))), rest);
      const __m512d lhs = _mm512_add_pd(ub, _mm512_mul_pd(_mm512_set1_pd(1e-9), _mm512_add_pd(_mm512_abs_pd(s), terms)));
      // Not below gamma, NaN included (unordered): the key stays.
      keep[t] = _mm512_mask_cmp_pd_mask(live, lhs, _mm512_set1_pd(p.gamma), _CMP_NLT_UQ);
    }
    for (int64_t k = 0; k < n; ++k)
      for (int64_t t = 0; t < p.T; ++t)
        if ((keep[t] >> k) & 1) {
          pass.push_back(i0 + k);
          pass.push_back(t);
        }
  }
}

}  // namespace

void sign_pass_avx512(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass) {
  sign_pass<false>(p, k0, k1, pass);
}

void sign_pass_avx512_vnni(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass) {
  sign_pass<true>(p, k0, k1, pass);
}

void sketch_scores_avx512(const SketchProblem& p, int64_t k0, int64_t k1, float* s) { sketch_scores(p, k0, k1, s); }

void scan_avx512(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx) {
  with_key_loader<F16, BF16, F32>(p.key_type, [&](auto k) { scan<decltype(k)>(p, k0, k1, best, best_idx); });
}

float dot_avx512(const Problem& p, int64_t t, int64_t i) {
  return with_key_loader<F16, BF16, F32>(p.key_type, [&](auto k) { return dot<decltype(k)>(p, t, i); });
}

}  // namespace cpu
}  // namespace neuraldb
#endif  // NEURALDB_X86
