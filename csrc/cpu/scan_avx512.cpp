// AVX-512 key scans, chosen at run time:
//  * scan_avx512: exact fp32 scan (16 lanes; keys converted on load; register tiles of up to 8 queries).
//  * amx_scan:    AMX bf16 pre-filter for many queries. Scores from bf16-rounded queries and keys differ from
//                 the fp32 scores by at most margin * ||key|| (see gated_retrieval_cpu.cpp for the bound), so
//                 a key can only be the fp32 argmax when its bf16 score plus that bound reaches the best bf16
//                 score minus its bound. Those candidates are rescored with dot_avx512, the same fp32 dot the
//                 exact scan computes: the pre-filter changes the speed, never the result.
// Every function here carries a target attribute instead of the file being compiled for AVX-512, so the
// library still loads and runs on CPUs without it.
#include "cpu_kernels.h"

#ifdef NEURALDB_X86
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstring>

#define NDB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define NDB_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace neuraldb {
namespace cpu {
namespace {

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
      for (int i = 0; i < KB; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * ks + j), _MM_HINT_T0);
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
    // Prefetching the next tile's rows beat no prefetch (-25% time at T = 1, 8) and a fixed distance ahead in
    // the same rows (256 .. 1024 elements) on the development machine.
    const typename K::T* pf = prefetch && i0 + 2 * KB <= p.m ? keys + (i0 + KB) * p.ks : nullptr;
    tile<K, KB, QB>(keys + i0 * p.ks, p.ks, q, p.qs, p.d1, pf, sc);
#pragma GCC unroll 8
    for (int b = 0; b < QB; ++b)
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i)
        if (sc[i * QB + b] > best[t0 + b]) {
          best[t0 + b] = sc[i * QB + b];
          best_idx[t0 + b] = i0 + i;
        }
  }
  for (; i0 < k1; ++i0) {
    tile<K, 1, QB>(keys + i0 * p.ks, p.ks, q, p.qs, p.d1, nullptr, sc);
    for (int b = 0; b < QB; ++b)
      if (sc[b] > best[t0 + b]) {
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
// AMX bf16 pre-filter
// ------------------------------------------------------------------------------------------------
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Row stride (elements) of the bf16 key block: padded by one cache line so the 16 rows of a tile do not all
// fall into the same L1 set when d1 is a multiple of 2048.
inline int64_t kbuf_stride(const AmxProblem& a) { return a.d1p + 32; }
inline int64_t scores_stride(const AmxProblem& a) { return a.tp + 16; }

// Converts 32 elements (j, j + 32) of a key row to bf16 at dst and adds their squares to s0, s1.
template <class K>
NDB_AMX inline void convert32(const typename K::T* src, int64_t j, int64_t d1, uint16_t* dst, __m512& s0,
                              __m512& s1) {
  __m512 lo, hi;
  if (j + 32 <= d1) {
    lo = K::load(src + j);
    hi = K::load(src + j + 16);
  } else {
    lo = K::load(src + j, tail_mask(d1 - j));
    hi = K::load(src + j + 16, tail_mask(d1 - j - 16));
  }
  s0 = _mm512_fmadd_ps(lo, lo, s0);
  s1 = _mm512_fmadd_ps(hi, hi, s1);
  _mm512_store_si512(reinterpret_cast<__m512i*>(dst + j), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

// Bound on |bf16 score - fp32 score| of a key with squared norm n2. Non-finite keys get an infinite bound:
// always candidates, never raising the threshold.
inline float key_bound(float margin, float n2) { return std::isfinite(n2) ? margin * std::sqrt(n2) + 1e-30f : INFINITY; }

// Incremental conversion of one block of key rows into a bf16 buffer, a few 32-element pieces at a time, so
// that it can run between the tile multiplications of the previous block.
template <class K>
struct BlockConverter {
  const typename K::T* src = nullptr;  // first row
  int64_t ks = 0, d1 = 0, d1p = 0, kst = 0;
  uint16_t* dst = nullptr;
  float* bound = nullptr;
  float margin = 0.f;
  int rows = 0, row = 0;
  int64_t j = 0;
  __m512 s0, s1;  // squared norm of the current row so far (two sums: the FMA latency is the bottleneck)

  NDB_AMX void start(const typename K::T* s, int n, uint16_t* d, float* b) {
    src = s;
    rows = n;
    row = 0;
    j = 0;
    dst = d;
    bound = b;
    s0 = s1 = _mm512_setzero_ps();
  }
  NDB_AMX void step(int64_t pieces) {
    // Work on register copies: through the struct, every multiply-add would wait for a store and a load.
    __m512 a = s0, b = s1;
    int64_t jj = j;
    int r = row;
    for (int64_t u = 0; u < pieces && r < rows; ++u) {
      convert32<K>(src + r * ks, jj, d1, dst + r * kst, a, b);
      jj += 32;
      if (jj >= d1p) {
        bound[r] = key_bound(margin, _mm512_reduce_add_ps(_mm512_add_ps(a, b)));
        a = b = _mm512_setzero_ps();
        jj = 0;
        ++r;
      }
    }
    s0 = a;
    s1 = b;
    j = jj;
    row = r;
  }
};

inline void prune(const AmxThread& w, int64_t t) {
  const float thr = w.thr[t];
  int64_t* idx = w.cand_idx + t * w.cap;
  float* up = w.cand_up + t * w.cap;
  int32_t n = 0;
  for (int32_t c = 0; c < w.cand_n[t]; ++c)
    if (up[c] >= thr) {
      idx[n] = idx[c];
      up[n] = up[c];
      ++n;
    }
  w.cand_n[t] = n;
}

// Records key i as a candidate of query t (or marks t overflowed when more than cap keys stay in the margin).
inline void push(AmxThread& w, int64_t t, int64_t i, float up) {
  if (w.overflow[t]) return;
  if (w.cand_n[t] == w.cap) {
    prune(w, t);
    if (w.cand_n[t] == w.cap) {
      w.overflow[t] = 1;
      return;
    }
  }
  w.cand_idx[t * w.cap + w.cand_n[t]] = i;
  w.cand_up[t * w.cap + w.cand_n[t]] = up;
  ++w.cand_n[t];
}

// Updates the thresholds and candidates of every query with the bf16 scores of keys [i0, i0 + nk).
NDB_AMX void epilogue(const AmxProblem& a, AmxThread& w, int64_t i0, int nk, const float* bound) {
  const int64_t ss = scores_stride(a);
  for (int64_t g = 0; g < a.tp; g += 16) {
    __m512 thr = _mm512_loadu_ps(w.thr + g);
    const __mmask16 live = a.live[g / 16];
    for (int r = 0; r < nk; ++r) {
      const __m512 v = _mm512_loadu_ps(w.scores + r * ss + g);
      const __m512 bnd = _mm512_set1_ps(bound[r]);
      thr = _mm512_max_ps(thr, _mm512_sub_ps(v, bnd));
      const __m512 up = _mm512_add_ps(v, bnd);
      __mmask16 hit = _mm512_cmp_ps_mask(up, thr, _CMP_GE_OQ) & live;
      if (hit == 0) continue;
      alignas(64) float ups[16];
      _mm512_store_ps(ups, up);
      _mm512_storeu_ps(w.thr + g, thr);
      while (hit) {
        const int lane = __builtin_ctz(hit);
        hit &= hit - 1;
        push(w, g + lane, i0 + r, ups[lane]);
      }
    }
    _mm512_storeu_ps(w.thr + g, thr);
  }
}

// Blocks of 32 keys, software pipelined: while the tiles multiply block b (bf16 keys in one half of kbuf), the
// vector units convert block b + 1 into the other half and the next block after that is prefetched into L2.
template <class K, int NQ>
NDB_AMX void amx_scan_impl(const AmxProblem& a, AmxThread& w, int64_t k0, int64_t k1) {
  const Problem& p = *a.p;
  const auto* keys = static_cast<const typename K::T*>(p.keys);
  const int64_t nks = a.d1p / 32;
  const int64_t kst = kbuf_stride(a);
  const int64_t sst = scores_stride(a);
  const int64_t steps = (a.tp / 16 / NQ) * nks;  // tile steps per block
  const int64_t lines_per_row = (p.d1 * static_cast<int64_t>(sizeof(typename K::T)) + 63) / 64;
  const int64_t row_bytes = p.ks * static_cast<int64_t>(sizeof(typename K::T));
  float bounds[2][kAmxKeyBlock];

  BlockConverter<K> conv;
  conv.ks = p.ks;
  conv.d1 = p.d1;
  conv.d1p = a.d1p;
  conv.kst = kst;
  conv.margin = a.margin;
  auto rows_of = [&](int64_t i0) { return static_cast<int>(k1 - i0 < kAmxKeyBlock ? (k1 - i0 > 0 ? k1 - i0 : 0) : kAmxKeyBlock); };

  conv.start(keys + k0 * p.ks, rows_of(k0), w.kbuf, bounds[0]);
  conv.step(INT64_MAX);
  int cur = 0;
  for (int64_t i0 = k0; i0 < k1; i0 += kAmxKeyBlock, cur ^= 1) {
    const int nk = rows_of(i0);
    const uint16_t* kb0 = w.kbuf + cur * kAmxKeyBlock * kst;
    const uint16_t* kb1 = kb0 + 16 * kst;
    // GCC's tileloadd intrinsic does not tell the compiler that it reads memory: finish the stores first.
    asm volatile("" ::: "memory");

    const int nk_next = rows_of(i0 + kAmxKeyBlock);
    conv.start(keys + (i0 + kAmxKeyBlock) * p.ks, nk_next, w.kbuf + (cur ^ 1) * kAmxKeyBlock * kst, bounds[cur ^ 1]);
    const int64_t pieces = (static_cast<int64_t>(nk_next) * nks + steps - 1) / steps;
    const int nk_pf = rows_of(i0 + 2 * kAmxKeyBlock);
    const int64_t pf_total = nk_pf * lines_per_row;
    const int64_t pf_per_step = (pf_total + steps - 1) / steps;
    const char* pf_row = reinterpret_cast<const char*>(keys + (i0 + 2 * kAmxKeyBlock) * p.ks);
    int64_t pf_line = 0, pf_done = 0;

    for (int64_t qb = 0; qb < a.tp / 16; qb += NQ) {
      const uint16_t* bq = a.qpack + qb * nks * 512;
      _tile_zero(0);
      _tile_zero(1);
      if (NQ == 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t s = 0; s < nks; ++s) {
        _tile_loadd(4, kb0 + s * 32, kst * 2);
        _tile_loadd(5, kb1 + s * 32, kst * 2);
        _tile_loadd(6, bq + s * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (NQ == 2) {
          _tile_loadd(7, bq + (nks + s) * 512, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
        conv.step(pieces);
        for (int64_t u = 0; u < pf_per_step && pf_done < pf_total; ++u, ++pf_done) {
          _mm_prefetch(pf_row + pf_line * 64, _MM_HINT_T1);
          if (++pf_line == lines_per_row) {
            pf_line = 0;
            pf_row += row_bytes;
          }
        }
      }
      float* sc = w.scores + qb * 16;
      _tile_stored(0, sc, sst * 4);
      _tile_stored(1, sc + 16 * sst, sst * 4);
      if (NQ == 2) {
        _tile_stored(2, sc + 16, sst * 4);
        _tile_stored(3, sc + 16 * sst + 16, sst * 4);
      }
    }
    conv.step(INT64_MAX);  // whatever the spread left over
    epilogue(a, w, i0, nk, bounds[cur]);
  }
}

// The read-bandwidth probe: XOR of every 64-byte line, 4 lines per iteration, prefetching ahead.
NDB_AVX512 uint64_t read_avx512_impl(const char* p, int64_t bytes, int64_t prefetch_bytes) {
  __m512i x0 = _mm512_setzero_si512(), x1 = x0, x2 = x0, x3 = x0;
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    if (prefetch_bytes > 0) {
      _mm_prefetch(p + i + prefetch_bytes, _MM_HINT_T0);
      _mm_prefetch(p + i + prefetch_bytes + 64, _MM_HINT_T0);
      _mm_prefetch(p + i + prefetch_bytes + 128, _MM_HINT_T0);
      _mm_prefetch(p + i + prefetch_bytes + 192, _MM_HINT_T0);
    }
    x0 = _mm512_xor_si512(x0, _mm512_loadu_si512(p + i));
    x1 = _mm512_xor_si512(x1, _mm512_loadu_si512(p + i + 64));
    x2 = _mm512_xor_si512(x2, _mm512_loadu_si512(p + i + 128));
    x3 = _mm512_xor_si512(x3, _mm512_loadu_si512(p + i + 192));
  }
  alignas(64) uint64_t w[8];
  _mm512_store_si512(w, _mm512_xor_si512(_mm512_xor_si512(x0, x1), _mm512_xor_si512(x2, x3)));
  uint64_t r = 0;
  for (uint64_t v : w) r ^= v;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    r ^= v;
  }
  for (; i < bytes; ++i) r ^= static_cast<unsigned char>(p[i]);
  return r;
}

}  // namespace

void scan_avx512(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx) {
  switch (p.key_type) {
    case KeyType::kF16: return scan<F16>(p, k0, k1, best, best_idx);
    case KeyType::kBF16: return scan<BF16>(p, k0, k1, best, best_idx);
    case KeyType::kF32: return scan<F32>(p, k0, k1, best, best_idx);
  }
}

float dot_avx512(const Problem& p, int64_t t, int64_t i) {
  switch (p.key_type) {
    case KeyType::kF16: return dot<F16>(p, t, i);
    case KeyType::kBF16: return dot<BF16>(p, t, i);
    case KeyType::kF32: return dot<F32>(p, t, i);
  }
  return 0.f;
}

uint64_t read_avx512(const void* data, int64_t bytes, int64_t prefetch_bytes) {
  return read_avx512_impl(static_cast<const char*>(data), bytes, prefetch_bytes);
}

bool amx_enable() {
#if defined(__linux__)
  // Linux >= 5.16 hands out the AMX tile data state only on request (once per process, for all threads).
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
#else
  return false;
#endif
}

NDB_AMX void amx_pack_queries(const AmxProblem& a, uint16_t* qpack) {
  // Tile (query block qb, k step s) is 16 rows of 16 (query, pair) dwords: row r, column n holds
  // bf16(q[16 qb + n][32 s + 2 r]) and bf16(q[16 qb + n][32 s + 2 r + 1]).
  const Problem& p = *a.p;
  const int64_t nks = a.d1p / 32;
  auto* out = reinterpret_cast<uint32_t*>(qpack);
  for (int64_t t = 0; t < a.tp; ++t) {
    const int64_t qb = t / 16, n = t % 16;
    for (int64_t s = 0; s < nks; ++s) {
      alignas(64) uint32_t pairs[16];
      if (t < p.T) {
        const float* q = p.q + t * p.qs + s * 32;
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 16), _mm512_loadu_ps(q));
        _mm512_store_si512(reinterpret_cast<__m512i*>(pairs), reinterpret_cast<__m512i>(v));
      } else {
        for (int r = 0; r < 16; ++r) pairs[r] = 0;
      }
      uint32_t* tile = out + (qb * nks + s) * 256;
      for (int r = 0; r < 16; ++r) tile[r * 16 + n] = pairs[r];
    }
  }
}

NDB_AMX void amx_thread_begin(const AmxProblem&) {
  alignas(64) TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  asm volatile("" ::: "memory");  // GCC's ldtilecfg intrinsic only declares reading 8 bytes of cfg
  _tile_loadconfig(&cfg);
}

NDB_AMX void amx_thread_end() { _tile_release(); }

void amx_scan(const AmxProblem& a, AmxThread& w, int64_t k0, int64_t k1) {
  const bool two = a.tp % 32 == 0;
  switch (a.p->key_type) {
    case KeyType::kF16: return two ? amx_scan_impl<F16, 2>(a, w, k0, k1) : amx_scan_impl<F16, 1>(a, w, k0, k1);
    case KeyType::kBF16: return two ? amx_scan_impl<BF16, 2>(a, w, k0, k1) : amx_scan_impl<BF16, 1>(a, w, k0, k1);
    case KeyType::kF32: return two ? amx_scan_impl<F32, 2>(a, w, k0, k1) : amx_scan_impl<F32, 1>(a, w, k0, k1);
  }
}

}  // namespace cpu
}  // namespace neuraldb
#endif  // NEURALDB_X86
