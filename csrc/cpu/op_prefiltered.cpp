// neuraldb::gated_retrieval_prefiltered_cpu: the exact sketch pre-filter. Keys are scanned through their 1-bit rows
// (when signs are given) and their int4 rows; only the keys whose upper bound reaches gamma (query_quantisers.cpp
// derives the bounds) are rescored with the exact scan's own dot, so the output is the plain op's bitwise.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/op_parts.h"

namespace neuraldb {

using cpu::Isa;
using cpu::Plan;
using cpu::Prepared;
using cpu::Problem;
using cpu::Settings;
using cpu::Team;

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_prefiltered_cpu(const at::Tensor& queries,
                                                                               const at::Tensor& keys,
                                                                               const at::Tensor& values, double gamma,
                                                                               const at::Tensor& sketch,
                                                                               const c10::optional<at::Tensor>& signs) {
  constexpr const char* op = "gated_retrieval_prefiltered_cpu";
  const Settings& s = cpu::settings();
  Prepared r = cpu::prepare(op, queries, keys, values);
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

  const cpu::SketchQueries sq = cpu::quantize_queries(p, G);
  cpu::SketchProblem sp;
  sp.sketch = sketch.data_ptr<uint8_t>();
  sp.ss = m > 1 ? sketch.stride(0) : sketch.size(1);
  sp.G = G;
  sp.T = T;
  sp.q8 = sq.q8.data();
  sp.qscale = sq.qscale.data();
  sp.off = sq.off.data();
  const Plan pl = cpu::plan(s, T);
  const cpu::SketchFn scores = cpu::sketch_fn(pl.isa, G);
  const float g = static_cast<float>(gamma);

  cpu::SignQueries gq;
  cpu::SignProblem gp;
  if (cascade) {
    gq = cpu::quantize_sign_queries(p, G);
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
  const cpu::SignFn sign_pass = cpu::sign_fn(pl);

  // ~10 GB/s per core from memory; ~1.2 ns per group and query of integer dot products (int4), ~0.4 (signs).
  const int64_t scan_bytes = cascade ? gp.ss : sp.ss;
  const double est_us = static_cast<double>(m) * std::max(scan_bytes / 1e4, (cascade ? 0.4e-3 : 1.2e-3) * G * T);
  const Team team_ = cpu::team(m, scan_bytes, est_us, 1, s.options);
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
  cpu::run_chunks(
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
  const cpu::DotFn dot = cpu::dot_fn(pl.isa);
  float* best = r.score.data_ptr<float>();
  int64_t* idx = r.idx.data_ptr<int64_t>();
  std::vector<float> b(static_cast<size_t>(T), cpu::kNegInf);
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
  if (s.options.debug)
    std::fprintf(stderr,
                 "neuraldb pre-filter: T=%ld m=%ld d1=%ld isa=%s threads=%d signs=%d passed signs/query=%.2f "
                 "rescored/query=%.2f\n",
                 (long)T, (long)m, (long)p.d1, cpu::isa_name(pl.isa), team_.threads, int(cascade),
                 cascade ? double(std::accumulate(passed_signs.begin(), passed_signs.end(), int64_t{0})) / T
                         : double(m),
                 double(n) / T);
  cpu::gate(values, idx, best, gamma, T, r.out);
  return {r.out, r.idx, r.score};
}

}  // namespace neuraldb
