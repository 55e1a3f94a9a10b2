// The kernels of one SIMD path. csrc/kernels.cpp is compiled once per path, each time into
// edgefed::<path> (EDGEFED_ISA); csrc/dispatch.cpp declares every compiled path with this
// macro and routes the public functions of kernels.hpp to the one chosen at run time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels.hpp"

#define EDGEFED_DECLARE_ISA(ns)                                                                 \
  namespace edgefed {                                                                           \
  namespace ns {                                                                                \
  const char* compiled_isa();                                                                   \
  void generate_tile(uint64_t seed, uint32_t stream, uint64_t tile, Dist dist, float* out);     \
  void apply_seeds(const std::vector<Segment>& segments, const uint64_t* seeds,                 \
                   const float* coeffs, size_t n_seeds, Dist dist);                             \
  void fill(float* out, uint64_t n, uint64_t seed, uint32_t stream, uint64_t offset, Dist dist); \
  void add_scalar(const std::vector<Segment>& segments, float c);                               \
  }                                                                                             \
  }

#ifdef EDGEFED_ISA
EDGEFED_DECLARE_ISA(EDGEFED_ISA)
#endif
