// Runs the CUDA gated_retrieval kernels (gated_retrieval_kernels.cuh) on a CPU through fake_cuda.h.
//   run_kernels IN OUT
// IN:  int64 qdt kdt vdt (0 fp16, 1 bf16, 2 fp32), T, m, d1, d2, ldq, ldk, ldv, sms; float64 gamma;
//      then queries (T * ldq elements), keys (m * ldk), values (m * ldv), each in its dtype.
// OUT: out (T * d2, queries' dtype), idx (T int64), score (T float32). Expects T > 0 and m > 0.
#include "fake_cuda.h"
// clang-format off
#include "../gated_retrieval_kernels.cuh"
// clang-format on

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

using namespace neuraldb::cuda_detail;

namespace {

template <typename T>
T* alloc(int64_t n) {  // 64-byte aligned, like the CUDA caching allocator's blocks
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
  return static_cast<T*>(std::aligned_alloc(64, bytes));
}

template <typename F>
void dispatch(int64_t code, F&& f) {
  if (code == 0) {
    f(c10::Half{});
  } else if (code == 1) {
    f(c10::BFloat16{});
  } else if (code == 2) {
    f(float{});
  } else {
    throw std::runtime_error("bad dtype code");
  }
}

size_t dsize(int64_t code) { return code == 2 ? 4 : 2; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t h[12];
  double gamma;
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  in.read(reinterpret_cast<char*>(&gamma), sizeof(gamma));
  const int64_t qdt = h[0], kdt = h[1], vdt = h[2], t_rows = h[3], m = h[4], d1 = h[5], d2 = h[6];
  const int64_t ldq_in = h[7], ldk = h[8], ldv = h[9], sms = h[10];
  const int64_t key_offset = h[11];  // elements to shift the keys by, to test unaligned rows
  char* q = alloc<char>(t_rows * ldq_in * dsize(qdt));
  char* k_base = alloc<char>((m * ldk + key_offset) * dsize(kdt));
  char* k = k_base + key_offset * dsize(kdt);
  char* v = alloc<char>(m * ldv * dsize(vdt));
  in.read(q, t_rows * ldq_in * dsize(qdt));
  in.read(k, m * ldk * dsize(kdt));
  in.read(v, m * ldv * dsize(vdt));
  if (!in) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }

  const Plan p = make_plan(t_rows, m, d1, d1 * dsize(kdt), sms);
  float* qn = alloc<float>(p.row_blocks * p.tq * p.ldq);
  float* ps = alloc<float>(p.splits * t_rows);
  int32_t* pi = alloc<int32_t>(p.splits * t_rows);
  char* out = alloc<char>(t_rows * d2 * dsize(qdt));
  int64_t* idx = alloc<int64_t>(t_rows);
  float* score = alloc<float>(t_rows);
  auto launch = [](auto kernel, dim3 grid, dim3 block, auto... args) { emu::launch(kernel, grid, block, args...); };
  dispatch(qdt, [&](auto qtag) {
    using QT = decltype(qtag);
    dispatch(kdt, [&](auto ktag) {
      using KT = decltype(ktag);
      dispatch(vdt, [&](auto vtag) {
        using VT = decltype(vtag);
        run_gated_retrieval<QT, KT, VT>(launch, p, reinterpret_cast<const QT*>(q), ldq_in, t_rows, d1,
                                        reinterpret_cast<const KT*>(k), ldk, m, reinterpret_cast<const VT*>(v), ldv,
                                        d2, static_cast<float>(gamma), qn, ps, pi, reinterpret_cast<QT*>(out), d2, idx,
                                        score);
      });
    });
  });
  std::ofstream o(argv[2], std::ios::binary);
  o.write(out, t_rows * d2 * dsize(qdt));
  o.write(reinterpret_cast<const char*>(idx), t_rows * sizeof(int64_t));
  o.write(reinterpret_cast<const char*>(score), t_rows * sizeof(float));
  // One line for the test's log: the geometry that ran.
  std::printf("tq=%d row_blocks=%lld splits=%lld per=%lld vec=%d\n", p.tq, static_cast<long long>(p.row_blocks),
              static_cast<long long>(p.splits), static_cast<long long>(p.per), can_vectorize(k, ldk, d1) ? 1 : 0);
  return 0;
}
