// AVX-512 key scans, chosen at run time:
//  * scan_avx512: exact fp32 scan (16 lanes; keys converted on load; register tiles of up to 8 queries).
//  * amx_scan:    AMX bf16 pre-filter for many queries. Scores from bf16-rounded queries and keys differ from
//                 the fp32 scores by at most a per-key bound (Cauchy-Schwarz on the actual rounding errors, see
//                 gated_retrieval_cpu.cpp), so a key can only be the fp32 argmax when its bf16 score plus its
//                 bound reaches the best bf16 score minus that key's bound. Those candidates are rescored with
//                 dot_avx512, the same fp32 dot the exact scan computes: the pre-filter changes the speed, never
//                 the result.
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
inline int64_t kbuf_stride(const AmxProblem& a) { return a.seg + 32; }
inline int64_t scores_stride(const AmxProblem& a) { return a.tp + 16; }

// bf16 (as a __m512bh holding 32 values) widened back to fp32: the 16 low and the 16 high values.
NDB_AMX inline __m512 bf16_lo(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
}
NDB_AMX inline __m512 bf16_hi(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}

// Converts 32 elements (j, j + 32) of a key row to bf16 at dst; adds their squares to s0, s1 and the squares of
// their bf16 rounding errors to e0, e1 (bf16(x) - x is exact in fp32). Four sums: the multiply-add latency, not
// the throughput, would bound fewer.
template <class K, bool TIGHT>
NDB_AMX inline void convert32(const typename K::T* src, int64_t j, int64_t d1, uint16_t* dst, __m512& s0,
                              __m512& s1, __m512& e0, __m512& e1) {
  __m512 lo, hi;
  if (j + 32 <= d1) {
    lo = K::load(src + j);
    hi = K::load(src + j + 16);
  } else {
    lo = K::load(src + j, tail_mask(d1 - j));
    hi = K::load(src + j + 16, tail_mask(d1 - j - 16));
  }
  const __m512i bf = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  _mm512_store_si512(reinterpret_cast<__m512i*>(dst + j), bf);
  s0 = _mm512_fmadd_ps(lo, lo, s0);
  s1 = _mm512_fmadd_ps(hi, hi, s1);
  if (TIGHT) {
    const __m512 dlo = _mm512_sub_ps(bf16_lo(bf), lo), dhi = _mm512_sub_ps(bf16_hi(bf), hi);
    e0 = _mm512_fmadd_ps(dlo, dlo, e0);
    e1 = _mm512_fmadd_ps(dhi, dhi, e1);
  }
}

// Bound on |bf16 score - fp32 score| of a key with squared norm n2 and squared bf16 rounding error e2 (see
// AmxProblem). Non-finite keys get an infinite bound: always candidates, never raising the threshold.
inline float key_bound(const AmxProblem& a, float n2, float e2) {
  const float b = a.qn * std::sqrt(e2) + a.kfac * std::sqrt(n2);
  return std::isfinite(b) ? b * 1.001f + 1e-30f : INFINITY;
}

// A unit of the pipeline: one segment [j0, j1) of the key rows of one super-block, converted to bf16.
struct Unit {
  int64_t row0 = 0;  // first key
  int rows = 0;      // keys in the super-block (0: no unit)
  int64_t j0 = 0, j1 = 0;
  int parity = 0;    // super-block parity: which norm accumulator it adds to
};

// Converts a unit into a bf16 buffer a few 32-element pieces at a time, so that the conversion of the next unit
// runs between the tile multiplications of the current one. Squared norms accumulate per row across segments.
// TIGHT: measure ||bf16(k) - k|| per key; otherwise use its bound 2^-8 ||k|| (cheaper conversion, looser bound).
template <class K, bool TIGHT>
struct UnitConverter {
  const typename K::T* keys = nullptr;
  int64_t ks = 0, d1 = 0, kst = 0;
  uint16_t* dst = nullptr;
  float* norm2 = nullptr;  // (rows,) squared norms so far
  float* err2 = nullptr;   // (rows,) squared norms of the bf16 rounding errors so far
  int rows = 0, row = 0;
  int64_t j0 = 0, j1 = 0, j = 0;
  const typename K::T* src = nullptr;
  __m512 s0, s1, e0, e1;  // the current row's part of the segment so far

  NDB_AMX void start(const Unit& u, uint16_t* d, float* n2, float* e2) {
    rows = u.rows;
    row = 0;
    j0 = u.j0;
    j1 = u.j1;
    j = j0;
    dst = d;
    norm2 = n2;
    err2 = e2;
    src = keys + u.row0 * ks;
    s0 = s1 = e0 = e1 = _mm512_setzero_ps();
    if (j0 == 0)
      for (int r = 0; r < rows; ++r) norm2[r] = err2[r] = 0.f;
  }
  NDB_AMX void step(int64_t pieces) {
    // Register copies: through the struct, every multiply-add would wait for a store and a load.
    __m512 a = s0, b = s1, c = e0, d = e1;
    int64_t jj = j;
    int r = row;
    for (int64_t u = 0; u < pieces && r < rows; ++u) {
      convert32<K, TIGHT>(src + r * ks, jj, d1, dst + r * kst - j0, a, b, c, d);
      jj += 32;
      if (jj >= j1) {
        const float n2 = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        norm2[r] += n2;
        // |bf16(x) - x| <= 2^-8 |x| (round to nearest, 8 significant bits); 1.001 covers the fp32 sum.
        err2[r] += TIGHT ? _mm512_reduce_add_ps(_mm512_add_ps(c, d)) : n2 * (1.001f / 65536);
        a = b = c = d = _mm512_setzero_ps();
        jj = j0;
        ++r;
      }
    }
    s0 = a;
    s1 = b;
    e0 = c;
    e1 = d;
    j = jj;
    row = r;
  }
};

// Software prefetch of a unit's lines into L2, spread over the steps of the unit before it.
struct PrefetchCursor {
  const char* base = nullptr;  // first line of the current row
  int64_t row_bytes = 0, lines = 0, rows = 0, row = 0, line = 0;
  NDB_AMX void step(int64_t n) {
    for (; n > 0 && row < rows; --n) {
      _mm_prefetch(base + line * 64, _MM_HINT_T1);
      if (++line == lines) {
        line = 0;
        ++row;
        base += row_bytes;
      }
    }
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

// Super-blocks of nb x 32 keys, split along d1 into segments, software pipelined: while the tiles multiply the
// bf16 copy of one (super-block, segment) unit, the vector units convert the next unit into the other half of
// kbuf and the unit after that is prefetched into L2. Partial scores of a super-block live in w.scores between
// segments, so that a segment of the packed queries is reused by nb x 32 keys: both stay in L2 for any d1.
template <class K, int NQ, bool TIGHT>
NDB_AMX void amx_scan_impl(const AmxProblem& a, AmxThread& w, int64_t k0, int64_t k1) {
  const Problem& p = *a.p;
  constexpr int64_t kB = kAmxKeyBlock;
  const int64_t esz = static_cast<int64_t>(sizeof(typename K::T));
  const int64_t nks = a.d1p / 32;
  const int64_t kst = kbuf_stride(a);
  const int64_t sst = scores_stride(a);
  const int64_t sb_rows = kB * a.nb;
  const int64_t nseg = (a.d1p + a.seg - 1) / a.seg;
  const int64_t nqb = a.tp / 16;
  float norm2[2][kB * kMaxSuperBlocks], err2[2][kB * kMaxSuperBlocks];
  float bound[kB * kMaxSuperBlocks];

  // The pipeline's units in order: (super-block 0, segment 0..nseg-1), (super-block 1, segment 0), ...
  auto unit = [&](int64_t n) {
    Unit u;
    const int64_t sb = n / nseg, g = n % nseg;
    u.row0 = k0 + sb * sb_rows;
    u.rows = static_cast<int>(u.row0 < k1 ? (k1 - u.row0 < sb_rows ? k1 - u.row0 : sb_rows) : 0);
    u.j0 = g * a.seg;
    u.j1 = u.j0 + a.seg < a.d1p ? u.j0 + a.seg : a.d1p;
    u.parity = static_cast<int>(sb & 1);
    return u;
  };
  auto prefetch_of = [&](const Unit& u) {
    PrefetchCursor c;
    c.base = reinterpret_cast<const char*>(static_cast<const typename K::T*>(p.keys) + u.row0 * p.ks) +
             (u.j0 * esz) / 64 * 64;
    c.row_bytes = p.ks * esz;
    const int64_t end = (u.j1 < p.d1 ? u.j1 : p.d1) * esz;
    c.lines = end > u.j0 * esz ? (end - (u.j0 * esz) / 64 * 64 + 63) / 64 : 0;
    c.rows = u.rows;
    return c;
  };

  UnitConverter<K, TIGHT> conv;
  conv.keys = static_cast<const typename K::T*>(p.keys);
  conv.ks = p.ks;
  conv.d1 = p.d1;
  conv.kst = kst;
  uint16_t* buf[2] = {w.kbuf, w.kbuf + sb_rows * kst};

  Unit cur = unit(0);
  conv.start(cur, buf[0], norm2[cur.parity], err2[cur.parity]);
  conv.step(INT64_MAX);
  int cb = 0;
  for (int64_t n = 0; cur.rows > 0; ++n, cb ^= 1) {
    const Unit next = unit(n + 1);
    PrefetchCursor pf = prefetch_of(unit(n + 2));
    // GCC's tileloadd intrinsic does not tell the compiler that it reads memory: finish the stores first.
    asm volatile("" ::: "memory");
    conv.start(next, buf[cb ^ 1], norm2[next.parity], err2[next.parity]);

    const int64_t s0 = cur.j0 / 32, s1 = cur.j1 / 32;
    const int nkb = static_cast<int>((cur.rows + kB - 1) / kB);
    const int64_t steps = (nqb / NQ) * nkb * (s1 - s0);
    const int64_t pieces = (next.rows * ((next.j1 - next.j0) / 32) + steps - 1) / steps;
    const int64_t pf_per_step = (pf.rows * pf.lines + steps - 1) / steps;
    const bool first = cur.j0 == 0;

    for (int64_t qb = 0; qb < nqb; qb += NQ) {
      for (int kb = 0; kb < nkb; ++kb) {
        const uint16_t* a0 = buf[cb] + kb * kB * kst - cur.j0;
        const uint16_t* a1 = a0 + 16 * kst;
        float* sc = w.scores + kb * kB * sst + qb * 16;
        if (first) {
          _tile_zero(0);
          _tile_zero(1);
          if (NQ == 2) {
            _tile_zero(2);
            _tile_zero(3);
          }
        } else {
          _tile_loadd(0, sc, sst * 4);
          _tile_loadd(1, sc + 16 * sst, sst * 4);
          if (NQ == 2) {
            _tile_loadd(2, sc + 16, sst * 4);
            _tile_loadd(3, sc + 16 * sst + 16, sst * 4);
          }
        }
        const uint16_t* bq = a.qpack + qb * nks * 512;
        for (int64_t s = s0; s < s1; ++s) {
          _tile_loadd(4, a0 + s * 32, kst * 2);
          _tile_loadd(5, a1 + s * 32, kst * 2);
          _tile_loadd(6, bq + s * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          if (NQ == 2) {
            _tile_loadd(7, bq + (nks + s) * 512, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
          conv.step(pieces);
          pf.step(pf_per_step);
        }
        _tile_stored(0, sc, sst * 4);
        _tile_stored(1, sc + 16 * sst, sst * 4);
        if (NQ == 2) {
          _tile_stored(2, sc + 16, sst * 4);
          _tile_stored(3, sc + 16 * sst + 16, sst * 4);
        }
      }
    }
    conv.step(INT64_MAX);  // whatever the spread left over
    if (cur.j1 == a.d1p) {  // last segment: the super-block's scores are complete
      for (int r = 0; r < cur.rows; ++r) bound[r] = key_bound(a, norm2[cur.parity][r], err2[cur.parity][r]);
      epilogue(a, w, cur.row0, cur.rows, bound);
    }
    cur = next;
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

NDB_AMX void amx_pack_queries(const AmxProblem& a, uint16_t* qpack, float* qn, float* dq) {
  // Tile (query block qb, k step s) is 16 rows of 16 (query, pair) dwords: row r, column n holds
  // bf16(q[16 qb + n][32 s + 2 r]) and bf16(q[16 qb + n][32 s + 2 r + 1]).
  const Problem& p = *a.p;
  const int64_t nks = a.d1p / 32;
  auto* out = reinterpret_cast<uint32_t*>(qpack);
  float max_n2 = 0.f, max_e2 = 0.f;
  for (int64_t t = 0; t < a.tp; ++t) {
    const int64_t qb = t / 16, n = t % 16;
    __m512 n2 = _mm512_setzero_ps(), e2 = n2;
    for (int64_t s = 0; s < nks; ++s) {
      alignas(64) uint32_t pairs[16];
      if (t < p.T) {
        const float* q = p.q + t * p.qs + s * 32;
        const __m512 lo = _mm512_loadu_ps(q), hi = _mm512_loadu_ps(q + 16);
        const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_store_si512(reinterpret_cast<__m512i*>(pairs), v);
        const __m512 dlo = _mm512_sub_ps(bf16_lo(v), lo), dhi = _mm512_sub_ps(bf16_hi(v), hi);
        n2 = _mm512_fmadd_ps(hi, hi, _mm512_fmadd_ps(lo, lo, n2));
        e2 = _mm512_fmadd_ps(dhi, dhi, _mm512_fmadd_ps(dlo, dlo, e2));
      } else {
        for (int r = 0; r < 16; ++r) pairs[r] = 0;
      }
      uint32_t* tile = out + (qb * nks + s) * 256;
      for (int r = 0; r < 16; ++r) tile[r * 16 + n] = pairs[r];
    }
    max_n2 = std::fmax(max_n2, _mm512_reduce_add_ps(n2));
    max_e2 = std::fmax(max_e2, _mm512_reduce_add_ps(e2));
  }
  *qn = std::sqrt(max_n2);
  *dq = std::sqrt(max_e2);
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

template <class K>
void amx_scan_k(const AmxProblem& a, AmxThread& w, int64_t k0, int64_t k1) {
  const bool two = a.tp % 32 == 0;
  if (a.tight)
    return two ? amx_scan_impl<K, 2, true>(a, w, k0, k1) : amx_scan_impl<K, 1, true>(a, w, k0, k1);
  return two ? amx_scan_impl<K, 2, false>(a, w, k0, k1) : amx_scan_impl<K, 1, false>(a, w, k0, k1);
}

void amx_scan(const AmxProblem& a, AmxThread& w, int64_t k0, int64_t k1) {
  switch (a.p->key_type) {
    case KeyType::kF16: return amx_scan_k<F16>(a, w, k0, k1);
    case KeyType::kBF16: return amx_scan_k<BF16>(a, w, k0, k1);
    case KeyType::kF32: return amx_scan_k<F32>(a, w, k0, k1);
  }
}

}  // namespace cpu
}  // namespace neuraldb
#endif  // NEURALDB_X86
