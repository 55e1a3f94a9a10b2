// Standalone check of the kernels, no Python: Random123 known-answer vectors, the
// tiled kernels against a one-element-at-a-time reference, and the committed test
// vectors (tests/vectors/perturbation.txt, produced by edgefed/rng.py). Built natively
// and cross-built for aarch64 (run under qemu-aarch64) by CI.
//   test_vectors VECTORS_FILE [--bench N]
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "normal.hpp"
#include "philox.hpp"

using namespace edgefed;

static int g_failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++g_failures;                                        \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                   \
      std::fprintf(stderr, "\n");                          \
    }                                                      \
  } while (0)

// Reference: element i straight from the spec, no tiles, no threads.
static float reference_z(uint64_t seed, uint32_t stream, uint64_t i, Dist dist) {
  const uint64_t blk = i / 4;
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32),
                                  stream, 0, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  const int k = static_cast<int>(i % 4);
  if (dist == Dist::Rademacher) return (w.v[k] >> 31) ? -1.0f : 1.0f;
  float zc, zs;
  box_muller(w.v[k & 2], w.v[(k & 2) + 1], zc, zs);
  return (k & 1) ? zs : zc;
}

static void check_kat() {
  struct Kat { uint32_t c[4], k[2], out[4]; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& t : kats) {
    const Philox4 w = philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int j = 0; j < 4; ++j) CHECK(w.v[j] == t.out[j], "Random123 KAT word %d: %08x != %08x", j, w.v[j], t.out[j]);
  }
}

static std::vector<Segment> split(std::vector<float>& v, const std::vector<uint64_t>& cuts) {
  std::vector<Segment> segs;
  uint64_t a = 0;
  for (size_t c = 0; c <= cuts.size(); ++c) {
    const uint64_t b = c < cuts.size() ? cuts[c] : v.size();
    segs.push_back(Segment{v.data() + a, a, b - a});
    a = b;
  }
  return segs;
}

static void check_against_reference() {
  const uint64_t seeds[] = {0, 1, 0xdeadbeefcafef00dull, 1ull << 32};
  for (int d = 0; d < 2; ++d) {
    const Dist dist = static_cast<Dist>(d);
    for (uint64_t seed : seeds) {
      const uint64_t n = 3 * kTile + 77, offset = 4093;
      std::vector<float> out(n);
      for (int threads : {1, 2, 3}) {
        set_num_threads(threads);
        fill(out.data(), n, seed, 2, offset, dist);
        for (uint64_t i = 0; i < n; ++i) {
          const float r = reference_z(seed, 2, offset + i, dist);
          if (std::memcmp(&r, &out[i], 4) != 0) {
            CHECK(false, "fill dist=%d seed=%" PRIu64 " i=%" PRIu64 " threads=%d", d, seed, i, threads);
            break;
          }
        }
      }
      // apply over a split vector == element-wise reference, for several thread counts
      const uint64_t m = 5 * kTile + 13;
      const uint64_t s2[2] = {seed, seed ^ 0x1234};
      const float c2[2] = {0.37f, -1.5f};
      for (int threads : {1, 2, 4}) {
        set_num_threads(threads);
        std::vector<float> v(m);
        for (uint64_t i = 0; i < m; ++i) v[i] = static_cast<float>(i % 7) - 3.0f;
        apply_seeds(split(v, {1, 1000, 1025, 3000}), s2, c2, 2, dist);
        for (uint64_t i = 0; i < m; ++i) {
          float e = static_cast<float>(i % 7) - 3.0f;
          for (int j = 0; j < 2; ++j) e = e + c2[j] * reference_z(s2[j], 0, i, dist);
          if (std::memcmp(&e, &v[i], 4) != 0) {
            CHECK(false, "apply dist=%d i=%" PRIu64 " threads=%d", d, i, threads);
            break;
          }
        }
      }
    }
  }
  set_num_threads(0);
}

// Vector file: lines "fill DIST SEED STREAM OFFSET COUNT" or
// "replay DIST COUNT NSEEDS SEED COEFF_BITS ..." followed by a line of COUNT hex words.
static void check_vectors(const char* path) {
  std::ifstream f(path);
  CHECK(f.good(), "cannot open %s", path);
  std::string line;
  int cases = 0;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream hdr(line);
    std::string kind, dname;
    hdr >> kind >> dname;
    const Dist dist = dname == "normal" ? Dist::Normal : Dist::Rademacher;
    std::vector<float> got;
    if (kind == "fill") {
      uint64_t seed, offset, count;
      uint32_t stream;
      hdr >> seed >> stream >> offset >> count;
      got.resize(count);
      fill(got.data(), count, seed, stream, offset, dist);
    } else if (kind == "replay") {
      uint64_t count;
      size_t ns;
      hdr >> count >> ns;
      std::vector<uint64_t> seeds(ns);
      std::vector<float> coeffs(ns);
      for (size_t j = 0; j < ns; ++j) {
        std::string cb;
        hdr >> seeds[j] >> cb;
        coeffs[j] = bits_to_float(static_cast<uint32_t>(std::stoul(cb, nullptr, 16)));
      }
      got.resize(count);
      for (uint64_t i = 0; i < count; ++i) got[i] = static_cast<float>(i % 7) - 3.0f;
      apply_seeds(split(got, {count / 3, count / 3 + 1}), seeds.data(), coeffs.data(), ns, dist);
    } else {
      CHECK(false, "unknown vector kind %s", kind.c_str());
      continue;
    }
    std::getline(f, line);
    std::istringstream body(line);
    std::string hex;
    for (size_t i = 0; i < got.size(); ++i) {
      body >> hex;
      const uint32_t want = static_cast<uint32_t>(std::stoul(hex, nullptr, 16));
      if (float_to_bits(got[i]) != want) {
        CHECK(false, "vector case %d (%s %s) element %zu: %08x != %08x", cases, kind.c_str(),
              dname.c_str(), i, float_to_bits(got[i]), want);
        break;
      }
    }
    ++cases;
  }
  CHECK(cases > 0, "no vectors in %s", path);
  std::printf("vectors: %d cases checked\n", cases);
}

static void bench(uint64_t n) {
  std::vector<float> v(n, 0.0f);
  std::vector<Segment> segs{{v.data(), 0, n}};
  const uint64_t seed = 42;
  const float c = 1e-3f;
  for (int d = 0; d < 2; ++d) {
    apply_seeds(segs, &seed, &c, 1, static_cast<Dist>(d));
    const auto t0 = std::chrono::steady_clock::now();
    const int reps = 5;
    for (int r = 0; r < reps; ++r) apply_seeds(segs, &seed, &c, 1, static_cast<Dist>(d));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("perturb %-10s %8.1f M elem/s (%d threads)\n", d ? "rademacher" : "normal",
                reps * n / s / 1e6, get_num_threads());
  }
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s VECTORS_FILE [--bench N]\n", argv[0]);
    return 2;
  }
  check_kat();
  check_against_reference();
  // Every SIMD path compiled in and runnable here is checked against the vectors.
  const std::string chosen = simd_path();
  for (const char* p : simd_paths_compiled()) {
    if (!simd_path_supported(p)) {
      std::printf("simd %s: compiled in, not runnable on this CPU (skipped)\n", p);
      continue;
    }
    set_simd_path(p);
    std::printf("simd %s:\n", p);
    check_vectors(argv[1]);
  }
  set_simd_path(chosen.c_str());
  if (argc >= 4 && std::strcmp(argv[2], "--bench") == 0) {
    std::printf("bench on simd %s (EDGEFED_SIMD picks another)\n", simd_path());
    bench(std::strtoull(argv[3], nullptr, 10));
  }
  std::printf("%d passed, %d failed\n", g_failures ? 0 : 1, g_failures ? 1 : 0);
  return g_failures ? 1 : 0;
}
