// CUDA seeded-perturbation kernels: bit-identical to the CPU kernels (docs/rng.md).
// Compiled at run time by NVRTC (edgefed/cuda_kernels.py) with --fmad=false: a fused
// multiply-add would change bits; division and sqrt are the correctly rounded IEEE ones
// (-prec-div=true, __fsqrt_rn). One thread per Philox block of 4 elements, grid-stride, so
// any vector length runs on any grid; every element is read and written once per launch
// however many seeds it replays (a seed's z is regenerated in registers, never stored).
#include "seeded_blocks.hpp"

extern "C" __global__ void edgefed_apply_seeds(float* theta, uint64_t begin, uint64_t n, const uint64_t* seeds,
                                               const float* coeffs, int n_seeds, int dist) {
  if (n == 0) return;
  const uint64_t first = begin / 4, last = (begin + n - 1) / 4;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t blk = first + static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; blk <= last;
       blk += stride)
    edgefed::apply_block(theta, begin, n, blk, seeds, coeffs, n_seeds, dist);
}

extern "C" __global__ void edgefed_fill(float* out, uint64_t offset, uint64_t n, uint64_t seed, uint32_t stream,
                                        int dist) {
  if (n == 0) return;
  const uint64_t first = offset / 4, last = (offset + n - 1) / 4;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t blk = first + static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; blk <= last;
       blk += stride)
    edgefed::fill_block(out, offset, n, blk, seed, stream, dist);
}
