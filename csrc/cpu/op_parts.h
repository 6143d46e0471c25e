// Internal interface between the files of the CPU op (the torch side; the per-ISA scans behind it are declared in
// cpu_kernels.h):
//   plan.cpp              which kernel a call runs: CPU features, the options, the per-ISA function pointers
//   exact_scan.cpp        the threaded exact fp32 scan and its reduction
//   amx_prefilter.cpp     the AMX bf16 pre-filter around cpu::amx_scan, and the exact rescoring of its candidates
//   query_quantisers.cpp  the queries as the int4 and 1-bit sketch stages read them, with the constants of their bounds
//   prepare_and_gate.cpp  checked inputs, normalised queries and the outputs; the gate that fills them
//   ops.cpp, op_prefiltered.cpp   the entry points of gated_retrieval.h
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/threads.h"
#include "gated_retrieval.h"

namespace neuraldb {
namespace cpu {

constexpr float kNormEps = 1e-12f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- plan.cpp ----
enum class Isa { kScalar, kAvx2, kAvx512, kAmx };
const char* isa_name(Isa i);

// The options with the isa name already parsed: set_cpu_options builds one, every call reads the latest.
struct Settings {
  CpuOptions options;
  bool isa_auto = true;
  Isa isa = Isa::kScalar;  // the forced kernel when !isa_auto
  std::string isa_error;   // why options.isa cannot run here (reported by plan)
};
const Settings& settings();  // one atomic load

struct Plan {
  Isa isa;         // exact scan kernel (never kAmx)
  bool prefilter;  // AMX bf16 pre-filter before the exact rescoring
  bool vnni;       // the AVX-512 sign scan's integer dots in AVX512-VNNI
  bool forced;     // the pre-filter was asked for by name (isa "amx"), so it runs whatever m
};
Plan plan(const Settings& s, int64_t T);  // TORCH_CHECK fails with s.isa_error
ScanFn scan_fn(Isa i);
DotFn dot_fn(Isa i);
SketchFn sketch_fn(Isa i, int64_t groups);
SignFn sign_fn(const Plan& pl);

// ---- exact_scan.cpp ----
// Exact fp32 scan of all keys: best[t], idx[t] with the lowest index among equal scores.
void exact_scan(const Problem& p, Isa isa, const CpuOptions& o, float* best, int64_t* idx);

// ---- amx_prefilter.cpp ----
// Runs the AMX pre-filter on queries of any count when it is compiled in (x86); returns false where it is not.
bool amx_prefiltered_scan(const Problem& p, const CpuOptions& o, const std::vector<uint8_t>& zero_row, float* best,
                          int64_t* idx);

// ---- prepare_and_gate.cpp ----
// What both CPU ops share: checked inputs, the outputs (zeros, idx -1, score -inf) and the normalised queries.
struct Prepared {
  at::Tensor out, idx, score;
  Problem p;
  std::vector<uint8_t> zero_row;
};
Prepared prepare(const char* op, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values);
// out[t] = values[idx[t]] where score[t] > gamma (the reference compares fp32 scores with gamma cast to fp32).
void gate(const at::Tensor& values, const int64_t* idx, const float* score, double gamma, int64_t T, at::Tensor& out);

// ---- query_quantisers.cpp ----
// n u / (1 - n u) with u = 2^-24: the relative error bound of an fp32 sum of n terms, in any order.
double gamma_n(int64_t n);

// The queries quantised for the int4 sketch scan, and per query the two factors of its bound.
struct SketchQueries {
  std::vector<int8_t> q8;
  std::vector<float> qscale;
  std::vector<int32_t> off;
  std::vector<double> a, b;
};
SketchQueries quantize_queries(const Problem& p, int64_t G);

// The queries quantised for the 1-bit sign scan, and per query the constants of its bound.
struct SignQueries {
  std::vector<uint8_t> qu;
  std::vector<int8_t> q8;
  std::vector<int32_t> qsum;
  std::vector<double> c, l1, a, b;
};
SignQueries quantize_sign_queries(const Problem& p, int64_t G);

}  // namespace cpu
}  // namespace neuraldb
