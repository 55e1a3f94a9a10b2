// Run-time choice of the SIMD path: one binary carries the baseline and, on x86-64, AVX2 and
// AVX-512 builds of csrc/kernels.cpp; the widest one this CPU supports is used unless the
// EDGEFED_SIMD environment variable names another (for checks and benchmarks). Every path
// computes the same bits (tests/test_kernels.py checks each against the numpy reference).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "kernels.hpp"
#include "kernels_isa.hpp"

EDGEFED_DECLARE_ISA(isa_generic)
#ifdef EDGEFED_HAVE_AVX2
EDGEFED_DECLARE_ISA(isa_avx2)
#endif
#ifdef EDGEFED_HAVE_AVX512F
EDGEFED_DECLARE_ISA(isa_avx512f)
#endif

namespace edgefed {
namespace {

struct Impl {
  const char* (*name)();
  void (*generate_tile)(uint64_t, uint32_t, uint64_t, Dist, float*);
  void (*apply_seeds)(const std::vector<Segment>&, const uint64_t*, const float*, size_t, Dist);
  void (*fill)(float*, uint64_t, uint64_t, uint32_t, uint64_t, Dist);
  void (*add_scalar)(const std::vector<Segment>&, float);
};

#define EDGEFED_IMPL(ns) \
  Impl { &ns::compiled_isa, &ns::generate_tile, &ns::apply_seeds, &ns::fill, &ns::add_scalar }

// Widest first.
const Impl kImpls[] = {
#ifdef EDGEFED_HAVE_AVX512F
    EDGEFED_IMPL(isa_avx512f),
#endif
#ifdef EDGEFED_HAVE_AVX2
    EDGEFED_IMPL(isa_avx2),
#endif
    EDGEFED_IMPL(isa_generic),
};

bool cpu_runs(const char* isa) {
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's check covers the CPU's flag and the OS saving the wider registers (XGETBV).
  if (std::strcmp(isa, "avx512f") == 0) return __builtin_cpu_supports("avx512f");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2");
#endif
  (void)isa;
  return true;  // the baseline of the build target
}

const Impl* find(const char* name) {
  for (const Impl& im : kImpls)
    if (std::strcmp(im.name(), name) == 0) return &im;
  return nullptr;
}

const Impl* choose() {
  if (const char* want = std::getenv("EDGEFED_SIMD")) {
    const Impl* im = find(want);
    if (im && cpu_runs(want)) return im;  // else: the widest (edgefed/kernels.py says why)
  }
  for (const Impl& im : kImpls)
    if (cpu_runs(im.name())) return &im;
  return &kImpls[sizeof(kImpls) / sizeof(kImpls[0]) - 1];
}

std::atomic<const Impl*> g_impl{nullptr};
std::atomic<int> g_threads{0};  // 0: all hardware threads

const Impl& impl() {
  const Impl* im = g_impl.load(std::memory_order_acquire);
  if (!im) {
    im = choose();
    g_impl.store(im, std::memory_order_release);
  }
  return *im;
}

}  // namespace

const char* simd_path() { return impl().name(); }

std::vector<const char*> simd_paths_compiled() {
  std::vector<const char*> out;
  for (const Impl& im : kImpls) out.push_back(im.name());
  return out;
}

bool simd_path_supported(const char* name) { return find(name) != nullptr && cpu_runs(name); }

bool set_simd_path(const char* name) {
  const Impl* im = find(name);
  if (!im || !cpu_runs(name)) return false;
  g_impl.store(im, std::memory_order_release);
  return true;
}

bool native_build() {
#ifdef EDGEFED_NATIVE_BUILD
  return true;
#else
  return false;
#endif
}

void set_num_threads(int n) { g_threads.store(n > 0 ? n : 0); }

int get_num_threads() {
  const int n = g_threads.load();
  if (n > 0) return n;
  const unsigned h = std::thread::hardware_concurrency();
  return h ? static_cast<int>(h) : 1;
}

void generate_tile(uint64_t seed, uint32_t stream, uint64_t tile, Dist dist, float* out) {
  impl().generate_tile(seed, stream, tile, dist, out);
}

void apply_seeds(const std::vector<Segment>& segs, const uint64_t* seeds, const float* coeffs,
                 size_t n_seeds, Dist dist) {
  impl().apply_seeds(segs, seeds, coeffs, n_seeds, dist);
}

void fill(float* out, uint64_t n, uint64_t seed, uint32_t stream, uint64_t offset, Dist dist) {
  impl().fill(out, n, seed, stream, offset, dist);
}

void add_scalar(const std::vector<Segment>& segs, float c) { impl().add_scalar(segs, c); }

}  // namespace edgefed
