#include "kernels.hpp"
#include "kernels_isa.hpp"

#include <algorithm>
#include <atomic>
#include <thread>

#include "normal.hpp"
#include "philox.hpp"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// This file is compiled once per SIMD path (CMakeLists.txt: -mavx2, -mavx512f, the baseline),
// each time into its own namespace edgefed::EDGEFED_ISA; csrc/dispatch.cpp picks one at run time.
#ifndef EDGEFED_ISA
#define EDGEFED_ISA isa_generic
#endif

namespace edgefed {
namespace EDGEFED_ISA {
namespace {

// Below this many element-updates a single thread wins over spawning.
constexpr uint64_t kMinParallelWork = 1u << 17;

// Runs f(tile_begin, tile_end) over contiguous tile ranges on up to n threads.
// Results never depend on the split: each element's value is a function of its index.
template <class F>
void parallel_tiles(uint64_t n_tiles, uint64_t work, F&& f) {
  int nt = get_num_threads();
  if (work < kMinParallelWork) nt = 1;
  nt = static_cast<int>(std::min<uint64_t>(static_cast<uint64_t>(nt), n_tiles));
  if (nt <= 1) {
    if (n_tiles) f(uint64_t{0}, n_tiles);
    return;
  }
  const uint64_t chunk = (n_tiles + nt - 1) / nt;
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int t = 1; t < nt; ++t) {
    const uint64_t a = t * chunk, b = std::min(n_tiles, a + chunk);
    if (a < b) pool.emplace_back([&f, a, b] { f(a, b); });
  }
  f(uint64_t{0}, std::min(chunk, n_tiles));
  for (auto& th : pool) th.join();
}

struct KeySchedule {
  uint32_t k0[10], k1[10];
  explicit KeySchedule(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = a; k1[r] = b;
      a += kPhiloxW0; b += kPhiloxW1;
    }
  }
};

// Philox words of kTileBlocks consecutive blocks, struct-of-arrays. The portable loop
// vectorises (NEON has a widening multiply); on x86 compilers emit a slow 64-bit
// vpmullq for it, so AVX-512 / AVX2 get a hand-written mulhi from vpmuludq.
// All paths are integer-exact: they produce the same words.
#if defined(__AVX512F__)
void philox_tile(const KeySchedule& ks, uint32_t stream, uint64_t block0, uint32_t* w0,
                 uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  // mullo from vpmulld (one op) beats re-assembling the low halves of the 64-bit products.
  const __m512i m0w = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1w = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __mmask16 odd = 0xAAAA;
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(block0 >> 32));
  for (int b = 0; b < kTileBlocks; b += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(block0 + b)), iota);
    __m512i c1 = hi, c2 = _mm512_set1_epi32(static_cast<int>(stream)), c3 = _mm512_setzero_si512();
    for (int r = 0; r < 10; ++r) {
      const __m512i pe0 = _mm512_mul_epu32(c0, m0), po0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i pe1 = _mm512_mul_epu32(c2, m1), po1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pe0, 32), po0);
      const __m512i lo0 = _mm512_mullo_epi32(c0, m0w);
      const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pe1, 32), po1);
      const __m512i lo1 = _mm512_mullo_epi32(c2, m1w);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(ks.k0[r])), 0x96);
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(ks.k1[r])), 0x96);
      c1 = lo1;
      c3 = lo0;
    }
    _mm512_store_si512(reinterpret_cast<__m512i*>(w0 + b), c0);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w1 + b), c1);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w2 + b), c2);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w3 + b), c3);
  }
}
#elif defined(__AVX2__)
void philox_tile(const KeySchedule& ks, uint32_t stream, uint64_t block0, uint32_t* w0,
                 uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(block0 >> 32));
  for (int b = 0; b < kTileBlocks; b += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(block0 + b)), iota);
    __m256i c1 = hi, c2 = _mm256_set1_epi32(static_cast<int>(stream)), c3 = _mm256_setzero_si256();
    for (int r = 0; r < 10; ++r) {
      const __m256i pe0 = _mm256_mul_epu32(c0, m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i pe1 = _mm256_mul_epu32(c2, m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(ks.k0[r])));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(ks.k1[r])));
      c1 = lo1;
      c3 = lo0;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(w0 + b), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w1 + b), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w2 + b), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w3 + b), c3);
  }
}
#else
void philox_tile(const KeySchedule& ks, uint32_t stream, uint64_t block0, uint32_t* w0,
                 uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const uint32_t hi = static_cast<uint32_t>(block0 >> 32);  // tiles never straddle 2^32 blocks
  const uint32_t lo0 = static_cast<uint32_t>(block0);
  for (int b = 0; b < kTileBlocks; ++b) {
    uint32_t c0 = lo0 + static_cast<uint32_t>(b), c1 = hi, c2 = stream, c3 = 0;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ ks.k0[r];
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ ks.k1[r];
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
    }
    w0[b] = c0; w1[b] = c1; w2[b] = c2; w3[b] = c3;
  }
}
#endif

void normal_pairs(const uint32_t* wa, const uint32_t* wb, float* zc, float* zs) {
  for (int b = 0; b < kTileBlocks; ++b) box_muller(wa[b], wb[b], zc[b], zs[b]);
}

void generate_tile_impl(const KeySchedule& ks, uint32_t stream, uint64_t tile, Dist dist,
                        float* out) {
  alignas(64) uint32_t w[4][kTileBlocks];
  philox_tile(ks, stream, tile * kTileBlocks, w[0], w[1], w[2], w[3]);
  if (dist == Dist::Normal) {
    alignas(64) float z[4][kTileBlocks];
    normal_pairs(w[0], w[1], z[0], z[1]);
    normal_pairs(w[2], w[3], z[2], z[3]);
    for (int b = 0; b < kTileBlocks; ++b)
      for (int k = 0; k < 4; ++k) out[4 * b + k] = z[k][b];
  } else {
    for (int b = 0; b < kTileBlocks; ++b)
      for (int k = 0; k < 4; ++k) out[4 * b + k] = (w[k][b] >> 31) ? -1.0f : 1.0f;
  }
}

// Calls g(local_ptr, tile_offset, count) for every part of [t0, t1) covered by segments,
// starting the search at *cursor (segments are sorted and tiles visited in order).
template <class G>
void for_each_piece(const std::vector<Segment>& segs, size_t* cursor, uint64_t t0, uint64_t t1,
                    G&& g) {
  size_t s = *cursor;
  while (s < segs.size() && segs[s].begin + segs[s].size <= t0) ++s;
  *cursor = s;
  for (; s < segs.size() && segs[s].begin < t1; ++s) {
    const uint64_t a = std::max(t0, segs[s].begin);
    const uint64_t b = std::min(t1, segs[s].begin + segs[s].size);
    if (a < b) g(segs[s].data + (a - segs[s].begin), static_cast<int>(a - t0), static_cast<int>(b - a));
  }
}

uint64_t total_size(const std::vector<Segment>& segs) {
  return segs.empty() ? 0 : segs.back().begin + segs.back().size;
}

size_t first_segment(const std::vector<Segment>& segs, uint64_t elem) {
  // Binary search: the first segment that ends after elem.
  size_t lo = 0, hi = segs.size();
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (segs[mid].begin + segs[mid].size <= elem) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace

const char* compiled_isa() {
#if defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE2__)
  return "sse2";
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
  return "neon";
#else
  return "scalar";
#endif
}

void generate_tile(uint64_t seed, uint32_t stream, uint64_t tile, Dist dist, float* out) {
  generate_tile_impl(KeySchedule(seed), stream, tile, dist, out);
}

void apply_seeds(const std::vector<Segment>& segs, const uint64_t* seeds, const float* coeffs,
                 size_t n_seeds, Dist dist) {
  const uint64_t n = total_size(segs);
  if (n == 0 || n_seeds == 0) return;
  std::vector<KeySchedule> keys;
  keys.reserve(n_seeds);
  for (size_t j = 0; j < n_seeds; ++j) keys.emplace_back(seeds[j]);
  const uint64_t n_tiles = (n + kTile - 1) / kTile;
  parallel_tiles(n_tiles, n * n_seeds, [&](uint64_t ta, uint64_t tb) {
    alignas(64) float z[kTile];
    size_t cursor = first_segment(segs, ta * kTile);
    for (uint64_t t = ta; t < tb; ++t) {
      const uint64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
      // Segments may leave gaps (a masked direction space): no z for a tile nobody holds.
      while (cursor < segs.size() && segs[cursor].begin + segs[cursor].size <= e0) ++cursor;
      if (cursor == segs.size() || segs[cursor].begin >= e1) continue;
      for (size_t j = 0; j < n_seeds; ++j) {
        generate_tile_impl(keys[j], 0, t, dist, z);
        const float c = coeffs[j];
        for_each_piece(segs, &cursor, e0, e1, [&](float* p, int off, int cnt) {
          const float* zz = z + off;
          for (int i = 0; i < cnt; ++i) p[i] = p[i] + c * zz[i];
        });
      }
    }
  });
}

void fill(float* out, uint64_t n, uint64_t seed, uint32_t stream, uint64_t offset, Dist dist) {
  if (n == 0) return;
  const KeySchedule ks(seed);
  const uint64_t t_first = offset / kTile, t_last = (offset + n - 1) / kTile;
  parallel_tiles(t_last - t_first + 1, n, [&](uint64_t ta, uint64_t tb) {
    alignas(64) float z[kTile];
    for (uint64_t t = t_first + ta; t < t_first + tb; ++t) {
      generate_tile_impl(ks, stream, t, dist, z);
      const uint64_t e0 = std::max(offset, t * kTile), e1 = std::min(offset + n, (t + 1) * kTile);
      std::copy(z + (e0 - t * kTile), z + (e1 - t * kTile), out + (e0 - offset));
    }
  });
}

void add_scalar(const std::vector<Segment>& segs, float c) {
  const uint64_t n = total_size(segs);
  const uint64_t n_tiles = (n + kTile - 1) / kTile;
  parallel_tiles(n_tiles, n, [&](uint64_t ta, uint64_t tb) {
    size_t cursor = first_segment(segs, ta * kTile);
    for (uint64_t t = ta; t < tb; ++t) {
      const uint64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
      for_each_piece(segs, &cursor, e0, e1, [&](float* p, int, int cnt) {
        for (int i = 0; i < cnt; ++i) p[i] = p[i] + c;
      });
    }
  });
}

}  // namespace EDGEFED_ISA
}  // namespace edgefed
