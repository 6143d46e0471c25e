// AMX bf16 pre-filter scan for many queries. Scores from bf16-rounded queries and keys differ from the fp32 scores
// by at most a per-key bound (Cauchy-Schwarz on the actual rounding errors, see amx_prefilter.cpp), so a key can only
// be the fp32 argmax when its bf16 score plus its bound reaches the best bf16 score minus that key's bound. Those
// candidates are rescored with dot_avx512, the same fp32 dot the exact scan computes: the pre-filter changes the
// speed, never the result.
#include "avx512_common.h"

#ifdef NEURALDB_X86
#include <sys/syscall.h>
#include <unistd.h>

namespace neuraldb {
namespace cpu {
namespace {

using namespace avx512;

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

}  // namespace

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
  with_key_loader<F16, BF16, F32>(a.p->key_type, [&](auto k) { amx_scan_k<decltype(k)>(a, w, k0, k1); });
}

}  // namespace cpu
}  // namespace neuraldb
#endif  // NEURALDB_X86
