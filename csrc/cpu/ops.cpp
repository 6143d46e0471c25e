// The entry points of the CPU op (gated_retrieval.h): the plain gated retrieval, the patch's eager residuals, and the
// sizes of the sketch rows. The pre-filtered op is in op_prefiltered.cpp; which kernel runs is decided in plan.cpp.
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/op_parts.h"

namespace neuraldb {

using cpu::Isa;
using cpu::Plan;
using cpu::Prepared;
using cpu::Problem;
using cpu::Settings;
using cpu::Team;

int64_t sign_row_bytes(int64_t d1) {
  const int64_t g = (d1 + cpu::kSketchGroup - 1) / cpu::kSketchGroup;
  return cpu::kSignHeader + 4 * cpu::kSignOutliers + 8 * g;
}

int64_t sketch_row_bytes(int64_t d1) {
  const int64_t g = (d1 + cpu::kSketchGroup - 1) / cpu::kSketchGroup;
  return cpu::round_up(cpu::kSketchHeader + 34 * g, 4);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                                   const at::Tensor& values, double gamma) {
  const Settings& s = cpu::settings();
  Prepared r = cpu::prepare("gated_retrieval_cpu", queries, keys, values);
  const Problem& p = r.p;
  if (p.T == 0 || p.m == 0) return {r.out, r.idx, r.score};
  float* best = r.score.data_ptr<float>();
  int64_t* idx = r.idx.data_ptr<int64_t>();
  const Plan pl = cpu::plan(s, p.T);
  // A handful of keys is cheaper to score exactly than to pack the queries for the tiles (unless forced).
  const bool prefiltered = pl.prefilter && p.d1 > 0 && (p.m >= 128 || pl.forced) &&
                           cpu::amx_prefiltered_scan(p, s.options, r.zero_row, best, idx);
  if (!prefiltered) cpu::exact_scan(p, pl.isa, s.options, best, idx);
  cpu::gate(values, idx, best, gamma, p.T, r.out);
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
