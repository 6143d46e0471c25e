// Portable key scan: the fallback on CPUs without AVX2+F16C+FMA and on non-x86 machines.
#include <cstring>

#include "cpu_kernels.h"

namespace neuraldb {
namespace cpu {
namespace {

inline float f32_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float load_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return f32_from_bits(sign);
  // Subnormal half: mant * 2^-24, exact in fp32.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

struct F16 {
  using T = uint16_t;
  static float load(const T* p, int64_t j) { return load_f16(p[j]); }
};
struct BF16 {
  using T = uint16_t;
  static float load(const T* p, int64_t j) { return f32_from_bits(static_cast<uint32_t>(p[j]) << 16); }
};
struct F32 {
  using T = float;
  static float load(const T* p, int64_t j) { return p[j]; }
};

constexpr int kKB = 4;  // keys per tile
constexpr int kQB = 4;  // queries per tile

template <class K, int KB, int QB>
void tile(const typename K::T* k, int64_t ks, const float* q, int64_t qs, int64_t d1, float* out) {
  float acc[KB][QB] = {};
  for (int64_t j = 0; j < d1; ++j) {
    float kv[KB];
    for (int i = 0; i < KB; ++i) kv[i] = K::load(k + i * ks, j);
    for (int b = 0; b < QB; ++b) {
      const float qv = q[b * qs + j];
      for (int i = 0; i < KB; ++i) acc[i][b] += kv[i] * qv;
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int b = 0; b < QB; ++b) out[i * QB + b] = acc[i][b];
}

template <class K, int KB>
void tile_kb(int qb, const typename K::T* k, int64_t ks, const float* q, int64_t qs, int64_t d1, float* out) {
  switch (qb) {
    case 1: return tile<K, KB, 1>(k, ks, q, qs, d1, out);
    case 2: return tile<K, KB, 2>(k, ks, q, qs, d1, out);
    case 3: return tile<K, KB, 3>(k, ks, q, qs, d1, out);
    default: return tile<K, KB, 4>(k, ks, q, qs, d1, out);
  }
}

template <class K>
void scan(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx) {
  const auto* keys = static_cast<const typename K::T*>(p.keys);
  float sc[kKB * kQB];
  for (int64_t t0 = 0; t0 < p.T; t0 += kQB) {
    const int qb = static_cast<int>(p.T - t0 < kQB ? p.T - t0 : kQB);
    const float* q = p.q + t0 * p.qs;
    for (int64_t i0 = k0; i0 < k1; i0 += kKB) {
      const int kb = static_cast<int>(k1 - i0 < kKB ? k1 - i0 : kKB);
      if (kb == kKB)
        tile_kb<K, kKB>(qb, keys + i0 * p.ks, p.ks, q, p.qs, p.d1, sc);
      else
        for (int i = 0; i < kb; ++i) tile_kb<K, 1>(qb, keys + (i0 + i) * p.ks, p.ks, q, p.qs, p.d1, sc + i * qb);
      for (int b = 0; b < qb; ++b)
        for (int i = 0; i < kb; ++i) {
          const float s = sc[i * qb + b];
          if (beats(s, best[t0 + b])) {
            best[t0 + b] = s;
            best_idx[t0 + b] = i0 + i;
          }
        }
    }
  }
}

template <class K>
float dot(const Problem& p, int64_t t, int64_t i) {
  float s;
  tile<K, 1, 1>(static_cast<const typename K::T*>(p.keys) + i * p.ks, p.ks, p.q + t * p.qs, p.qs, p.d1, &s);
  return s;
}

}  // namespace

void sketch_scores_scalar(const SketchProblem& p, int64_t k0, int64_t k1, float* s) {
  for (int64_t i = k0; i < k1; ++i) {
    const uint8_t* row = p.sketch + i * p.ss;
    const uint8_t* codes = row + kSketchHeader + 2 * p.G;
    for (int64_t t = 0; t < p.T; ++t) {
      const int8_t* q = p.q8 + t * p.G * kSketchGroup;
      float acc = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        uint16_t h;
        std::memcpy(&h, row + kSketchHeader + 2 * g, sizeof h);
        const uint8_t* c = codes + g * (kSketchGroup / 2);
        const int8_t* qg = q + g * kSketchGroup;
        int32_t dot = 0;
        for (int b = 0; b < kSketchGroup / 2; ++b)
          dot += (static_cast<int32_t>(c[b] & 15) - 8) * qg[b] + (static_cast<int32_t>(c[b] >> 4) - 8) * qg[32 + b];
        acc += load_f16(h) * p.qscale[t * p.G + g] * static_cast<float>(dot);
      }
      s[(i - k0) * p.T + t] = acc;
    }
  }
}

void sign_pass_scalar(const SignProblem& p, int64_t k0, int64_t k1, std::vector<int64_t>& pass) {
  // Per query, the sum of its codes under each 4-bit pattern of each nibble of sign bits (16 entries per 4
  // elements, |sum| <= 508): one table lookup per 4 bits instead of a test per bit.
  const int64_t nibbles = 16 * p.G;
  std::vector<int16_t> lut(static_cast<size_t>(p.T * nibbles * 16));
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t n = 0; n < nibbles; ++n) {
      int16_t* e = lut.data() + (t * nibbles + n) * 16;
      const uint8_t* qu = p.qu + t * p.G * 64 + 4 * n;
      // Pattern v adds the code of its lowest set bit to the pattern without it.
      constexpr int kLowest[16] = {0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0};
      e[0] = 0;
      for (int v = 1; v < 16; ++v) e[v] = static_cast<int16_t>(e[v & (v - 1)] + qu[kLowest[v]] - 128);
    }
  for (int64_t i = k0; i < k1; ++i) {
    const uint8_t* row = p.signs + i * p.ss;
    const uint8_t* bits = row + kSignHeader + 4 * kSignOutliers;
    for (int64_t t = 0; t < p.T; ++t) {
      // q8 . s = 2 (sum of q8 over the set bits) - sum of q8. Bit j of byte b is element 8 b + j: the low nibble of
      // byte b is nibble 2 b, the high one 2 b + 1.
      const int16_t* e = lut.data() + t * nibbles * 16;
      int64_t pos = 0;
      for (int64_t b = 0; b < 8 * p.G; ++b) pos += e[(2 * b) * 16 + (bits[b] & 15)] + e[(2 * b + 1) * 16 + (bits[b] >> 4)];
      const float* q = p.q + t * p.qs;
      float acc = 0.f;
      for (int o = 0; o < kSignOutliers; ++o) {
        uint16_t j, h;
        std::memcpy(&j, row + kSignHeader + 2 * o, sizeof j);
        std::memcpy(&h, row + kSignHeader + 2 * (kSignOutliers + o), sizeof h);
        // Clamped so a malformed row cannot read outside the query row.
        acc += q[j < p.qs ? j : p.qs - 1] * load_f16(h);
      }
      if (sign_bound_passes(p, row, t, static_cast<int32_t>(2 * pos - p.qsum[t]), acc)) {
        pass.push_back(i);
        pass.push_back(t);
      }
    }
  }
}

void scan_scalar(const Problem& p, int64_t k0, int64_t k1, float* best, int64_t* best_idx) {
  with_key_loader<F16, BF16, F32>(p.key_type, [&](auto k) { scan<decltype(k)>(p, k0, k1, best, best_idx); });
}

float dot_scalar(const Problem& p, int64_t t, int64_t i) {
  return with_key_loader<F16, BF16, F32>(p.key_type, [&](auto k) { return dot<decltype(k)>(p, t, i); });
}

}  // namespace cpu
}  // namespace neuraldb
