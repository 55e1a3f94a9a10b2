// Float32 Box-Muller written with +, -, *, / and sqrt only (all correctly rounded
// under IEEE-754) plus our own polynomials, so the bits are the same on x86-64,
// aarch64 and in the numpy reference (edgefed/rng.py). Build with
// -ffp-contract=off and without -ffast-math: a fused multiply-add would change bits.
// The same lines run on CUDA (hd.hpp; NVRTC with --fmad=false, see edgefed/cuda_kernels.py).
#pragma once
#include "hd.hpp"

namespace edgefed {

constexpr float kLn2 = 0x1.62e430p-1f;
constexpr float kInv3 = 0x1.555556p-2f, kInv5 = 0x1.99999ap-3f, kInv7 = 0x1.24924ap-3f,
                kInv9 = 0x1.c71c72p-4f;
constexpr float kHalfPi = 0x1.921fb6p+0f;
constexpr float kS3 = -0x1.555556p-3f, kS5 = 0x1.111112p-7f, kS7 = -0x1.a01a02p-13f,
                kS9 = 0x1.71de3ap-19f;
constexpr float kC2 = -0.5f, kC4 = 0x1.555556p-5f, kC6 = -0x1.6c16c2p-10f,
                kC8 = 0x1.a01a02p-16f, kC10 = -0x1.27e4fcp-22f;
constexpr float kTwoM24 = 0x1p-24f, kTwoM22 = 0x1p-22f;
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;

// ln(u) for u in [2^-24, 1]: u = m * 2^e with m in (sqrt(1/2), sqrt(2)],
// ln m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172, series to s^9.
EDGEFED_HD float log_f32(float u) {
  const uint32_t bits = float_to_bits(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  const uint32_t mbits = (bits & 0x7FFFFFu) | 0x3F800000u;
  // Branch-free (AVX2 and NEON if-convert only simple selects): m * 0.5 when m > sqrt 2.
  const uint32_t big = mbits > kSqrt2Bits ? 1u : 0u;
  const float m = bits_to_float(mbits) * bits_to_float(0x3F800000u - (big << 23));
  e += static_cast<int32_t>(big);
  const float f = m - 1.0f;
  const float s = f / (m + 1.0f);
  const float s2 = s * s;
  float p = kInv9 * s2;
  p = p + kInv7;
  p = p * s2;
  p = p + kInv5;
  p = p * s2;
  p = p + kInv3;
  p = p * s2;
  const float t = s + s;
  float lm = t * p;
  lm = t + lm;
  const float el = static_cast<float>(e) * kLn2;
  return el + lm;
}

// One word pair -> two standard normals (cos branch, sin branch).
EDGEFED_HD void box_muller(uint32_t wa, uint32_t wb, float& zc, float& zs) {
  // Via int32 (exact: < 2^25) so AVX2 and NEON have a vector conversion for it.
  const float u = static_cast<float>(static_cast<int32_t>((wa >> 8) + 1u)) * kTwoM24;
  const float r = sqrt_rn(log_f32(u) * -2.0f);
  const uint32_t q = wb >> 30;
  const float x = static_cast<float>(static_cast<int32_t>((wb >> 8) & 0x3FFFFFu)) * kTwoM22;
  const float phi = (x - 0.5f) * kHalfPi;
  const float p2 = phi * phi;
  float a = kS9 * p2;
  a = a + kS7;
  a = a * p2;
  a = a + kS5;
  a = a * p2;
  a = a + kS3;
  a = a * p2;
  a = a * phi;
  const float sn = phi + a;
  float b = kC10 * p2;
  b = b + kC8;
  b = b * p2;
  b = b + kC6;
  b = b * p2;
  b = b + kC4;
  b = b * p2;
  b = b + kC2;
  b = b * p2;
  const float cs = 1.0f + b;
  // theta = q*pi/2 + phi: odd quadrants swap sin and cos; the signs follow the
  // quadrant. Done on the bits so it vectorises without branches (negation is exact).
  const uint32_t swap = 0u - (q & 1u);
  const uint32_t cb = float_to_bits(cs), sb = float_to_bits(sn);
  const uint32_t ctb = ((sb & swap) | (cb & ~swap)) ^ (((q ^ (q >> 1)) & 1u) << 31);
  const uint32_t stb = ((cb & swap) | (sb & ~swap)) ^ ((q >> 1) << 31);
  zc = r * bits_to_float(ctb);
  zs = r * bits_to_float(stb);
}

}  // namespace edgefed
