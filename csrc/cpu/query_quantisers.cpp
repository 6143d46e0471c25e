// The queries as the sketch stages read them: int8 codes per group of 64 for the int4 sketch scan, one scale per row
// for the 1-bit sign scan, and per query the constants of each stage's upper bound on the exact fp32 score (derived
// below; the scans compare them with gamma, so a key they drop can never pass the gate).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/op_parts.h"

namespace neuraldb {
namespace cpu {

double gamma_n(int64_t n) {
  const double nu = static_cast<double>(n) * std::ldexp(1.0, -24);
  return nu / (1.0 - nu);
}

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


}  // namespace cpu
}  // namespace neuraldb
