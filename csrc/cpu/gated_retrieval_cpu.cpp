// neuraldb::gated_retrieval_cpu: the fused CPU kernel behind backend "cpu".
//
// One pass over the keys: queries are normalised into a padded fp32 buffer, the keys are scanned in chunks by
// an ISA-specific kernel chosen at run time (scalar, AVX2+F16C, AVX-512, AVX-512 + AMX bf16 pre-filter),
// threads keep a running max/argmax (or, for the pre-filter, candidate keys) per query, a serial reduce picks
// the lowest index among equal scores, and the gate copies values[idx] where score > gamma.
//
// Tuning knobs (environment, read on every call; meant for tests and benchmarks):
//   NEURALDB_CPU_ISA=auto|scalar|avx2|avx512|amx   force a kernel ("amx" forces the pre-filter for any T;
//                                                  "avx512" leaves out VNNI, which "auto" uses where present)
//   NEURALDB_CPU_CHUNK=N                           keys per work chunk (threads take chunks in turn)
//   NEURALDB_CPU_PARALLEL_MIN_US=X                 estimated single-thread time below which no thread team
//                                                  is started (default 300; 0 always uses the team)
//   NEURALDB_CPU_AMX_MIN_T=N                       smallest T for which "auto" uses the AMX pre-filter
//   NEURALDB_CPU_AMX_CAP=N                         candidates per query and thread before the exact rescan
//   NEURALDB_CPU_AMX_TIGHT=0|1                     measure each key's bf16 rounding error (default: d1 > 2048)
//   NEURALDB_CPU_AMX_BLOCKS=1..4                   blocks of 32 keys sharing a segment of the packed queries
//   NEURALDB_CPU_DEBUG=1                           print the pre-filter's statistics to stderr
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/cpu_kernels.h"
#include "gated_retrieval.h"

namespace neuraldb {
namespace {

using cpu::KeyType;
using cpu::Problem;

constexpr float kNormEps = 1e-12f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------
// Kernels available on this CPU, and which one a call uses
// ------------------------------------------------------------------------------------------------
enum class Isa { kScalar, kAvx2, kAvx512, kAmx };

struct Support {
  bool avx2 = false, avx512 = false, vnni = false, amx = false;
};

const Support& support() {
  static const Support s = [] {
    Support r;
#ifdef NEURALDB_X86
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    r.avx512 = r.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    r.vnni = r.avx512 && __builtin_cpu_supports("avx512vnni");
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12) || (defined(__clang__) && __clang_major__ >= 16)
    r.amx = r.avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("amx-tile") &&
            __builtin_cpu_supports("amx-bf16") && cpu::amx_enable();
#endif
#endif
    return r;
  }();
  return s;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAmx: return "amx";
  }
  return "?";
}

bool supported(Isa i) {
  switch (i) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return support().avx2;
    case Isa::kAvx512: return support().avx512;
    case Isa::kAmx: return support().amx;
  }
  return false;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0', name, " must be an integer, got '", v, "'");
  return x;
}

struct Plan {
  Isa isa;          // exact scan kernel (never kAmx)
  bool prefilter;   // AMX bf16 pre-filter before the exact rescoring
  bool vnni;        // the AVX-512 sign scan's integer dots in AVX512-VNNI
};

Plan plan(int64_t T) {
  // The exact fp32 scan costs T multiply-adds per 16 key elements; the pre-filter a fixed conversion of every
  // key to bf16 plus cheap tile products. They cross near T = 10..12 on the development machine (2 threads).
  const int64_t amx_min_t = env_int("NEURALDB_CPU_AMX_MIN_T", 12);
  const char* env = std::getenv("NEURALDB_CPU_ISA");
  const std::string want = env == nullptr || *env == '\0' ? "auto" : env;
  if (want == "auto") {
    const Isa exact = support().avx512 ? Isa::kAvx512 : support().avx2 ? Isa::kAvx2 : Isa::kScalar;
    return {exact, support().amx && T >= amx_min_t, support().vnni};
  }
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (want != isa_name(i)) continue;
    TORCH_CHECK(supported(i), "NEURALDB_CPU_ISA=", want, " is not supported by this CPU (or OS)");
    // Forcing avx512 keeps to its baseline (F, BW, VL, DQ); amx takes every extension this CPU has.
    return i == Isa::kAmx ? Plan{Isa::kAvx512, true, support().vnni} : Plan{i, false, false};
  }
  TORCH_CHECK(false, "NEURALDB_CPU_ISA must be auto, scalar, avx2, avx512 or amx; got '", want, "'");
}

cpu::ScanFn scan_fn(Isa i) {
#ifdef NEURALDB_X86
  if (i == Isa::kAvx512 || i == Isa::kAmx) return cpu::scan_avx512;
  if (i == Isa::kAvx2) return cpu::scan_avx2;
#endif
  return cpu::scan_scalar;
}

// ------------------------------------------------------------------------------------------------
// Threads
// ------------------------------------------------------------------------------------------------
// Work is split into chunks of keys that threads take in increasing order from an atomic counter (so a thread
// busy elsewhere, e.g. another process on the second core, simply takes fewer chunks). Each thread therefore
// visits its keys in increasing order, and its running best keeps the lowest index among ties.
struct Team {
  int threads = 1;
  int64_t chunk = 0;    // keys per chunk
  int64_t chunks = 0;
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

Team team(int64_t m, int64_t row_bytes, double est_us, int64_t align, int64_t chunk_bytes = 256 << 10) {
  Team t;
  int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // A thread team costs a few microseconds when the other cores are idle, and a scheduler time slice when one
  // of them is busy with another process: small problems stay on the calling thread.
  const double min_us = static_cast<double>(env_int("NEURALDB_CPU_PARALLEL_MIN_US", 300));
  if (est_us < min_us) threads = 1;
#ifndef _OPENMP
  threads = 1;
#endif
  int64_t chunk = env_int("NEURALDB_CPU_CHUNK", 0);
  if (chunk <= 0) {
    chunk = round_up(std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, row_bytes)), align);
    // Enough chunks per thread that an interrupted thread does not hold up the rest.
    if (threads > 1) chunk = std::min(chunk, round_up(std::max<int64_t>(1, m / (16 * threads)), align));
  }
  chunk = std::max<int64_t>(1, chunk);
  t.chunk = chunk;
  t.chunks = (m + chunk - 1) / chunk;
  t.threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, t.chunks)));
  return t;
}

// Runs body(thread, k0, k1) over all chunks; begin(thread)/end(thread) bracket each thread's work.
template <class Begin, class Body, class End>
void run_chunks(const Team& t, int64_t m, Begin begin, Body body, End end) {
  if (t.threads <= 1) {
    begin(0);
    for (int64_t c = 0; c < t.chunks; ++c) body(0, c * t.chunk, std::min(m, (c + 1) * t.chunk));
    end(0);
    return;
  }
#ifdef _OPENMP
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(t.threads)
  {
    const int tid = omp_get_thread_num();
    begin(tid);
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= t.chunks) break;
      body(tid, c * t.chunk, std::min(m, (c + 1) * t.chunk));
    }
    end(tid);
  }
#endif
}

// Exact fp32 scan of all keys: best[t], idx[t] with the lowest index among equal scores.
void exact_scan(const Problem& p, Isa isa, float* best, int64_t* idx) {
  const cpu::ScanFn scan = scan_fn(isa);
  const int64_t row_bytes = p.d1 * (p.key_type == KeyType::kF32 ? 4 : 2);
  // ~10 GB/s per core from memory, ~50 GFLOP/s of fp32 FMA per core.
  const double est_us = std::max(static_cast<double>(p.m) * row_bytes / 1e4, 2.0 * p.m * p.d1 * p.T / 5e4);
  const Team t = team(p.m, row_bytes, est_us, 24);
  std::vector<float> tb(static_cast<size_t>(t.threads * p.T), kNegInf);
  std::vector<int64_t> ti(static_cast<size_t>(t.threads * p.T), -1);
  run_chunks(
      t, p.m, [](int) {},
      [&](int tid, int64_t k0, int64_t k1) { scan(p, k0, k1, tb.data() + tid * p.T, ti.data() + tid * p.T); },
      [](int) {});
  for (int64_t q = 0; q < p.T; ++q) {
    float b = kNegInf;
    int64_t bi = -1;
    for (int th = 0; th < t.threads; ++th) {
      const float s = tb[th * p.T + q];
      const int64_t i = ti[th * p.T + q];
      if (i >= 0 && (bi < 0 || s > b || (s == b && i < bi))) {
        b = s;
        bi = i;
      }
    }
    best[q] = b;
    idx[q] = bi;
  }
}

#ifdef NEURALDB_X86
// 64-byte aligned scratch owned by the calling thread, reused across calls.
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
void prefilter_scan(const Problem& p, const std::vector<uint8_t>& zero_row, float* best, int64_t* idx) {
  cpu::AmxProblem a;
  a.p = &p;
  a.tp = p.T <= 16 ? 16 : round_up(p.T, 32);
  a.d1p = round_up(std::max<int64_t>(p.d1, 1), 32);
  // Long rows are cut into segments of 2048 so that the bf16 keys of two (block, segment) units stay in L2.
  // Super-blocks of 2-4 blocks of 32 keys (sharing each segment of the packed queries) were slower at every d1
  // measured (1536, 4096, 14336; T = 128), so one block is the default; NEURALDB_CPU_AMX_BLOCKS overrides it.
  a.seg = std::min<int64_t>(a.d1p, 2048);
  a.nb = std::clamp<int64_t>(env_int("NEURALDB_CPU_AMX_BLOCKS", 1), 1, cpu::kMaxSuperBlocks);
  // Measured key rounding errors cost ~20% more conversion work; they matter where scores crowd together, which
  // random-ish data does more as d1 grows (their spread is ~1/sqrt(d1)).
  a.tight = env_int("NEURALDB_CPU_AMX_TIGHT", p.d1 > 2048 ? 1 : 0) != 0;
  // Candidates per query and thread before falling back to an exact rescan of that query.
  const int64_t cap = std::max<int64_t>(1, env_int("NEURALDB_CPU_AMX_CAP", 512));
  std::vector<uint16_t> live(static_cast<size_t>(a.tp / 16), 0);
  for (int64_t q = 0; q < p.T; ++q)
    if (!zero_row[q]) live[q / 16] |= static_cast<uint16_t>(1u << (q % 16));
  a.live = live.data();

  const int64_t row_bytes = p.d1 * (p.key_type == KeyType::kF32 ? 4 : 2);
  // AMX runs ~1000 bf16 MACs per cycle: the scan is memory bound.
  const double est_us = static_cast<double>(p.m) * row_bytes / 1e4;
  // Larger chunks than the exact scan: the pipeline of a chunk starts with one block it cannot overlap.
  const Team t = team(p.m, row_bytes, est_us, cpu::kAmxKeyBlock * a.nb, 1 << 20);

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
  Team rt = team(p.T, 1, 2.0 * static_cast<double>(pending) * p.d1 / 5e3, 1);  // ~5 GB/s of scattered rows
  rt.chunk = 1;
  rt.chunks = p.T;
  rt.threads = static_cast<int>(std::min<int64_t>(rt.threads, p.T));
  run_chunks(rt, p.T, [](int) {}, [&](int, int64_t q0, int64_t q1) { for (int64_t q = q0; q < q1; ++q) rescore(q); },
             [](int) {});
  std::vector<int64_t> rescan;
  for (int64_t q = 0; q < p.T; ++q)
    if (needs_rescan[q]) rescan.push_back(q);
  if (env_int("NEURALDB_CPU_DEBUG", 0) > 0) {
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
  exact_scan(sub, Isa::kAvx512, sb.data(), si.data());
  for (size_t r = 0; r < rescan.size(); ++r) {
    best[rescan[r]] = sb[r];
    idx[rescan[r]] = si[r];
  }
}
#endif

// ------------------------------------------------------------------------------------------------
// Queries in, gated values out
// ------------------------------------------------------------------------------------------------
// Rows of fp32 queries (row stride `stride`) to q / max(||q||, eps) in dst (row stride qs, zero padded). Plain
// loops over independent lanes, so that the compiler vectorises them, once per ISA (picked when loaded).
#if defined(NEURALDB_X86) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void normalize_rows(const float* src, int64_t stride, int64_t T, int64_t d1, float* dst, int64_t qs,
                    uint8_t* zero_row) {
  for (int64_t t = 0; t < T; ++t) {
    const float* row = src + t * stride;
    float* out = dst + t * qs;
    // fp32 sum of squares, as the reference's q.float().norm() (same underflow / overflow behaviour).
    float part[16] = {};
    int64_t j = 0;
    for (; j + 16 <= d1; j += 16)
      for (int l = 0; l < 16; ++l) part[l] += row[j + l] * row[j + l];
    for (; j < d1; ++j) part[j % 16] += row[j] * row[j];
    float ss = 0.f;
    for (float v : part) ss += v;
    const float norm = std::max(std::sqrt(ss), kNormEps);
    for (j = 0; j < d1; ++j) out[j] = row[j] / norm;
    std::fill(out + d1, out + qs, 0.f);
    bool zero = true;
    if (!(ss > 0.f))  // only then can every q / norm be zero (ss == 0: zero or subnormal-sized entries)
      for (j = 0; j < d1; ++j) zero = zero && out[j] == 0.f;
    else
      zero = false;
    zero_row[t] = zero;
  }
}

template <class V, class O>
void gather_rows(const at::Tensor& values, const int64_t* idx, const float* score, float gamma, int64_t T,
                 at::Tensor& out) {
  const V* src = values.data_ptr<V>();
  O* dst = out.data_ptr<O>();
  const int64_t d2 = values.size(1), vs = values.stride(0);
  for (int64_t t = 0; t < T; ++t) {
    if (idx[t] < 0 || !(score[t] > gamma)) continue;  // out was zero filled
    const V* row = src + idx[t] * vs;
    for (int64_t j = 0; j < d2; ++j) dst[t * d2 + j] = static_cast<O>(static_cast<float>(row[j]));
  }
}

template <class V>
void gather_any(const at::Tensor& values, const int64_t* idx, const float* score, float gamma, int64_t T,
                at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat: return gather_rows<V, float>(values, idx, score, gamma, T, out);
    case at::kHalf: return gather_rows<V, c10::Half>(values, idx, score, gamma, T, out);
    case at::kBFloat16: return gather_rows<V, c10::BFloat16>(values, idx, score, gamma, T, out);
    default: TORCH_CHECK(false, "gated_retrieval_cpu: unsupported output dtype ", out.scalar_type());
  }
}

bool is_float_type(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

}  // namespace

int64_t read_probe(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "read_probe: expected a contiguous CPU tensor");
  const auto* p = static_cast<const char*>(t.data_ptr());
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  // Same threading as the kernels: 256 KB chunks taken in turn by the thread team. With AVX-512: 512-bit loads
  // and a software prefetch NEURALDB_READ_PREFETCH bytes ahead (default 1024; 0 = none).
  const int64_t lines = (bytes + 63) / 64;
  const Team team_ = team(lines, 64, static_cast<double>(bytes) / 1e4, 64);
  const int64_t pf = env_int("NEURALDB_READ_PREFETCH", 1024);
  const bool wide = plan(1).isa == Isa::kAvx512;  // NEURALDB_CPU_ISA=avx2/scalar: the portable loop
  std::vector<uint64_t> acc(static_cast<size_t>(team_.threads), 0);
  run_chunks(
      team_, lines, [](int) {},
      [&](int tid, int64_t a, int64_t b) {
        const char* s = p + a * 64;
        const int64_t n = std::min(bytes, b * 64) - a * 64;
#ifdef NEURALDB_X86
        if (wide) {
          acc[tid] ^= cpu::read_avx512(s, n, pf);
          return;
        }
#endif
        uint64_t x[8] = {};
        int64_t i = 0;
        for (; i + 64 <= n; i += 64)
          for (int l = 0; l < 8; ++l) {
            uint64_t w;
            std::memcpy(&w, s + i + 8 * l, 8);
            x[l] ^= w;
          }
        for (; i + 8 <= n; i += 8) {
          uint64_t w;
          std::memcpy(&w, s + i, 8);
          x[0] ^= w;
        }
        for (; i < n; ++i) x[0] ^= static_cast<unsigned char>(s[i]);
        for (int l = 0; l < 8; ++l) acc[tid] ^= x[l];
      },
      [](int) {});
  uint64_t r = 0;
  for (uint64_t v : acc) r ^= v;
  return static_cast<int64_t>(r & 0x7fffffffffffffffULL);
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> r;
  for (Isa i : {Isa::kAmx, Isa::kAvx512, Isa::kAvx2, Isa::kScalar})
    if (supported(i)) r.emplace_back(isa_name(i));
  return r;
}

namespace {

// What both CPU ops share: checked inputs, the outputs (zeros, idx -1, score -inf) and the normalised queries.
struct Prepared {
  at::Tensor out, idx, score;
  Problem p;
  std::vector<uint8_t> zero_row;
};

Prepared prepare(const char* op, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(queries.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(), op,
              ": queries, keys and values must be CPU tensors");
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && values.dim() == 2, op,
              ": expected queries (T, d1), keys (m, d1), values (m, d2)");
  TORCH_CHECK(is_float_type(queries.scalar_type()) && is_float_type(keys.scalar_type()) &&
                  is_float_type(values.scalar_type()),
              op, ": queries, keys and values must be float32, float16 or bfloat16");
  const int64_t T = queries.size(0), d1 = queries.size(1), m = keys.size(0), d2 = values.size(1);
  TORCH_CHECK(keys.size(1) == d1, op, ": keys must be (m, ", d1, "), got ", keys.sizes());
  TORCH_CHECK(values.size(0) == m, op, ": values must have ", m, " rows, got ", values.sizes());
  // Rows are read as contiguous runs; overlapping rows (stride(0) < d, e.g. expanded tensors) are fine.
  auto unit_rows = [](const at::Tensor& x) { return x.size(1) <= 1 || x.stride(1) == 1; };
  TORCH_CHECK(unit_rows(queries) && unit_rows(keys) && unit_rows(values), op,
              ": rows of queries, keys and values must be unit-stride");

  Prepared r;
  // Filled here rather than by at::zeros / at::full: their fill kernels dispatch through TensorIterator, which
  // costs tens of microseconds per decode step once a scan has evicted that code and its data from the caches.
  r.out = at::empty({T, d2}, queries.options());
  std::memset(r.out.data_ptr(), 0, r.out.nbytes());  // all-zero bytes are +0 in fp32, fp16 and bf16
  r.idx = at::empty({T}, queries.options().dtype(at::kLong));
  std::fill_n(r.idx.data_ptr<int64_t>(), T, int64_t{-1});
  r.score = at::empty({T}, queries.options().dtype(at::kFloat));
  std::fill_n(r.score.data_ptr<float>(), T, kNegInf);
  if (T == 0 || m == 0) return r;

  // Normalised, zero padded fp32 queries (rows of qs floats, qs a multiple of 64 so every vector load of a
  // query row stays inside it).
  const int64_t qs = round_up(std::max<int64_t>(d1, 1), 64);
  // Reused per calling thread: a fresh buffer of T x qs floats costs page faults and a memset on every call.
  thread_local std::vector<float> qbuf_storage;
  if (qbuf_storage.size() < static_cast<size_t>(T * qs + 16)) qbuf_storage.resize(static_cast<size_t>(T * qs + 16));
  float* const qbuf = qbuf_storage.data();
  r.zero_row.resize(static_cast<size_t>(T));
  {
    // fp16/bf16 queries: one (vectorised) conversion to fp32 first; fp32 rows are read where they are.
    const at::Tensor qf = queries.scalar_type() == at::kFloat ? queries : queries.to(at::kFloat).contiguous();
    normalize_rows(qf.data_ptr<float>(), T > 1 ? qf.stride(0) : d1, T, d1, qbuf, qs, r.zero_row.data());
  }

  Problem& p = r.p;
  p.q = qbuf;
  p.T = T;
  p.qs = qs;
  p.keys = keys.data_ptr();
  p.m = m;
  p.ks = m > 1 ? keys.stride(0) : d1;
  p.d1 = d1;
  p.key_type = keys.scalar_type() == at::kHalf ? KeyType::kF16
               : keys.scalar_type() == at::kBFloat16 ? KeyType::kBF16
                                                     : KeyType::kF32;
  return r;
}

// out[t] = values[idx[t]] where score[t] > gamma (the reference compares fp32 scores with gamma cast to fp32).
void gate(const at::Tensor& values, const int64_t* idx, const float* score, double gamma, int64_t T, at::Tensor& out) {
  const float g = static_cast<float>(gamma);
  switch (values.scalar_type()) {
    case at::kFloat: gather_any<float>(values, idx, score, g, T, out); break;
    case at::kHalf: gather_any<c10::Half>(values, idx, score, g, T, out); break;
    default: gather_any<c10::BFloat16>(values, idx, score, g, T, out); break;
  }
}

cpu::DotFn dot_fn(Isa i) {
#ifdef NEURALDB_X86
  if (i == Isa::kAvx512 || i == Isa::kAmx) return cpu::dot_avx512;
  if (i == Isa::kAvx2) return cpu::dot_avx2;
#endif
  return cpu::dot_scalar;
}

cpu::SketchFn sketch_fn(Isa i, int64_t groups) {
#ifdef NEURALDB_X86
  if ((i == Isa::kAvx512 || i == Isa::kAmx) && groups <= cpu::kSketchMaxSimdGroups) return cpu::sketch_scores_avx512;
  if (i == Isa::kAvx2) return cpu::sketch_scores_avx2;
#endif
  return cpu::sketch_scores_scalar;
}

// n u / (1 - n u) with u = 2^-24: the relative error bound of an fp32 sum of n terms, in any order.
double gamma_n(int64_t n) {
  const double nu = static_cast<double>(n) * std::ldexp(1.0, -24);
  return nu / (1.0 - nu);
}

// The queries quantised for the sketch scan, and per query the two factors of the bound (see below).
struct SketchQueries {
  std::vector<int8_t> q8;
  std::vector<float> qscale;
  std::vector<int32_t> off;
  std::vector<double> a, b;
};

// Query t (normalised, fp32: qn) becomes qhat = qscale_g q8 with one scale per group of 64 (max |qn| / 127).
// With the key's sketch dq, e >= ||k - dq|| and n >= max(||k||, ||dq||) from its row, and s the fp32 sketch score:
//   fp32(qn . k) <= qn . k + g(d1) ||qn|| n                     (the exact kernel's dot, any summation order)
//   qn . k = qhat . dq + (qn - qhat) . dq + qn . (k - dq) <= qhat . dq + ||qn - qhat|| n + ||qn|| e
//   qhat . dq <= s + g(G + 8) ||qhat|| n                         (integer group dots are exact; see SketchFn)
// so fp32(qn . k) <= s + a e + b n with a = ||qn||, b = ||qn - qhat|| + g(d1) ||qn|| + g(G + 8) ||qhat||. The
// norms are float64 sums of fp32 squares (relative error ~1e-14), rounded up by 1e-9.
SketchQueries quantize_queries(const Problem& p, int64_t G) {
  SketchQueries r;
  const int64_t w = G * cpu::kSketchGroup;  // == p.qs: queries are zero padded to a multiple of 64
  r.q8.assign(static_cast<size_t>(p.T * w), 0);
  r.qscale.assign(static_cast<size_t>(p.T * G), 0.f);
  r.off.assign(static_cast<size_t>(p.T * G * 16), 0);
  r.a.resize(static_cast<size_t>(p.T));
  r.b.resize(static_cast<size_t>(p.T));
  constexpr double kUp = 1 + 1e-9;
  for (int64_t t = 0; t < p.T; ++t) {
    const float* q = p.q + t * p.qs;
    double nn = 0, ee = 0, hh = 0;
    for (int64_t g = 0; g < G; ++g) {
      const float* x = q + g * cpu::kSketchGroup;
      float amax = 0.f;
      for (int j = 0; j < cpu::kSketchGroup; ++j) amax = std::max(amax, std::fabs(x[j]));
      const float scale = amax / 127.f;
      r.qscale[t * G + g] = scale;
      int8_t* c = r.q8.data() + t * w + g * cpu::kSketchGroup;
      for (int j = 0; j < cpu::kSketchGroup; ++j) {
        // Non-finite queries get code 0: their norms below are NaN, which keeps every key for the exact rescoring.
        const float v = scale > 0.f && std::isfinite(scale) ? cpu::round_half_even(x[j] / scale) : 0.f;
        c[j] = static_cast<int8_t>(std::isfinite(v) ? std::clamp(v, -127.f, 127.f) : 0.f);
        const double qhat = static_cast<double>(scale) * c[j];
        nn += static_cast<double>(x[j]) * x[j];
        ee += (x[j] - qhat) * (x[j] - qhat);
        hh += qhat * qhat;
      }
      for (int l = 0; l < 16; ++l)
        r.off[(t * G + g) * 16 + l] = 8 * (c[4 * l] + c[4 * l + 1] + c[4 * l + 2] + c[4 * l + 3]);
    }
    r.a[t] = std::sqrt(nn) * kUp;
    r.b[t] = std::sqrt(ee) * kUp + gamma_n(p.d1) * r.a[t] + gamma_n(G + 8) * std::sqrt(hh) * kUp;
  }
  return r;
}

cpu::SignFn sign_fn(const Plan& pl) {
#ifdef NEURALDB_X86
  if (pl.isa == Isa::kAvx512) return pl.vnni ? cpu::sign_pass_avx512_vnni : cpu::sign_pass_avx512;
  if (pl.isa == Isa::kAvx2) return cpu::sign_pass_avx2;
#endif
  return cpu::sign_pass_scalar;
}

// The queries quantised for the sign scan, and per query the constants of its bound (see below).
struct SignQueries {
  std::vector<uint8_t> qu;
  std::vector<int8_t> q8;
  std::vector<int32_t> qsum;
  std::vector<double> c, l1, a, b;
};

// A sign row holds, for key k: signs s (s_j = +1 or -1), a scale a, the outlier set J with v_j = fp16(k_j - a s_j),
// r >= ||k - a s - v_J|| and n >= max(||k||, ||v_J||). Query t (normalised, fp32: qn) becomes c q8 + dq with one
// scale c = max |qn| / 127, and with dot = q8 . s (exact) and s1 the fp32 outlier sum of the kernel:
//   fp32(qn . k) <= qn . k + g(d1) ||qn|| n                     (the exact kernel's dot, any summation order)
//   qn . k = a (qn . s) + qn . v_J + qn . (k - a s - v_J) <= a (qn . s) + qn . v_J + ||qn|| r
//   qn . s = c dot + dq . s <= c dot + ||dq||_1
//   qn . v_J <= s1 + g(kSignOutliers) ||qn|| n
// so fp32(qn . k) <= s1 + a_key (c dot + l1) + A r + B n with l1 = ||dq||_1, A = ||qn||,
// B = (g(d1) + g(kSignOutliers)) ||qn||. The per-query sums are float64 (relative error ~1e-13), rounded up by 1e-9.
// The scans evaluate it with cpu::sign_bound_passes.
SignQueries quantize_sign_queries(const Problem& p, int64_t G) {
  SignQueries r;
  const int64_t w = G * cpu::kSketchGroup;
  r.qu.assign(static_cast<size_t>(p.T * w), 128);
  r.q8.assign(static_cast<size_t>(p.T * w), 0);
  r.qsum.assign(static_cast<size_t>(p.T), 0);
  r.c.resize(static_cast<size_t>(p.T));
  r.l1.resize(static_cast<size_t>(p.T));
  r.a.resize(static_cast<size_t>(p.T));
  r.b.resize(static_cast<size_t>(p.T));
  constexpr double kUp = 1 + 1e-9;
  for (int64_t t = 0; t < p.T; ++t) {
    const float* q = p.q + t * p.qs;
    float amax = 0.f;
    for (int64_t j = 0; j < p.d1; ++j) amax = std::max(amax, std::fabs(q[j]));
    const float scale = amax / 127.f;
    double nn = 0, l1 = 0;
    int32_t sum = 0;
    for (int64_t j = 0; j < p.d1; ++j) {
      // Non-finite queries get code 0: their norm is NaN (or inf), which keeps every key for the next stage.
      const float v = scale > 0.f && std::isfinite(scale) ? cpu::round_half_even(q[j] / scale) : 0.f;
      const int c = static_cast<int>(std::isfinite(v) ? std::clamp(v, -127.f, 127.f) : 0.f);
      r.qu[t * w + j] = static_cast<uint8_t>(c + 128);
      r.q8[t * w + j] = static_cast<int8_t>(c);
      sum += c;
      nn += static_cast<double>(q[j]) * q[j];
      l1 += std::fabs(q[j] - static_cast<double>(scale) * c);
    }
    r.qsum[t] = sum;
    r.c[t] = scale;
    r.l1[t] = l1 * kUp;
    r.a[t] = std::sqrt(nn) * kUp;
    r.b[t] = (gamma_n(p.d1) + gamma_n(cpu::kSignOutliers)) * r.a[t];
  }
  return r;
}

}  // namespace

int64_t sign_row_bytes(int64_t d1) {
  const int64_t g = (d1 + cpu::kSketchGroup - 1) / cpu::kSketchGroup;
  return cpu::kSignHeader + 4 * cpu::kSignOutliers + 8 * g;
}

int64_t sketch_row_bytes(int64_t d1) {
  const int64_t g = (d1 + cpu::kSketchGroup - 1) / cpu::kSketchGroup;
  return round_up(cpu::kSketchHeader + 34 * g, 4);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                                   const at::Tensor& values, double gamma) {
  Prepared r = prepare("gated_retrieval_cpu", queries, keys, values);
  const Problem& p = r.p;
  if (p.T == 0 || p.m == 0) return {r.out, r.idx, r.score};
  const int64_t T = p.T;
  float* best = r.score.data_ptr<float>();
  int64_t* idx = r.idx.data_ptr<int64_t>();
  const Plan pl = plan(T);
  // A handful of keys is cheaper to score exactly than to pack the queries for the tiles (unless forced).
  const bool forced = std::getenv("NEURALDB_CPU_ISA") != nullptr && std::string(std::getenv("NEURALDB_CPU_ISA")) == "amx";
  if (pl.prefilter && p.d1 > 0 && (p.m >= 128 || forced)) {
#ifdef NEURALDB_X86
    // Groups of up to 256 queries: their packed bf16 copy stays in L2 while the keys stream past.
    constexpr int64_t kGroup = 256;
    for (int64_t t0 = 0; t0 < T; t0 += kGroup) {
      Problem g = p;
      g.q = p.q + t0 * p.qs;
      g.T = std::min(kGroup, T - t0);
      std::vector<uint8_t> zr(r.zero_row.begin() + t0, r.zero_row.begin() + t0 + g.T);
      prefilter_scan(g, zr, best + t0, idx + t0);
    }
#endif
  } else {
    exact_scan(p, pl.isa, best, idx);
  }
  gate(values, idx, best, gamma, T, r.out);
  return {r.out, r.idx, r.score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_prefiltered_cpu(const at::Tensor& queries,
                                                                               const at::Tensor& keys,
                                                                               const at::Tensor& values, double gamma,
                                                                               const at::Tensor& sketch,
                                                                               const c10::optional<at::Tensor>& signs) {
  constexpr const char* op = "gated_retrieval_prefiltered_cpu";
  Prepared r = prepare(op, queries, keys, values);
  const Problem& p = r.p;
  TORCH_CHECK(sketch.device().is_cpu() && sketch.scalar_type() == at::kByte && sketch.dim() == 2, op,
              ": sketch must be a 2-D uint8 CPU tensor");
  TORCH_CHECK(sketch.size(0) == keys.size(0) && sketch.size(1) == sketch_row_bytes(queries.size(1)), op,
              ": sketch must be (", keys.size(0), ", ", sketch_row_bytes(queries.size(1)), "), got ", sketch.sizes());
  TORCH_CHECK(sketch.size(1) <= 1 || sketch.stride(1) == 1, op, ": rows of sketch must be unit-stride");
  const bool cascade = signs.has_value();
  if (cascade) {
    TORCH_CHECK(signs->device().is_cpu() && signs->scalar_type() == at::kByte && signs->dim() == 2, op,
                ": signs must be a 2-D uint8 CPU tensor");
    TORCH_CHECK(signs->size(0) == keys.size(0) && signs->size(1) == sign_row_bytes(queries.size(1)), op,
                ": signs must be (", keys.size(0), ", ", sign_row_bytes(queries.size(1)), "), got ", signs->sizes());
    TORCH_CHECK(signs->stride(1) == 1, op, ": rows of signs must be unit-stride");
    // Outlier indices are uint16, and the sign scans' integer dots are exact in fp32 up to this width.
    TORCH_CHECK(queries.size(1) <= cpu::kMaxSignD1, op, ": signs need keys of at most ", cpu::kMaxSignD1,
                " columns, got ", queries.size(1));
  }
  if (p.T == 0 || p.m == 0) return {r.out, r.idx, r.score};
  const int64_t T = p.T, m = p.m, G = p.qs / cpu::kSketchGroup;

  const SketchQueries sq = quantize_queries(p, G);
  cpu::SketchProblem sp;
  sp.sketch = sketch.data_ptr<uint8_t>();
  sp.ss = m > 1 ? sketch.stride(0) : sketch.size(1);
  sp.G = G;
  sp.T = T;
  sp.q8 = sq.q8.data();
  sp.qscale = sq.qscale.data();
  sp.off = sq.off.data();
  const Plan pl = plan(T);
  const cpu::SketchFn scores = sketch_fn(pl.isa, G);
  const float g = static_cast<float>(gamma);

  SignQueries gq;
  cpu::SignProblem gp;
  if (cascade) {
    gq = quantize_sign_queries(p, G);
    gp.signs = signs->data_ptr<uint8_t>();
    gp.ss = m > 1 ? signs->stride(0) : signs->size(1);
    gp.G = G;
    gp.T = T;
    gp.qu = gq.qu.data();
    gp.q8 = gq.q8.data();
    gp.qsum = gq.qsum.data();
    gp.q = p.q;
    gp.qs = p.qs;
    gp.c = gq.c.data();
    gp.l1 = gq.l1.data();
    gp.a = gq.a.data();
    gp.b = gq.b.data();
    gp.gamma = static_cast<float>(gamma);
  }
  const cpu::SignFn sign_pass = sign_fn(pl);

  // ~10 GB/s per core from memory; ~1.2 ns per group and query of integer dot products (int4), ~0.4 (signs).
  const int64_t scan_bytes = cascade ? gp.ss : sp.ss;
  const double est_us = static_cast<double>(m) * std::max(scan_bytes / 1e4, (cascade ? 0.4e-3 : 1.2e-3) * G * T);
  const Team team_ = team(m, scan_bytes, est_us, 1);
  std::vector<std::vector<float>> sbuf(static_cast<size_t>(team_.threads));
  std::vector<std::vector<int64_t>> pbuf(static_cast<size_t>(team_.threads));
  std::vector<std::vector<std::pair<int64_t, int64_t>>> cand(static_cast<size_t>(team_.threads));
  std::vector<int64_t> passed_signs(static_cast<size_t>(team_.threads), 0);
  // Whether key i can pass the gate for query t by its int4 bound, given its sketch score si.
  auto int4_keeps = [&](int64_t i, int64_t t, double si) {
    float en[2];
    std::memcpy(en, sp.sketch + i * sp.ss, sizeof en);
    const double terms = sq.a[t] * en[0] + sq.b[t] * en[1];
    // The float64 sum may round down by a few 2^-53 of its terms; 1e-9 of them covers it. NaN keeps the key.
    const double ub = si + terms + 1e-9 * (std::fabs(si) + terms);
    return !(ub < g);
  };
  run_chunks(
      team_, m,
      [&](int tid) {
        sbuf[tid].resize(static_cast<size_t>(cascade ? T : team_.chunk * T));
      },
      [&](int tid, int64_t k0, int64_t k1) {
        float* s = sbuf[tid].data();
        if (!cascade) {
          scores(sp, k0, k1, s);
          for (int64_t i = k0; i < k1; ++i)
            for (int64_t t = 0; t < T; ++t)
              if (int4_keeps(i, t, s[(i - k0) * T + t])) cand[tid].emplace_back(i, t);
          return;
        }
        std::vector<int64_t>& pass = pbuf[tid];
        pass.clear();
        sign_pass(gp, k0, k1, pass);
        passed_signs[tid] += static_cast<int64_t>(pass.size() / 2);
        // The int4 scores of a key serve all its queries: pairs come grouped by key.
        int64_t scored = -1;
        for (size_t e = 0; e < pass.size(); e += 2) {
          const int64_t i = pass[e], t = pass[e + 1];
          if (i != scored) {
            scores(sp, i, i + 1, s);
            scored = i;
          }
          if (int4_keeps(i, t, s[t])) cand[tid].emplace_back(i, t);
        }
      },
      [](int) {});

  // Rescoring with the dot the exact scan of this ISA computes, so scores are bitwise the plain op's.
  const cpu::DotFn dot = dot_fn(pl.isa);
  float* best = r.score.data_ptr<float>();
  int64_t* idx = r.idx.data_ptr<int64_t>();
  std::vector<float> b(static_cast<size_t>(T), kNegInf);
  std::vector<int64_t> bi(static_cast<size_t>(T), -1);
  int64_t n = 0;
  for (const auto& c : cand)
    for (const auto& [i, t] : c) {
      const float s = dot(p, t, i);
      ++n;
      if (cpu::beats(s, b[t]) || (s == b[t] && bi[t] >= 0 && i < bi[t])) {
        b[t] = s;
        bi[t] = i;
      }
    }
  for (int64_t t = 0; t < T; ++t)
    if (bi[t] >= 0 && b[t] > g) {
      best[t] = b[t];
      idx[t] = bi[t];
    }
  if (env_int("NEURALDB_CPU_DEBUG", 0) > 0)
    std::fprintf(stderr,
                 "neuraldb pre-filter: T=%ld m=%ld d1=%ld isa=%s threads=%d signs=%d passed signs/query=%.2f "
                 "rescored/query=%.2f\n",
                 (long)T, (long)m, (long)p.d1, isa_name(pl.isa), team_.threads, int(cascade),
                 cascade ? double(std::accumulate(passed_signs.begin(), passed_signs.end(), int64_t{0})) / T
                         : double(m),
                 double(n) / T);
  gate(values, idx, best, gamma, T, r.out);
  return {r.out, r.idx, r.score};
}

std::optional<at::Tensor> gated_residuals_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                              const at::Tensor& values, double gamma,
                                              const std::optional<at::Tensor>& sketch,
                                              const std::optional<at::Tensor>& signs, int64_t sketch_max_rows) {
  TORCH_CHECK(queries.dim() >= 1 && keys.dim() == 2 && values.dim() == 2, "gated_residuals_cpu: queries must be "
              "(..., d1), keys (m, d1) and values (m, d2); got ", queries.sizes(), ", ", keys.sizes(), ", ",
              values.sizes());
  // Flattened here rather than in Python: on a decode step a tensor method called from Python costs more host time
  // than the reshape itself (its caches are cold from the model's weights).
  at::Tensor q = queries.reshape({-1, queries.size(-1)});
  if (q.size(1) > 1 && q.stride(1) != 1) q = q.contiguous();
  const bool use_sketch = sketch.has_value() && q.size(0) <= sketch_max_rows;
  auto [out, idx, score] = use_sketch ? gated_retrieval_prefiltered_cpu(q, keys, values, gamma, *sketch, signs)
                                      : gated_retrieval_cpu(q, keys, values, gamma);
  // The gate's own test (gate() above): a row is open where its fp32 score exceeds gamma cast to fp32.
  const float g = static_cast<float>(gamma);
  const float* s = score.data_ptr<float>();
  for (int64_t t = 0; t < score.numel(); ++t) {
    if (s[t] > g) {
      std::vector<int64_t> shape(queries.sizes().begin(), queries.sizes().end());
      shape.back() = values.size(1);
      return out.view(shape);
    }
  }
  return std::nullopt;
}

}  // namespace neuraldb
