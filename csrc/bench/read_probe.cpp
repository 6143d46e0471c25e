// neuraldb_kernels._probe: the read-bandwidth probe of the op benchmarks, built beside the production extension
// neuraldb_kernels._C (never in it). It reads a tensor with the CPU kernels' own threading (cpu/threads.h) so that a
// kernel's time can be compared with the time of reading its keys once. Called through neuraldb_kernels.probe.
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "cpu/threads.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NEURALDB_PROBE_X86 1
#include <immintrin.h>
#define NDB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace {

#ifdef NEURALDB_PROBE_X86
// The read-bandwidth probe: XOR of every 64-byte line, 4 lines per iteration, prefetching ahead.
NDB_AVX512 uint64_t read_avx512_impl(const char* p, int64_t bytes, int64_t prefetch_bytes) {
  __m512i x0 = _mm512_setzero_si512(), x1 = x0, x2 = x0, x3 = x0;
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    if (prefetch_bytes > 0) {
      _mm_prefetch(p + i + prefetch_bytes, _MM_HINT_T0);
      _mm_prefetch(p + i + prefetch_bytes + 64, _MM_HINT_T0);
      _mm_prefetch(p + i + prefetch_bytes + 128, _MM_HINT_T0);
      _mm_prefetch(p + i + prefetch_bytes + 192, _MM_HINT_T0);
    }
    x0 = _mm512_xor_si512(x0, _mm512_loadu_si512(p + i));
    x1 = _mm512_xor_si512(x1, _mm512_loadu_si512(p + i + 64));
    x2 = _mm512_xor_si512(x2, _mm512_loadu_si512(p + i + 128));
    x3 = _mm512_xor_si512(x3, _mm512_loadu_si512(p + i + 192));
  }
  alignas(64) uint64_t w[8];
  _mm512_store_si512(w, _mm512_xor_si512(_mm512_xor_si512(x0, x1), _mm512_xor_si512(x2, x3)));
  uint64_t r = 0;
  for (uint64_t v : w) r ^= v;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    r ^= v;
  }
  for (; i < bytes; ++i) r ^= static_cast<unsigned char>(p[i]);
  return r;
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#endif

// The XOR of the tensor's 64-bit words, XOR its trailing (nbytes % 8) bytes, masked to 63 bits. wide: 512-bit loads
// and a software prefetch prefetch_bytes ahead (0: none) where the CPU has AVX-512; else a portable loop.
int64_t read_probe(const at::Tensor& t, bool wide, int64_t prefetch_bytes, double parallel_min_us, int64_t chunk) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "read_probe: expected a contiguous CPU tensor");
  const auto* p = static_cast<const char*>(t.data_ptr());
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  neuraldb::CpuOptions o;
  o.parallel_min_us = parallel_min_us;
  o.chunk = chunk;
  // Same threading as the kernels: 256 KB chunks of 64-byte lines taken in turn by the thread team.
  const int64_t lines = (bytes + 63) / 64;
  const neuraldb::cpu::Team team = neuraldb::cpu::team(lines, 64, static_cast<double>(bytes) / 1e4, 64, o);
#ifdef NEURALDB_PROBE_X86
  static const bool avx512 = has_avx512();
  wide = wide && avx512;
#else
  wide = false;
#endif
  std::vector<uint64_t> acc(static_cast<size_t>(team.threads), 0);
  neuraldb::cpu::run_chunks(team, lines, [&](int tid, int64_t a, int64_t b) {
    const char* s = p + a * 64;
    const int64_t n = std::min(bytes, b * 64) - a * 64;
#ifdef NEURALDB_PROBE_X86
    if (wide) {
      acc[tid] ^= read_avx512_impl(s, n, prefetch_bytes);
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
  });
  uint64_t r = 0;
  for (uint64_t v : acc) r ^= v;
  return static_cast<int64_t>(r & 0x7fffffffffffffffULL);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neuraldb benchmark probes (not used by the op)";
  m.def("read_probe", &read_probe, "Reads a CPU tensor once with the kernels' threading; returns a checksum",
        pybind11::arg("tensor"), pybind11::arg("wide") = true, pybind11::arg("prefetch_bytes") = 1024,
        pybind11::arg("parallel_min_us") = 300.0, pybind11::arg("chunk") = 0);
}
