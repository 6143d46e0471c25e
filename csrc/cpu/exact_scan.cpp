// The threaded exact fp32 scan: each thread keeps a running best per query over the chunks it takes, and a serial
// reduce picks the lowest index among equal scores.
#include <algorithm>
#include <vector>

#include "cpu/op_parts.h"

namespace neuraldb {
namespace cpu {

void exact_scan(const Problem& p, Isa isa, const CpuOptions& o, float* best, int64_t* idx) {
  const ScanFn scan = scan_fn(isa);
  const int64_t row_bytes = p.d1 * (p.key_type == KeyType::kF32 ? 4 : 2);
  // ~10 GB/s per core from memory, ~50 GFLOP/s of fp32 FMA per core.
  const double est_us = std::max(static_cast<double>(p.m) * row_bytes / 1e4, 2.0 * p.m * p.d1 * p.T / 5e4);
  const Team t = team(p.m, row_bytes, est_us, 24, o);
  std::vector<float> tb(static_cast<size_t>(t.threads * p.T), kNegInf);
  std::vector<int64_t> ti(static_cast<size_t>(t.threads * p.T), -1);
  run_chunks(t, p.m, [&](int tid, int64_t k0, int64_t k1) {
    scan(p, k0, k1, tb.data() + tid * p.T, ti.data() + tid * p.T);
  });
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

}  // namespace cpu
}  // namespace neuraldb
