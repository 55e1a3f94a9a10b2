// In-place seeded-perturbation kernels over one logical float32 vector that may be
// split across several buffers (a model's trainable tensors). Element i of the
// perturbation depends only on (seed, stream, i): see docs/rng.md.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace edgefed {

enum class Dist : int { Normal = 0, Rademacher = 1 };

// A piece of the logical vector: data[0 .. size) holds elements [begin, begin + size).
struct Segment {
  float* data;
  uint64_t begin;
  uint64_t size;
};

constexpr int kTile = 1024;            // elements generated at once: 4 KiB, stays in L1
constexpr int kTileBlocks = kTile / 4;  // Philox blocks per tile

void set_num_threads(int n);
int get_num_threads();
// SIMD paths: every path compiled into this binary ("avx512f", "avx2", "sse2", "neon" or
// "scalar"); the one in use (the widest this CPU runs, or EDGEFED_SIMD's choice); whether the
// baseline was tuned for the build machine (-march=native). Results are bit-identical on
// every path; speed is not.
const char* simd_path();
std::vector<const char*> simd_paths_compiled();
bool simd_path_supported(const char* name);
// Use `name` from now on; false (nothing changed) when it is not compiled in or this CPU
// cannot run it.
bool set_simd_path(const char* name);
bool native_build();

// z(seed)[tile*kTile .. +kTile) into out.
void generate_tile(uint64_t seed, uint32_t stream, uint64_t tile, Dist dist, float* out);

// theta += coeffs[j] * z(seeds[j]) for j = 0 .. n_seeds-1, in that order, tile by tile:
// the same bits as n_seeds separate perturbations, in one trip through memory.
void apply_seeds(const std::vector<Segment>& segments, const uint64_t* seeds,
                 const float* coeffs, size_t n_seeds, Dist dist);

// out[i] = z(seed)[offset + i] on the given stream.
void fill(float* out, uint64_t n, uint64_t seed, uint32_t stream, uint64_t offset, Dist dist);

// theta += c: one read and one write per element with the same threading; the
// benchmark's memory-bandwidth bound.
void add_scalar(const std::vector<Segment>& segments, float c);

}  // namespace edgefed
