// How the CPU kernels share work between threads (header-only: the benchmark probe in csrc/bench/ uses the same).
//
// Work is split into chunks of keys that threads take in increasing order from an atomic counter (so a thread
// busy elsewhere, e.g. another process on the second core, simply takes fewer chunks). Each thread therefore
// visits its keys in increasing order, and its running best keeps the lowest index among ties.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gated_retrieval.h"

namespace neuraldb {
namespace cpu {

struct Team {
  int threads = 1;
  int64_t chunk = 0;  // keys per chunk
  int64_t chunks = 0;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The team for m rows of row_bytes each whose single-thread time is estimated at est_us; chunks are multiples of
// align rows and about chunk_bytes long.
inline Team team(int64_t m, int64_t row_bytes, double est_us, int64_t align, const CpuOptions& o,
                 int64_t chunk_bytes = 256 << 10) {
  Team t;
  int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // A thread team costs a few microseconds when the other cores are idle, and a scheduler time slice when one
  // of them is busy with another process: small problems stay on the calling thread.
  if (est_us < o.parallel_min_us) threads = 1;
#ifndef _OPENMP
  threads = 1;
#endif
  int64_t chunk = o.chunk;
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

// run_chunks without per-thread set-up.
template <class Body>
void run_chunks(const Team& t, int64_t m, Body body) {
  run_chunks(t, m, [](int) {}, body, [](int) {});
}

}  // namespace cpu
}  // namespace neuraldb
