// One source for the RNG contract's per-element code (philox.hpp, normal.hpp) on CPUs and on
// CUDA GPUs: host C++ (g++/clang, -ffp-contract=off), nvcc and NVRTC (which has no standard
// headers) all compile it, so a GPU regenerates z(seed) from the very lines the CPU kernels use.
#pragma once

#if defined(__CUDACC_RTC__)
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#endif

#if defined(__CUDACC__)
#define EDGEFED_HD __host__ __device__ __forceinline__
#define EDGEFED_UNROLL _Pragma("unroll")
#else
#define EDGEFED_HD inline
#define EDGEFED_UNROLL
#endif

namespace edgefed {

EDGEFED_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

EDGEFED_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
#endif
}

// IEEE-754 square root, correctly rounded on both (sqrtf may be approximate under some CUDA flags).
EDGEFED_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

}  // namespace edgefed
