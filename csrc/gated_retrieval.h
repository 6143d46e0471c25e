// The kernels behind torch.ops.neuraldb.gated_retrieval. Contract: neuraldb_kernels/reference.py.
// Inputs are validated in Python; kernels only check what would make them read out of bounds.
#pragma once

#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace neuraldb {

// queries (T, d1) fp32/fp16/bf16, keys (m, d1) fp16/bf16/fp32 unit rows, values (m, d2); rows unit-stride.
// Returns out (T, d2) in the queries' dtype, idx (T,) int64, score (T,) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                                   const at::Tensor& values, double gamma);
// gated_retrieval_cpu with the exact int4 pre-filter (behind the exact 1-bit one when signs are given): sketch (m, sketch_row_bytes(d1)) uint8 is
// neuraldb_kernels.prefilter.build_sketch(keys). out is gated_retrieval_cpu's bitwise; idx/score are too where the
// gate opens, and -1 / -inf where it stays closed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_prefiltered_cpu(const at::Tensor& queries,
                                                                               const at::Tensor& keys,
                                                                               const at::Tensor& values, double gamma,
                                                                               const at::Tensor& sketch,
                                                                               const c10::optional<at::Tensor>& signs);
// What a patched eager forward adds, for queries (..., d1) of any leading shape: out (..., d2) of
// gated_retrieval_prefiltered_cpu (when a sketch is given and the queries have at most sketch_max_rows rows) or of
// gated_retrieval_cpu, or nullopt when no row's gate opens, so that the caller can skip adding zeros.
std::optional<at::Tensor> gated_residuals_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                              const at::Tensor& values, double gamma,
                                              const std::optional<at::Tensor>& sketch,
                                              const std::optional<at::Tensor>& signs, int64_t sketch_max_rows);
// Bytes per key of that sketch (as neuraldb_kernels.prefilter.sketch_row_bytes).
int64_t sketch_row_bytes(int64_t d1);
// Bytes per key of the optional 1-bit first stage, signs = neuraldb_kernels.prefilter.build_signs(keys)
// (as neuraldb_kernels.prefilter.sign_row_bytes).
int64_t sign_row_bytes(int64_t d1);
// Names of the CPU kernels this machine can run, best first (e.g. {"amx", "avx512", "avx2", "scalar"}); the
// option CpuOptions::isa picks one of them.
std::vector<std::string> cpu_isas();

// The CPU kernels' knobs. Python sets them from neuraldb_kernels.config (which reads the NEURALDB_CPU_* environment
// once); C++ users call set_cpu_options. The kernels read them on every call without touching the environment.
struct CpuOptions {
  // auto|scalar|avx2|avx512|amx: "amx" forces the bf16 pre-filter for any T; "avx512" leaves out VNNI, which "auto"
  // takes where the CPU has it. An unknown or unsupported name is reported by the next kernel call.
  std::string isa = "auto";
  int64_t chunk = 0;              // keys per work chunk (threads take chunks in turn); <= 0: sized from the rows
  double parallel_min_us = 300;   // estimated single-thread time below which no thread team starts (0: always)
  int64_t amx_min_t = 12;         // smallest T for which "auto" takes the AMX pre-filter
  int64_t amx_cap = 512;          // candidates per query and thread before that query's exact rescan
  int64_t amx_tight = -1;         // measure each key's bf16 rounding error: 1 yes, 0 no, -1 where d1 > 2048
  int64_t amx_blocks = 1;         // blocks of 32 keys sharing a segment of the packed queries (1..4)
  bool debug = false;             // print the pre-filters' statistics to stderr
};
// Replaces the options of every later call (calls already running keep the ones they started with).
void set_cpu_options(const CpuOptions& options);
CpuOptions cpu_options();

#ifdef NEURALDB_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieval_cuda(const at::Tensor& queries, const at::Tensor& keys,
                                                                    const at::Tensor& values, double gamma);
#endif

}  // namespace neuraldb
