// The AMX bf16 pre-filter around cpu::amx_scan (scan_amx.cpp): the queries packed as tiles, the bound on how far a
// bf16 score may be from the fp32 one, per-thread candidate lists, and the exact fp32 rescoring of the candidates
// that can still be the argmax (queries whose candidates overflow are rescanned exactly). The result is the exact
// scan's; only the speed differs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/op_parts.h"

namespace neuraldb {
namespace cpu {
#ifdef NEURALDB_X86
namespace {

struct Scratch {
  std::vector<char> mem;
  char* take(size_t bytes, size_t& off) {
    off = round_up(static_cast<int64_t>(off), 64);
    char* base = reinterpret_cast<char*>(round_up(reinterpret_cast<intptr_t>(mem.data()), 64));
    char* r = base + off;
    off += bytes;
    return r;
  }
};

// AMX bf16 pre-filter over all keys for queries [0, p.T) (p.T <= 256), then exact fp32 rescoring of the
// surviving candidates; queries whose candidates overflow are rescanned exactly.
void prefilter_scan(const Problem& p, const CpuOptions& o, const std::vector<uint8_t>& zero_row, float* best,
                    int64_t* idx) {
  cpu::AmxProblem a;
  a.p = &p;
  a.tp = p.T <= 16 ? 16 : round_up(p.T, 32);
  a.d1p = round_up(std::max<int64_t>(p.d1, 1), 32);
  // Long rows are cut into segments of 2048 so that the bf16 keys of two (block, segment) units stay in L2.
  // Super-blocks of 2-4 blocks of 32 keys (sharing each segment of the packed queries) were slower at every d1
  // measured (1536, 4096, 14336; T = 128), so one block is the default; CpuOptions::amx_blocks overrides it.
  a.seg = std::min<int64_t>(a.d1p, 2048);
  a.nb = std::clamp<int64_t>(o.amx_blocks, 1, kMaxSuperBlocks);
  // Measured key rounding errors cost ~20% more conversion work; they matter where scores crowd together, which
  // random-ish data does more as d1 grows (their spread is ~1/sqrt(d1)).
  a.tight = o.amx_tight < 0 ? p.d1 > 2048 : o.amx_tight != 0;
  // Candidates per query and thread before falling back to an exact rescan of that query.
  const int64_t cap = std::max<int64_t>(1, o.amx_cap);
  std::vector<uint16_t> live(static_cast<size_t>(a.tp / 16), 0);
  for (int64_t q = 0; q < p.T; ++q)
    if (!zero_row[q]) live[q / 16] |= static_cast<uint16_t>(1u << (q % 16));
  a.live = live.data();

  const int64_t row_bytes = p.d1 * (p.key_type == KeyType::kF32 ? 4 : 2);
  // AMX runs ~1000 bf16 MACs per cycle: the scan is memory bound.
  const double est_us = static_cast<double>(p.m) * row_bytes / 1e4;
  // Larger chunks than the exact scan: the pipeline of a chunk starts with one block it cannot overlap.
  const Team t = team(p.m, row_bytes, est_us, cpu::kAmxKeyBlock * a.nb, o, 1 << 20);

  const int64_t kst = a.seg + 32, sst = a.tp + 16, rows = 32 * a.nb;
  const size_t per_thread = 64 * 8 + 2 * 2 * rows * kst + 4 * rows * sst + 4 * a.tp + (8 + 4) * a.tp * cap + 4 * a.tp + a.tp;
  thread_local Scratch scratch;
  const size_t qpack_bytes = 2 * (a.tp / 16) * (a.d1p / 32) * 512;
  const size_t need = 64 + qpack_bytes + t.threads * per_thread + 64;
  if (scratch.mem.size() < need) scratch.mem.resize(need);
  size_t off = 0;
  auto* qpack = reinterpret_cast<uint16_t*>(scratch.take(qpack_bytes, off));
  a.qpack = qpack;
  // The bound on |bf16 score - fp32 score| for query q, key k (q' = bf16(q), k' = bf16(k), u = 2^-24):
  //   q'.k' - q.k = q'.(k' - k) + k.(q' - q), so |q'.k' - q.k| <= ||q'|| ||k' - k|| + ||k|| ||q' - q||
  //   (Cauchy-Schwarz on the actual rounding errors, about 3x tighter than 2^-7 ||k||);
  //   the tiles' fp32 sum of d1 exact bf16 products adds <= d1 u sum|q'_i k'_i| <= d1 u ||q'|| ||k'||, and the
  //   fp32 rescoring (16 lanes of d1 / 16 terms, then 4 halvings) <= (d1 / 16 + 4) u ||q|| ||k||.
  // With ||q'|| <= ||q|| + ||q' - q|| and ||k'|| <= (1 + 2^-8) ||k||, all of it is <= qn ||k' - k|| + kfac ||k||
  // where qn bounds ||q'|| and kfac = max ||q' - q|| + 1.01 (d1 + d1 / 16 + 8) u qn (1 + 2^-7) (the 1.01 covers
  // n u / (1 - n u) for n u < 1e-2). key_bound() adds 0.1% for the fp32 norms and 1e-30 for subnormals flushed
  // by the tiles.
  float qn = 0.f, dq = 0.f;
  cpu::amx_pack_queries(a, qpack, &qn, &dq);
  a.qn = (qn + dq) * 1.001f;
  a.kfac = static_cast<float>(dq * 1.001 +
                              1.01 * (p.d1 + p.d1 / 16.0 + 8.0) * std::ldexp(1.0, -24) * a.qn * (1 + 1.0 / 128));
  std::vector<cpu::AmxThread> ws(static_cast<size_t>(t.threads));
  for (auto& w : ws) {
    w.kbuf = reinterpret_cast<uint16_t*>(scratch.take(2 * 2 * rows * kst, off));  // two units: double buffer
    w.scores = reinterpret_cast<float*>(scratch.take(4 * rows * sst, off));
    w.thr = reinterpret_cast<float*>(scratch.take(4 * a.tp, off));
    w.cand_idx = reinterpret_cast<int64_t*>(scratch.take(8 * a.tp * cap, off));
    w.cand_up = reinterpret_cast<float*>(scratch.take(4 * a.tp * cap, off));
    w.cand_n = reinterpret_cast<int32_t*>(scratch.take(4 * a.tp, off));
    w.overflow = reinterpret_cast<uint8_t*>(scratch.take(a.tp, off));
    w.cap = static_cast<int32_t>(cap);
    std::fill(w.thr, w.thr + a.tp, kNegInf);
    std::fill(w.cand_n, w.cand_n + a.tp, 0);
    std::fill(w.overflow, w.overflow + a.tp, 0);
  }
  TORCH_INTERNAL_ASSERT(off <= scratch.mem.size() - 64);

  run_chunks(
      t, p.m, [&](int) { cpu::amx_thread_begin(a); },
      [&](int tid, int64_t k0, int64_t k1) { cpu::amx_scan(a, ws[tid], k0, k1); }, [](int) { cpu::amx_thread_end(); });

  // Rescoring: each query's surviving candidates (bf16 upper bound >= the best lower bound over all threads),
  // with the exact fp32 dot. Parallel over queries when there is enough of it (long rows, many candidates).
  std::vector<uint8_t> needs_rescan(static_cast<size_t>(p.T), 0);
  std::vector<int64_t> rescored(static_cast<size_t>(p.T), 0);
  auto rescore = [&](int64_t q) {
    if (zero_row[q]) {
      // q / max(0, eps) is all zeros: every score is 0 and the first key wins.
      best[q] = 0.f;
      idx[q] = 0;
      return;
    }
    float thr = kNegInf;
    bool overflow = false;
    for (const auto& w : ws) {
      thr = std::max(thr, w.thr[q]);
      overflow = overflow || w.overflow[q];
    }
    float b = kNegInf;
    int64_t bi = -1;
    if (!overflow) {
      for (const auto& w : ws)
        for (int32_t c = 0; c < w.cand_n[q]; ++c) {
          if (!(w.cand_up[q * cap + c] >= thr)) continue;
          const int64_t i = w.cand_idx[q * cap + c];
          const float s = cpu::dot_avx512(p, q, i);
          ++rescored[q];
          if (!cpu::beats(s, -HUGE_VALF)) continue;  // never retrieved; and -inf must not seed the best
          if (bi < 0 || s > b || (s == b && i < bi)) {
            b = s;
            bi = i;
          }
        }
    }
    if (bi < 0) {
      needs_rescan[q] = 1;  // overflowed (or non-finite scores): scan this query exactly
      return;
    }
    best[q] = b;
    idx[q] = bi;
  };
  int64_t pending = 0;
  for (const auto& w : ws)
    for (int64_t q = 0; q < p.T; ++q) pending += w.cand_n[q];
  Team rt = team(p.T, 1, 2.0 * static_cast<double>(pending) * p.d1 / 5e3, 1, o);  // ~5 GB/s of scattered rows
  rt.chunk = 1;
  rt.chunks = p.T;
  rt.threads = static_cast<int>(std::min<int64_t>(rt.threads, p.T));
  run_chunks(rt, p.T, [](int) {}, [&](int, int64_t q0, int64_t q1) { for (int64_t q = q0; q < q1; ++q) rescore(q); },
             [](int) {});
  std::vector<int64_t> rescan;
  for (int64_t q = 0; q < p.T; ++q)
    if (needs_rescan[q]) rescan.push_back(q);
  if (o.debug) {
    int64_t n = 0;
    for (int64_t r : rescored) n += r;
    std::fprintf(stderr, "neuraldb amx pre-filter: T=%ld m=%ld d1=%ld threads=%d chunk=%ld bound=%g|bf16(k)-k|+%g|k| "
                 "kept/query=%.1f rescored/query=%.1f exact rescans=%zu\n", (long)p.T, (long)p.m, (long)p.d1,
                 t.threads, (long)t.chunk, a.qn, a.kfac, double(pending) / p.T, double(n) / p.T, rescan.size());
  }
  if (rescan.empty()) return;
  std::vector<float> qsub(static_cast<size_t>(rescan.size() * p.qs));
  for (size_t r = 0; r < rescan.size(); ++r)
    std::memcpy(qsub.data() + r * p.qs, p.q + rescan[r] * p.qs, sizeof(float) * p.qs);
  Problem sub = p;
  sub.q = qsub.data();
  sub.T = static_cast<int64_t>(rescan.size());
  std::vector<float> sb(rescan.size());
  std::vector<int64_t> si(rescan.size());
  exact_scan(sub, Isa::kAvx512, o, sb.data(), si.data());
  for (size_t r = 0; r < rescan.size(); ++r) {
    best[rescan[r]] = sb[r];
    idx[rescan[r]] = si[r];
  }
}

}  // namespace
#endif

bool amx_prefiltered_scan(const Problem& p, const CpuOptions& o, const std::vector<uint8_t>& zero_row, float* best,
                          int64_t* idx) {
#ifdef NEURALDB_X86
  // Groups of up to 256 queries: their packed bf16 copy stays in L2 while the keys stream past.
  constexpr int64_t kGroup = 256;
  for (int64_t t0 = 0; t0 < p.T; t0 += kGroup) {
    Problem g = p;
    g.q = p.q + t0 * p.qs;
    g.T = std::min(kGroup, p.T - t0);
    std::vector<uint8_t> zr(zero_row.begin() + t0, zero_row.begin() + t0 + g.T);
    prefilter_scan(g, o, zr, best + t0, idx + t0);
  }
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace neuraldb
