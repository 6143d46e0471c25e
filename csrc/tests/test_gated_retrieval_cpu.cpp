// ctest: neuraldb::gated_retrieval_cpu against a naive double-precision loop, for every CPU kernel this
// machine can run (NEURALDB_CPU_ISA), every key/query dtype, odd shapes, ties and the threaded path.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "gated_retrieval.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                 \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                  \
      std::fprintf(stderr, "\n");                         \
    }                                                     \
  } while (0)

struct Naive {
  int64_t idx;
  double best;
  double second;  // best score among the other keys (-inf when m == 1)
};

// q / max(||q||, 1e-12) in fp32 as the spec says, then dot products with every key in double.
std::vector<Naive> naive(const at::Tensor& queries, const at::Tensor& keys) {
  const auto q = queries.to(at::kFloat).contiguous();
  const auto k = keys.to(at::kFloat).contiguous();
  const int64_t T = q.size(0), d = q.size(1), m = k.size(0);
  std::vector<Naive> r(T);
  for (int64_t t = 0; t < T; ++t) {
    const float* qr = q.data_ptr<float>() + t * d;
    float ss = 0.f;
    for (int64_t j = 0; j < d; ++j) ss += qr[j] * qr[j];
    const float norm = std::max(std::sqrt(ss), 1e-12f);
    Naive n{-1, -INFINITY, -INFINITY};
    for (int64_t i = 0; i < m; ++i) {
      const float* kr = k.data_ptr<float>() + i * d;
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += static_cast<double>(qr[j] / norm) * kr[j];
      if (s > n.best) {
        n.second = n.best;
        n.best = s;
        n.idx = i;
      } else if (s > n.second) {
        n.second = s;
      }
    }
    r[t] = n;
  }
  return r;
}

void check(const std::string& name, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
           double gamma) {
  const auto [out, idx, score] = neuraldb::gated_retrieval_cpu(queries, keys, values, gamma);
  const int64_t T = queries.size(0), m = keys.size(0);
  EXPECT(out.sizes() == at::IntArrayRef({T, values.size(1)}) && out.scalar_type() == queries.scalar_type(),
         "%s: out shape/dtype", name.c_str());
  EXPECT(idx.scalar_type() == at::kLong && score.scalar_type() == at::kFloat, "%s: idx/score dtype", name.c_str());
  const auto ref = naive(queries, keys);
  const auto rows = values.to(queries.scalar_type());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t i = idx[t].item<int64_t>();
    const double s = score[t].item<float>();
    if (m == 0) {
      EXPECT(i == -1 && std::isinf(s) && s < 0, "%s: empty db row %ld gives idx %ld score %f", name.c_str(), (long)t,
             (long)i, s);
      EXPECT(out[t].abs().max().item<double>() == 0.0, "%s: empty db row %ld out not zero", name.c_str(), (long)t);
      continue;
    }
    // Backends may differ from exact arithmetic only where two scores, or a score and gamma, nearly tie.
    const bool near_tie = ref[t].best - ref[t].second <= 1e-3;
    EXPECT(near_tie || i == ref[t].idx, "%s: row %ld idx %ld, expected %ld (best %.6f second %.6f)", name.c_str(),
           (long)t, (long)i, (long)ref[t].idx, ref[t].best, ref[t].second);
    EXPECT(std::fabs(s - ref[t].best) <= 1e-4, "%s: row %ld score %.7f, expected %.7f", name.c_str(), (long)t, s,
           ref[t].best);
    if (std::fabs(ref[t].best - gamma) <= 1e-3) continue;
    const bool open = ref[t].best > gamma;
    if (open)
      EXPECT(at::equal(out[t], rows[i]), "%s: row %ld out != values[%ld]", name.c_str(), (long)t, (long)i);
    else
      EXPECT(out[t].abs().max().item<double>() == 0.0, "%s: row %ld gate should be closed", name.c_str(), (long)t);
  }
}

at::Tensor unit_rows(int64_t m, int64_t d, at::ScalarType dtype) {
  auto k = at::randn({m, d});
  return (k / k.norm(2, {1}, true).clamp_min(1e-12)).to(dtype);
}

void run_all(const std::string& isa) {
  const at::ScalarType dtypes[] = {at::kHalf, at::kBFloat16, at::kFloat};
  struct Shape {
    int64_t T, m, d;
  };
  const Shape shapes[] = {{1, 1, 16}, {3, 1000, 1537}, {8, 777, 64}, {40, 3001, 128}, {17, 100, 1}, {5, 0, 32}};
  for (auto kd : dtypes)
    for (auto qd : dtypes)
      for (const auto& sh : shapes) {
        auto keys = unit_rows(sh.m, sh.d, kd);
        auto values = at::randn({sh.m, 5}).to(at::kHalf);
        auto queries = at::randn({sh.T, sh.d});
        // Some rows are (scaled, perturbed) copies of keys so that the gate opens.
        for (int64_t t = 0; t < sh.T && sh.m > 0; t += 2)
          queries[t] = keys[(t * 37) % sh.m].to(at::kFloat) * 3 + 0.05 * at::randn({sh.d});
        check(isa + " T" + std::to_string(sh.T) + " m" + std::to_string(sh.m) + " d" + std::to_string(sh.d) + " " +
                  c10::toString(kd) + "/" + c10::toString(qd),
              queries.to(qd), keys, values, 0.5);
      }

  // Exact ties: duplicate keys far apart; the lowest index must win even across threads and chunks.
  auto keys = unit_rows(5000, 96, at::kHalf);
  for (int64_t c : {4321, 2500, 64}) keys[c] = keys[4999];
  auto values = at::randn({5000, 4});
  auto queries = keys.index({at::indexing::Slice(4990, 5000)}).to(at::kFloat).clone();
  const char* name = "ties";
  for (int threaded = 0; threaded < 2; ++threaded) {
    if (threaded) {
      neuraldb::CpuOptions o = neuraldb::cpu_options();
      o.parallel_min_us = 0;
      o.chunk = 7;
      neuraldb::set_cpu_options(o);
      name = "ties threaded";
    }
    const auto [out, idx, score] = neuraldb::gated_retrieval_cpu(queries, keys, values, 0.0);
    EXPECT(idx[9].item<int64_t>() == 64, "%s %s: duplicate keys: idx %ld, expected 64", isa.c_str(), name,
           (long)idx[9].item<int64_t>());
    check(isa + " " + name, queries, keys, values, 0.0);
  }
  {
    neuraldb::CpuOptions o;
    o.isa = isa;
    neuraldb::set_cpu_options(o);
  }

  // A score exactly at gamma closes the gate: q = (1, 1, 1, 1) / 2, k = e0, score 0.5.
  auto q = at::ones({1, 4});
  auto k = at::zeros({3, 4}, at::kHalf);
  k[1][0] = 1;
  k[2][1] = -1;
  const auto [out, idx, score] = neuraldb::gated_retrieval_cpu(q, k, at::ones({3, 2}), 0.5);
  EXPECT(idx[0].item<int64_t>() == 1 && score[0].item<float>() == 0.5f && out.abs().max().item<float>() == 0.f,
         "%s: score at gamma: idx %ld score %f", isa.c_str(), (long)idx[0].item<int64_t>(), score[0].item<float>());
}

}  // namespace

// The query quantisers' rounding against std::nearbyint: a fine grid over the codes' range and past it, every tie
// (k + 1/2) with its neighbours, and NaN. Reports the first mismatch only.
void check_round_half_even() {
  std::vector<float> xs;
  for (int64_t k = -300 * 1024; k <= 300 * 1024; ++k) xs.push_back(static_cast<float>(k) / 1024.f);
  for (int k = -300; k <= 300; ++k) {
    const float tie = static_cast<float>(k) + 0.5f;
    xs.insert(xs.end(), {std::nextafter(tie, -1e9f), tie, std::nextafter(tie, 1e9f)});
  }
  for (const float x : xs)
    if (neuraldb::cpu::round_half_even(x) != std::nearbyint(x)) {
      EXPECT(false, "round_half_even(%a) = %a, nearbyint gives %a", x, neuraldb::cpu::round_half_even(x),
             std::nearbyint(x));
      break;
    }
  EXPECT(std::isnan(neuraldb::cpu::round_half_even(NAN)), "round_half_even(NaN) is not NaN");
}

int main() {
  at::manual_seed(0);
  check_round_half_even();
  const auto isas = neuraldb::cpu_isas();
  for (const auto& isa : isas) {
    std::printf("kernel %s\n", isa.c_str());
    neuraldb::CpuOptions o;
    o.isa = isa;
    neuraldb::set_cpu_options(o);
    run_all(isa);
  }
  neuraldb::set_cpu_options(neuraldb::CpuOptions{});
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all passed (%zu kernels)\n", isas.size());
  return 0;
}
