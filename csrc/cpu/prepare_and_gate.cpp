// Queries in, gated values out: the checks and the set-up both CPU ops share (outputs, normalised queries), and the
// gate that copies values[idx] where the score passes gamma.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/op_parts.h"

namespace neuraldb {
namespace cpu {
namespace {

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

}  // namespace cpu
}  // namespace neuraldb
