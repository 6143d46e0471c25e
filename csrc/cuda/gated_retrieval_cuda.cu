// The CUDA fallback of gated_retrieval (used when Triton is missing, or with NEURALDB_BACKEND=cuda): host side.
// Contract: neuraldb_kernels/reference.py; the kernels and their launch sequence: gated_retrieval_kernels.cuh.
// Three launches on the current stream, no host synchronisation, the workspace from the torch caching allocator,
// so the op can be captured in a CUDA graph.
//
// Tuned for decode (T <= 16): every block of up to 16 query rows re-reads its key range, so prefill-sized T costs
// about T / 16 passes over the keys; the Triton backend, with tensor cores, is the one for large T.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "gated_retrieval.h"
#include "gated_retrieval_kernels.cuh"

namespace neuraldb {
namespace {

template <typename F>
void dispatch_float(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kHalf:
      f(at::Half{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    case at::kFloat:
      f(float{});
      break;
    default:
      TORCH_CHECK(false, what, " must have dtype float16/bfloat16/float32, got ", st);
  }
}

void check_matrix(const at::Tensor& x, const char* name, const at::Tensor& queries) {
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_cuda() && x.device() == queries.device(), name, " must be on ", queries.device(), ", got ",
              x.device());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, " must have unit-stride rows");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_cuda(const at::Tensor& queries, const at::Tensor& keys,
                                                                    const at::Tensor& values, double gamma) {
  using namespace cuda_detail;
  TORCH_CHECK(queries.is_cuda(), "queries must be a CUDA tensor, got one on ", queries.device());
  check_matrix(queries, "queries", queries);
  check_matrix(keys, "keys", queries);
  check_matrix(values, "values", queries);
  TORCH_CHECK(keys.size(1) == queries.size(1), "keys must have shape (m, ", queries.size(1), "), got ", keys.sizes());
  TORCH_CHECK(values.size(0) == keys.size(0), "values must have ", keys.size(0), " rows, got ", values.size(0));

  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t t_rows = queries.size(0);
  const int64_t d1 = queries.size(1);
  const int64_t m = keys.size(0);
  const int64_t d2 = values.size(1);
  at::Tensor out = at::empty({t_rows, d2}, queries.options());
  at::Tensor idx = at::empty({t_rows}, queries.options().dtype(at::kLong));
  at::Tensor score = at::empty({t_rows}, queries.options().dtype(at::kFloat));
  if (t_rows == 0) return {out, idx, score};
  if (m == 0) {
    out.zero_();
    idx.fill_(-1);
    score.fill_(-std::numeric_limits<float>::infinity());
    return {out, idx, score};
  }
  TORCH_CHECK(m < kNoIndex, "keys must have fewer than 2**31 - 1 rows, got ", m);
  TORCH_CHECK(t_rows <= std::numeric_limits<int32_t>::max(), "queries must have fewer than 2**31 rows, got ", t_rows);

  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const Plan plan = make_plan(t_rows, m, d1, d1 * static_cast<int64_t>(keys.element_size()), sms);
  const auto f32 = queries.options().dtype(at::kFloat);
  at::Tensor qn = at::empty({plan.row_blocks * plan.tq, plan.ldq}, f32);
  at::Tensor ps = at::empty({plan.splits, t_rows}, f32);
  at::Tensor pi = at::empty({plan.splits, t_rows}, queries.options().dtype(at::kInt));

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [stream](auto kernel, dim3 grid, dim3 block, auto... args) {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const float g = static_cast<float>(gamma);
  dispatch_float(queries.scalar_type(), "queries", [&](auto qtag) {
    using QT = decltype(qtag);
    dispatch_float(keys.scalar_type(), "keys", [&](auto ktag) {
      using KT = decltype(ktag);
      dispatch_float(values.scalar_type(), "values", [&](auto vtag) {
        using VT = decltype(vtag);
        run_gated_retrieval<QT, KT, VT>(launch, plan, queries.data_ptr<QT>(), queries.stride(0), t_rows, d1,
                                        keys.data_ptr<KT>(), keys.stride(0), m, values.data_ptr<VT>(),
                                        values.stride(0), d2, g, qn.data_ptr<float>(), ps.data_ptr<float>(),
                                        pi.data_ptr<int32_t>(), out.data_ptr<QT>(), out.stride(0),
                                        idx.data_ptr<int64_t>(), score.data_ptr<float>());
      });
    });
  });
  return {out, idx, score};
}

}  // namespace neuraldb
