// pybind11 bindings: edgefed._kernels. Input checking with friendly messages lives
// in edgefed/kernels.py; these checks are the last line of defence before raw
// pointers are written, and they run before any buffer is touched.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/seeded_blocks.hpp"
#include "kernels.hpp"

namespace py = pybind11;
using namespace edgefed;

namespace {

Dist parse_dist(int d) {
  if (d != 0 && d != 1) throw py::value_error("dist code must be 0 (normal) or 1 (rademacher)");
  return static_cast<Dist>(d);
}

// Holds buffer views (and so the arrays) alive while the GIL is released.
struct Segments {
  std::vector<py::buffer_info> infos;
  std::vector<Segment> segs;
};

// offsets (optional): each buffer's logical begin in the perturbation vector, so a subset of
// a model's tensors (a masked direction space) gets exactly the z it has in the whole vector.
Segments collect(const py::list& buffers, const py::object& offsets = py::none()) {
  Segments out;
  uint64_t offset = 0;
  std::vector<uint64_t> begins;
  if (!offsets.is_none()) {
    begins = offsets.cast<std::vector<uint64_t>>();
    if (begins.size() != buffers.size())
      throw py::value_error("offsets must hold one logical begin per buffer");
  }
  for (size_t k = 0; k < buffers.size(); ++k) {
    py::buffer b = py::reinterpret_borrow<py::buffer>(buffers[k]);
    py::buffer_info info = b.request(true);  // writable, or raises BufferError
    if (info.itemsize != 4 || info.format != py::format_descriptor<float>::format())
      throw py::type_error("buffer " + std::to_string(k) + " is not float32");
    py::ssize_t expect = 4;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
      if (info.shape[d] > 1 && info.strides[d] != expect)
        throw py::value_error("buffer " + std::to_string(k) + " is not C-contiguous");
      expect *= info.shape[d];
    }
    const uint64_t n = static_cast<uint64_t>(info.size);
    if (!begins.empty()) {
      if (begins[k] < offset)
        throw py::value_error("offsets must be ascending and buffers must not overlap (buffer " +
                              std::to_string(k) + ")");
      if (begins[k] > (uint64_t{1} << 62) || n > (uint64_t{1} << 62) - begins[k])
        throw py::value_error("offset of buffer " + std::to_string(k) + " is beyond 2**62");
      offset = begins[k];
    }
    out.segs.push_back(Segment{static_cast<float*>(info.ptr), offset, n});
    offset += n;
    out.infos.push_back(std::move(info));
  }
  return out;
}

void apply(const py::list& buffers, py::array_t<uint64_t, py::array::c_style> seeds,
           py::array_t<float, py::array::c_style> coeffs, int dist, const py::object& offsets) {
  if (seeds.ndim() != 1 || coeffs.ndim() != 1 || seeds.size() != coeffs.size())
    throw py::value_error("seeds and coeffs must be 1-D arrays of equal length");
  const float* c = coeffs.data();
  for (py::ssize_t j = 0; j < coeffs.size(); ++j)
    if (!std::isfinite(c[j])) throw py::value_error("coefficient " + std::to_string(j) + " is not finite");
  const Dist d = parse_dist(dist);
  Segments s = collect(buffers, offsets);
  py::gil_scoped_release release;
  apply_seeds(s.segs, seeds.data(), c, static_cast<size_t>(seeds.size()), d);
}

void fill_py(py::buffer out, uint64_t seed, int dist, uint32_t stream, uint64_t offset) {
  const Dist d = parse_dist(dist);
  py::list one;
  one.append(out);
  Segments s = collect(one);
  py::gil_scoped_release release;
  fill(s.segs[0].data, s.segs[0].size, seed, stream, offset, d);
}

void add_scalar_py(const py::list& buffers, float c) {
  Segments s = collect(buffers);
  py::gil_scoped_release release;
  add_scalar(s.segs, c);
}

// The CUDA kernels' per-block code (csrc/cuda/seeded_blocks.hpp) run block after block on the
// CPU: tests hold it to the tiled kernels bit for bit, so a GPU check only has to prove the
// compiler kept the arithmetic (no FMA) and the launch covers every block.
void emulate_cuda_apply(py::array_t<float, py::array::c_style> theta, uint64_t begin,
                        py::array_t<uint64_t, py::array::c_style> seeds,
                        py::array_t<float, py::array::c_style> coeffs, int dist) {
  if (seeds.ndim() != 1 || coeffs.ndim() != 1 || seeds.size() != coeffs.size())
    throw py::value_error("seeds and coeffs must be 1-D arrays of equal length");
  parse_dist(dist);
  float* p = theta.mutable_data();
  const uint64_t n = static_cast<uint64_t>(theta.size());
  if (n == 0) return;
  for (uint64_t blk = begin / 4; blk <= (begin + n - 1) / 4; ++blk)
    apply_block(p, begin, n, blk, seeds.data(), coeffs.data(), static_cast<int>(seeds.size()), dist);
}

void emulate_cuda_fill(py::array_t<float, py::array::c_style> out, uint64_t seed, int dist, uint32_t stream,
                       uint64_t offset) {
  parse_dist(dist);
  float* p = out.mutable_data();
  const uint64_t n = static_cast<uint64_t>(out.size());
  if (n == 0) return;
  for (uint64_t blk = offset / 4; blk <= (offset + n - 1) / 4; ++blk) fill_block(p, offset, n, blk, seed, stream, dist);
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "EdgeFed seeded-perturbation kernels (Philox4x32-10, in place, float32)";
  m.def("apply", &apply, py::arg("buffers"), py::arg("seeds"), py::arg("coeffs"), py::arg("dist"),
        py::arg("offsets") = py::none(),
        "theta += sum_j coeffs[j] * z(seeds[j]), applied seed by seed in order, tile by tile; "
        "offsets: each buffer's logical begin (default: the buffers follow each other from 0)");
  m.def("fill", &fill_py, py::arg("out"), py::arg("seed"), py::arg("dist"), py::arg("stream"),
        py::arg("offset"));
  m.def("add_scalar", &add_scalar_py, py::arg("buffers"), py::arg("c"),
        "theta += c; the memory-bandwidth probe of the benchmark");
  m.def("set_num_threads", &set_num_threads);
  m.def("get_num_threads", &get_num_threads);
  m.def("simd_path", []() { return std::string(simd_path()); },
        "the SIMD path in use (avx512f, avx2, sse2, neon, scalar)");
  m.def("simd_paths", []() {
          std::vector<std::pair<std::string, bool>> out;
          for (const char* p : simd_paths_compiled()) out.emplace_back(p, simd_path_supported(p));
          return out;
        },
        "[(path, runnable on this CPU)] of every path compiled into this binary, widest first");
  m.def("set_simd_path", [](const std::string& name) { return set_simd_path(name.c_str()); },
        py::arg("name"), "use this path from now on; False (nothing changed) if unavailable");
  m.def("native_build", &native_build, "whether the kernels were tuned for the build machine (-march=native)");
  m.def("emulate_cuda_apply", &emulate_cuda_apply, py::arg("theta"), py::arg("begin"), py::arg("seeds"),
        py::arg("coeffs"), py::arg("dist"), "the CUDA apply kernel's per-block code, run on the CPU (tests)");
  m.def("emulate_cuda_fill", &emulate_cuda_fill, py::arg("out"), py::arg("seed"), py::arg("dist"), py::arg("stream"),
        py::arg("offset"), "the CUDA fill kernel's per-block code, run on the CPU (tests)");
  m.attr("TILE") = kTile;
}
