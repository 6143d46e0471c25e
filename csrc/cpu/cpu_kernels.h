// Internal interface between the CPU op (op_parts.h lists its files: validation, plan, threading, gating) and the
// per-ISA key scans (scan_scalar.cpp, scan_avx2.cpp, scan_avx512.cpp, scan_amx.cpp).
// Plain C++ only: the ISA files are compiled with __attribute__((target(...))) on their own functions, and must
// not pull in torch headers.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace neuraldb {
namespace cpu {

// Whether score s takes the running best: strictly greater (the lowest index keeps a tie) and below +inf. NaN fails
// every comparison; +-inf and NaN scores come only from non-finite keys or queries, which the op's contract says
// are never retrieved, whatever the order in which a backend happens to sum them.
inline bool beats(float s, float best) { return s > best && s < HUGE_VALF; }

enum class KeyType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// f(F16{}), f(BF16{}) or f(F32{}) as key_type says: the one switch behind every ISA's entry points, each ISA with its
// own key loader types.
template <class F16, class BF16, class F32, class Fn>
inline auto with_key_loader(KeyType key_type, Fn&& f) -> decltype(f(F32{})) {
  switch (key_type) {
    case KeyType::kF16: return f(F16{});
    case KeyType::kBF16: return f(BF16{});
    case KeyType::kF32: break;
  }
  return f(F32{});
}

// x rounded to the nearest integer, ties to even, as std::nearbyint in the default rounding mode, for |x| < 2^22
// (NaN stays NaN): adding 1.5 * 2^23 leaves no fraction bits. Inline, where nearbyint is a libm call per element on
// baseline x86-64; the query quantisers call it for every element of every query.
static_assert(FLT_EVAL_METHOD == 0, "round_half_even needs fp32 arithmetic in fp32");
inline float round_half_even(float x) {
  constexpr float kShift = 12582912.f;  // 1.5 * 2^23
  return (x + kShift) - kShift;
}

// One scan problem: T normalised fp32 query rows against m key rows.
struct Problem {
  const float* q;     // (T, qs) fp32, rows normalised, zero padded from d1 to qs (qs is a multiple of 64)
  int64_t T = 0;
  int64_t qs = 0;
  const void* keys;   // (m, ks) in key_type, unit-stride rows
  int64_t m = 0;
  int64_t ks = 0;     // row stride of keys, in elements
  int64_t d1 = 0;
  KeyType key_type = KeyType::kF16;
};

// Exact fp32 scan of keys [k0, k1) for all T queries. best/best_idx hold the running best per query and are
// updated with a strict '>' while keys are visited in increasing order, so callers that hand a thread its
// chunks in increasing order keep the lowest index among ties.
using ScanFn = void (*)(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx);
// fp32 dot of query row t with key row i, rounded exactly as that ISA's ScanFn rounds it.
using DotFn = float (*)(const Problem& p, int64_t t, int64_t i);

void scan_scalar(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx);
float dot_scalar(const Problem& p, int64_t t, int64_t i);

// ---- int4 sketch pre-filter (sketch layout: neuraldb_kernels/prefilter.py; bound: query_quantisers.cpp) ----
constexpr int kSketchGroup = 64;  // key elements per 4-bit group (one fp16 scale each)
constexpr int kSketchHeader = 8;  // e and n (fp32) at the start of every sketch row
constexpr int64_t kSketchMaxSimdGroups = 1024;  // longer keys (d1 > 65536) take the portable sketch scan

struct SketchProblem {
  const uint8_t* sketch;  // (m, ss) bytes: e, n, G fp16 scales, 32 G bytes of codes (nibble + 8)
  int64_t ss = 0;         // row stride, bytes
  int64_t G = 0;          // groups per key
  int64_t T = 0;
  const int8_t* q8;       // (T, 64 G) query codes in [-127, 127], zero padded
  const float* qscale;    // (T, G) scale of each query group (the query is qscale * q8)
  // (T, G, 16): 8 x the sum of the 4 query codes under each 32-bit lane of a 64-byte group, i.e. what the +8 of
  // the key nibbles adds to that lane's integer dot
  const int32_t* off;
};
// s[(i - k0) * T + t] = sum_g fp16scale_g(key i) qscale_g(t) (integer dot of group g), for keys [k0, k1). The integer
// dots are exact; the fp32 sum over groups and lanes is within g(G + 8) of sum_j |qhat_j dq_j| of the real value.
using SketchFn = void (*)(const SketchProblem& p, int64_t k0, int64_t k1, float* s);
void sketch_scores_scalar(const SketchProblem& p, int64_t k0, int64_t k1, float* s);

// ---- 1-bit sign sketch, the first stage in front of the int4 one (layout: neuraldb_kernels/prefilter.py) ----
constexpr int kSignOutliers = 24;  // largest |k_j| per key, stored apart as (uint16 index, fp16 k_j - a s_j)
constexpr int kSignHeader = 12;    // a, r, n (fp32)
constexpr int64_t kMaxSignD1 = 65535;  // widest key with signs, as _MAX_SIGN_D1 in neuraldb_kernels/prefilter.py

struct SignProblem {
  const uint8_t* signs;  // (m, ss) bytes: a, r, n, kSignOutliers indices, kSignOutliers fp16 values, 8 G sign bytes
  int64_t ss = 0;        // row stride, bytes
  int64_t G = 0;         // groups of 64 sign bits per key
  int64_t T = 0;
  const uint8_t* qu;     // (T, 64 G) query codes q8 + 128 (q8 in [-127, 127]; padding 128, i.e. q8 = 0)
  const int8_t* q8;      // (T, 64 G) the same codes, signed (padding 0)
  const int32_t* qsum;   // (T,) sum of q8 over the row
  const float* q;        // (T, qs) the normalised fp32 queries (the outliers' query values are gathered from them)
  int64_t qs = 0;
  // (T,) each: the constants of query t's bound (see sign_bound_passes) and the gate's threshold.
  const double* c = nullptr;
  const double* l1 = nullptr;
  const double* a = nullptr;
  const double* b = nullptr;
  float gamma = 0.f;
};

// Whether key `row` can score above gamma for query t, from dot = sum_j q8_j s_j (s_j = +1 for a set bit, -1
// otherwise; exact) and s1 = the fp32 sum of q_j v_j over the key's outliers (any order: within
// g(kSignOutliers) sum |q_j v_j| of the real value). The bound is derived in query_quantisers.cpp; it lives here
// so that each ISA's scan applies it to the key it has just read, instead of a second pass over stored scores (the
// AVX-512 scan evaluates the same float64 expression for 8 keys at once).
inline bool sign_bound_passes(const SignProblem& p, const uint8_t* row, int64_t t, int32_t dot, float s1) {
  float arn[3];
  std::memcpy(arn, row, sizeof arn);
  const double s = s1, cd = p.c[t] * dot;
  const double rest = p.a[t] * arn[1] + p.b[t] * arn[2];
  const double terms = arn[0] * (std::fabs(cd) + p.l1[t]) + rest;
  const double ub = s + arn[0] * (cd + p.l1[t]) + rest;
  // The float64 sums may round down by a few 2^-53 of their terms; 1e-9 of them covers it. NaN keeps the key.
  return !(ub + 1e-9 * (std::fabs(s) + terms) < p.gamma);
}

// For keys [k0, k1) and every query t: appends each (key i, query t) that passes sign_bound_passes to pass, as i then
// t, in increasing i. Appended rather than written to a (k1 - k0) T buffer: few pairs pass, and T may be large.
using SignFn = void (*)(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass);
void sign_pass_scalar(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(NEURALDB_PORTABLE_ONLY)
#define NEURALDB_X86 1
void sketch_scores_avx2(const SketchProblem& p, int64_t k0, int64_t k1, float* s);
void sign_pass_avx2(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass);
void sketch_scores_avx512(const SketchProblem& p, int64_t k0, int64_t k1, float* s);
void sign_pass_avx512(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass);
// The same with the integer dots in AVX512-VNNI (vpdpbusd); only for CPUs that have it.
void sign_pass_avx512_vnni(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass);
void scan_avx2(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx);
float dot_avx2(const Problem& p, int64_t t, int64_t i);
void scan_avx512(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx);
float dot_avx512(const Problem& p, int64_t t, int64_t i);

// ---- AMX bf16 pre-filter (exactness restored by fp32 rescoring of the candidates, see scan_avx512.cpp) ----
constexpr int kAmxKeyBlock = 32;    // keys per AMX step (two 16-row A tiles)
constexpr int kAmxQueryBlock = 16;  // queries per B tile
constexpr int kMaxSuperBlocks = 4;  // key blocks that share one segment of the packed queries

struct AmxProblem {
  const Problem* p;
  const uint16_t* qpack;  // queries as bf16 B tiles (VNNI layout), see amx_pack_queries
  int64_t tp = 0;         // T rounded up to a multiple of 16 (or 32 when T > 16)
  int64_t d1p = 0;        // d1 rounded up to a multiple of 32
  int64_t seg = 0;        // d1 is processed in segments of this many elements (a multiple of 32)
  int64_t nb = 1;         // key blocks (of 32) per super-block, at most kMaxSuperBlocks
  // |bf16 score - fp32 score| of query q and key k <= qn ||bf16(k) - k|| + kfac ||k|| (amx_prefilter.cpp)
  float qn = 0.f;
  float kfac = 0.f;
  bool tight = true;      // measure ||bf16(k) - k|| per key (else bound it by 2^-8 ||k||, a cheaper conversion)
  const uint16_t* live;   // (tp / 16,) bit n of word g: query 16 g + n exists and is not all zeros
};

// Per-thread state of the pre-filter: a running lower bound of the best fp32 score per query, and the keys
// whose upper bound reaches it (the only keys that can be the fp32 argmax).
struct AmxThread {
  uint16_t* kbuf;     // (2, 32 nb, seg + 32) bf16 keys of the current and the next (super-block, segment)
  float* scores;      // (32 nb, tp + 16) bf16 scores of the current super-block
  float* thr;         // (tp,) max over seen keys of (score - bound)
  int64_t* cand_idx;  // (tp, cap)
  float* cand_up;     // (tp, cap) score + bound of each candidate
  int32_t* cand_n;    // (tp,)
  uint8_t* overflow;  // (tp,) 1 when more than cap keys were within the margin: rescan that query exactly
  int32_t cap;
};

bool amx_enable();  // asks the OS for the AMX tile state once per process; false when unavailable
// Packs the queries as bf16 B tiles; *qn and *dq receive max ||q|| and max ||bf16(q) - q|| over the queries.
void amx_pack_queries(const AmxProblem& a, uint16_t* qpack, float* qn, float* dq);
void amx_thread_begin(const AmxProblem& a);  // loads the tile configuration of the calling thread
void amx_thread_end();
void amx_scan(const AmxProblem& a, AmxThread& w, int64_t k0, int64_t k1);
#endif

}  // namespace cpu
}  // namespace neuraldb
