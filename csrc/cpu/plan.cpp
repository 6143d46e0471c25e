// Which CPU kernel a call runs: the CPU's features (detected once), the options (set from Python's
// neuraldb_kernels.config, never read from the environment here), and the per-ISA functions of cpu_kernels.h.
#include <atomic>
#include <deque>
#include <mutex>

#include "cpu/op_parts.h"

namespace neuraldb {
namespace cpu {
namespace {

struct Support {
  bool avx2 = false, avx512 = false, vnni = false, amx = false;
};

const Support& support() {
  static const Support s = [] {
    Support r;
#ifdef NEURALDB_X86
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    r.avx512 = r.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    r.vnni = r.avx512 && __builtin_cpu_supports("avx512vnni");
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12) || (defined(__clang__) && __clang_major__ >= 16)
    r.amx = r.avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("amx-tile") &&
            __builtin_cpu_supports("amx-bf16") && cpu::amx_enable();
#endif
#endif
    return r;
  }();
  return s;
}

bool supported(Isa i) {
  switch (i) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return support().avx2;
    case Isa::kAvx512: return support().avx512;
    case Isa::kAmx: return support().amx;
  }
  return false;
}

constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAmx};

Settings parse(const CpuOptions& o) {
  Settings s;
  s.options = o;
  s.isa_auto = o.isa.empty() || o.isa == "auto";
  if (s.isa_auto) return s;
  for (Isa i : kAllIsas) {
    if (o.isa != isa_name(i)) continue;
    s.isa = i;
    if (!supported(i)) s.isa_error = "NEURALDB_CPU_ISA=" + o.isa + " is not supported by this CPU (or OS)";
    return s;
  }
  s.isa_error = "NEURALDB_CPU_ISA must be auto, scalar, avx2, avx512 or amx; got '" + o.isa + "'";
  return s;
}

// Published settings are never freed: a call may still read the ones it loaded, and they change only when a test
// or a benchmark sets new options.
std::mutex g_settings_mutex;
std::deque<Settings> g_settings_store{Settings{}};
std::atomic<const Settings*> g_settings{&g_settings_store.front()};

}  // namespace

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAmx: return "amx";
  }
  return "?";
}

const Settings& settings() { return *g_settings.load(std::memory_order_acquire); }

Plan plan(const Settings& s, int64_t T) {
  TORCH_CHECK(s.isa_error.empty(), s.isa_error);
  if (s.isa_auto) {
    // The exact fp32 scan costs T multiply-adds per 16 key elements; the pre-filter a fixed conversion of every
    // key to bf16 plus cheap tile products. They cross near T = 10..12 on the development machine (2 threads).
    const Isa exact = support().avx512 ? Isa::kAvx512 : support().avx2 ? Isa::kAvx2 : Isa::kScalar;
    return {exact, support().amx && T >= s.options.amx_min_t, support().vnni, false};
  }
  // Forcing avx512 keeps to its baseline (F, BW, VL, DQ); amx takes every extension this CPU has.
  return s.isa == Isa::kAmx ? Plan{Isa::kAvx512, true, support().vnni, true} : Plan{s.isa, false, false, false};
}

ScanFn scan_fn(Isa i) {
#ifdef NEURALDB_X86
  if (i == Isa::kAvx512 || i == Isa::kAmx) return scan_avx512;
  if (i == Isa::kAvx2) return scan_avx2;
#endif
  return scan_scalar;
}

DotFn dot_fn(Isa i) {
#ifdef NEURALDB_X86
  if (i == Isa::kAvx512 || i == Isa::kAmx) return dot_avx512;
  if (i == Isa::kAvx2) return dot_avx2;
#endif
  return dot_scalar;
}

SketchFn sketch_fn(Isa i, int64_t groups) {
#ifdef NEURALDB_X86
  if ((i == Isa::kAvx512 || i == Isa::kAmx) && groups <= kSketchMaxSimdGroups) return sketch_scores_avx512;
  if (i == Isa::kAvx2) return sketch_scores_avx2;
#endif
  return sketch_scores_scalar;
}

SignFn sign_fn(const Plan& pl) {
#ifdef NEURALDB_X86
  if (pl.isa == Isa::kAvx512) return pl.vnni ? sign_pass_avx512_vnni : sign_pass_avx512;
  if (pl.isa == Isa::kAvx2) return sign_pass_avx2;
#endif
  return sign_pass_scalar;
}

}  // namespace cpu

std::vector<std::string> cpu_isas() {
  std::vector<std::string> r;
  for (cpu::Isa i : {cpu::Isa::kAmx, cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kScalar})
    if (cpu::supported(i)) r.emplace_back(cpu::isa_name(i));
  return r;
}

void set_cpu_options(const CpuOptions& options) {
  std::lock_guard<std::mutex> lock(cpu::g_settings_mutex);
  cpu::g_settings_store.push_back(cpu::parse(options));
  cpu::g_settings.store(&cpu::g_settings_store.back(), std::memory_order_release);
}

CpuOptions cpu_options() { return cpu::settings().options; }

}  // namespace neuraldb
