// The seeded kernels' work for one Philox block (elements 4b .. 4b+3 of the logical vector),
// written once for the GPU kernels (seeded.cu runs one block per thread) and for the CPU
// emulation in bindings.cpp (one block after another), which tests check bit for bit against
// the tiled CPU kernels. Same contract (docs/rng.md): element i of z(seed) on `stream` comes
// from word i % 4 of Philox4x32-10 at counter (i/4 low, i/4 high, stream, 0); the update is
// theta = theta + c * z, two roundings, seed after seed in order.
#pragma once
#include "../hd.hpp"
#include "../normal.hpp"
#include "../philox.hpp"

namespace edgefed {

// z(seed)[4*blk .. 4*blk+3] on `stream`; dist 0: normal (Box-Muller), 1: Rademacher.
EDGEFED_HD void block_z(uint64_t seed, uint32_t stream, uint64_t blk, int dist, float z[4]) {
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), stream, 0u,
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  if (dist == 0) {
    box_muller(w.v[0], w.v[1], z[0], z[1]);
    box_muller(w.v[2], w.v[3], z[2], z[3]);
  } else {
    for (int k = 0; k < 4; ++k) z[k] = (w.v[k] >> 31) ? -1.0f : 1.0f;
  }
}

// theta holds logical elements [begin, begin + n); block blk's elements there get
// theta += coeffs[j] * z(seeds[j]) for j = 0 .. n_seeds-1, in that order (stream 0). Lanes
// outside the range (the vector's ragged ends) are computed and dropped: constant indices keep
// t and z in registers on a GPU.
EDGEFED_HD void apply_block(float* theta, uint64_t begin, uint64_t n, uint64_t blk, const uint64_t* seeds,
                            const float* coeffs, int n_seeds, int dist) {
  const uint64_t e0 = blk * 4;
  bool in[4];
  float t[4], z[4];
  EDGEFED_UNROLL
  for (int k = 0; k < 4; ++k) {
    in[k] = e0 + k >= begin && e0 + k < begin + n;
    t[k] = in[k] ? theta[e0 + k - begin] : 0.0f;
  }
  for (int j = 0; j < n_seeds; ++j) {
    block_z(seeds[j], 0u, blk, dist, z);
    const float c = coeffs[j];
    EDGEFED_UNROLL
    for (int k = 0; k < 4; ++k) t[k] = t[k] + c * z[k];
  }
  EDGEFED_UNROLL
  for (int k = 0; k < 4; ++k)
    if (in[k]) theta[e0 + k - begin] = t[k];
}

// out[i] = z(seed)[offset + i] on `stream`, for the elements of block blk in [offset, offset + n).
EDGEFED_HD void fill_block(float* out, uint64_t offset, uint64_t n, uint64_t blk, uint64_t seed, uint32_t stream,
                           int dist) {
  const uint64_t e0 = blk * 4;
  float z[4];
  block_z(seed, stream, blk, dist, z);
  EDGEFED_UNROLL
  for (int k = 0; k < 4; ++k)
    if (e0 + k >= offset && e0 + k < offset + n) out[e0 + k - offset] = z[k];
}

}  // namespace edgefed
