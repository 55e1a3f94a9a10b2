"""The seeded kernels on CUDA: the RNG contract (docs/rng.md) on a GPU, bit for bit.

`perturb`, `zo_update`, `replay` and `fill` do on torch CUDA tensors what edgefed.kernels does on
numpy buffers, with the same bits: a GPU host perturbs, steps and replays a model in GPU memory
exactly as a Raspberry Pi does on its CPU, so ZO methods run on GPUs and every replica stays
identical. The kernel source (csrc/cuda/seeded.cu) includes the very per-element code the CPU
kernels use (csrc/philox.hpp, csrc/normal.hpp); NVRTC compiles it at first use for the GPU in
hand, with --fmad=false (a fused multiply-add changes bits) and IEEE division and square root.

Needs a CUDA build of torch and cuda-bindings with NVRTC: `pip install "edgefed[cuda12]"` (or
`[cuda13]`: the CUDA major of torch.version.cuda and the driver). No toolkit (nvcc) is needed. Host only; devices never import this module.

Checks: tests/test_cuda_kernels.py (the per-block code on the CPU against the tiled kernels; the
PTX NVRTC makes holds no fused or approximate arithmetic; bit-exactness on a GPU when there is
one) and benchmarks/gpu_check.py (bit-exactness over millions of elements, throughput against the
copy bound and torch.normal + add_, the ZO step against a forward).
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .kernels import (KernelInputError, _check_dist, _check_finite, _check_offsets, _check_replay, _check_seed,
                      _check_stream_offset, _check_zo_coefficient)

__all__ = ["available", "prepare", "compile_source", "perturb", "zo_update", "replay", "fill", "CudaUnavailable",
           "NVRTC_OPTIONS"]

# Bit-exactness needs every float op IEEE-rounded as written: no contraction into FMA, no
# approximate division or square root, denormals kept.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")
_THREADS = 256
_lock = threading.Lock()
_modules: dict[int, tuple] = {}


class CudaUnavailable(RuntimeError):
    """No usable CUDA here (no GPU, a CPU build of torch, or no cuda-bindings / NVRTC)."""


def source_dir() -> Path:
    """Where seeded.cu and the headers it includes live: the checkout's csrc/, else the wheel's copy."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "csrc", here / "_cuda_src"):
        if (d / "cuda" / "seeded.cu").is_file():
            return d
    raise CudaUnavailable(f"the CUDA kernel source is missing (looked in {here / '_cuda_src'} and "
                          f"{here.parent / 'csrc'}); reinstall edgefed from a wheel or a checkout")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise CudaUnavailable(f"cuda-bindings is not installed ({e}): pip install \"edgefed[cuda12]\" "
                              "(or [cuda13]: the CUDA major of torch.version.cuda)") from None
    return nvrtc


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaUnavailable(f"{what} failed: {err!r}")
    return rest[0] if len(rest) == 1 else rest


def compile_source(arch: str, *, cubin: bool | None = None, options: Sequence[str] = NVRTC_OPTIONS) -> bytes:
    """NVRTC-compile csrc/cuda/seeded.cu for `arch` ('sm_90': a cubin for that GPU; 'compute_90':
    PTX the driver finishes). Runs without a GPU: only NVRTC is needed."""
    nvrtc = _nvrtc()
    src_dir = source_dir()
    src = (src_dir / "cuda" / "seeded.cu").read_bytes()
    cubin = arch.startswith("sm_") if cubin is None else cubin
    prog = _check(nvrtc.nvrtcCreateProgram(src, b"seeded.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options] + [f"--gpu-architecture={arch}".encode(),
                                                      f"--include-path={src_dir / 'cuda'}".encode()]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaUnavailable(f"NVRTC could not compile the seeded kernels for {arch}:\n"
                                  f"{log.decode(errors='replace')}")
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if cubin else
                         (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        out = b" " * _check(get_size(prog), "nvrtcGet size")
        _check(get(prog, out), "nvrtcGet")
        return out
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def available() -> tuple[bool, str]:
    """(True, the GPU) when the kernels can run here, else (False, why not)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed (the host extra)"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    try:
        _check(_nvrtc().nvrtcVersion(), "loading NVRTC")  # the library itself, not just the bindings
        from cuda.bindings import driver  # noqa: F401
    except Exception as e:  # bindings without their library raise their own errors
        return False, str(e)
    return True, torch.cuda.get_device_name(0)


def prepare(device) -> None:
    """Compile and load the kernels for a CUDA device now (a cubin for it, once per process);
    raises CudaUnavailable saying why they cannot run there."""
    import torch
    dev = torch.device(device)
    try:
        _module(dev.index if dev.index is not None else torch.cuda.current_device())
    except CudaUnavailable:
        raise
    except Exception as e:
        raise CudaUnavailable(f"the CUDA seeded kernels could not be loaded on {dev}: {e}") from e


def _module(index: int):
    """(module, apply kernel, fill kernel, SM count) for CUDA device `index`, compiled once."""
    with _lock:
        if index in _modules:
            return _modules[index]
        import torch
        from cuda.bindings import driver
        major, minor = torch.cuda.get_device_capability(index)
        _check(driver.cuInit(0), "cuInit")
        with torch.cuda.device(index):
            torch.cuda.synchronize(index)  # the primary context exists and is current on this thread
            try:
                image = compile_source(f"sm_{major}{minor}")
            except CudaUnavailable:  # an NVRTC older than this GPU: PTX for the newest it knows, JIT
                image = compile_source(f"compute_{min(major * 10 + minor, 90)}") + b"\0"
            mod = _check(driver.cuModuleLoadData(image), "cuModuleLoadData")
            apply_k = _check(driver.cuModuleGetFunction(mod, b"edgefed_apply_seeds"), "cuModuleGetFunction")
            fill_k = _check(driver.cuModuleGetFunction(mod, b"edgefed_fill"), "cuModuleGetFunction")
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        _modules[index] = (mod, apply_k, fill_k, sms)
        return _modules[index]


def _launch(t, kernel_index: int, n_blocks: int, args: tuple, types: tuple) -> None:
    import torch
    from cuda.bindings import driver
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    mod = _module(index)
    grid = max(1, min(math.ceil(n_blocks / _THREADS), mod[3] * 32))
    with torch.cuda.device(index):
        stream = torch.cuda.current_stream(index).cuda_stream
        _check(driver.cuLaunchKernel(mod[kernel_index], grid, 1, 1, _THREADS, 1, 1, 0, driver.CUstream(stream),
                                     (args, types), 0), "cuLaunchKernel")


def _check_tensors(tensors) -> list:
    import torch
    if isinstance(tensors, np.ndarray):
        raise KernelInputError("got a numpy array: the CUDA kernels update torch CUDA tensors in place "
                               "(edgefed.kernels updates numpy buffers on the CPU)")
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    out = []
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise KernelInputError(f"buffer {k} is a {type(t).__name__}, expected a torch CUDA tensor")
        if not t.is_cuda:
            raise KernelInputError(f"buffer {k} is on {t.device}; the CUDA kernels work on GPU tensors "
                                   "(edgefed.kernels works on CPU numpy buffers)")
        if t.dtype != torch.float32:
            raise KernelInputError(f"buffer {k} has dtype {t.dtype}; the kernels work on float32 only "
                                   "(the global trainables stay float32; autocast the compute, not them)")
        if not t.is_contiguous():
            raise KernelInputError(f"buffer {k} is not contiguous; pass .contiguous() and keep using that copy, "
                                   "or the update is lost")
        out.append(t)
    return out


def _blocks(begin: int, n: int) -> int:
    """Philox blocks (4 elements each) that elements [begin, begin + n) touch: one GPU thread each."""
    return (begin + n - 1) // 4 - begin // 4 + 1


def _apply(tensors, seeds: np.ndarray, coeffs: np.ndarray, dist: str, offsets) -> None:
    import torch
    code = _check_dist(dist)
    ts = _check_tensors(tensors)
    sizes = [t.numel() for t in ts]
    begins = _check_offsets(offsets, sizes) or [sum(sizes[:k]) for k in range(len(sizes))]
    if seeds.size == 0:
        return
    # seeds travel as their 64 bits (torch has no uint64 arithmetic; the kernel reads them unsigned),
    # uploaded once per device for every tensor there
    uploaded: dict = {}
    for t, begin in zip(ts, begins):
        n = t.numel()
        if n == 0:
            continue
        if t.device not in uploaded:
            uploaded[t.device] = (torch.from_numpy(seeds.view(np.int64).copy()).to(t.device),
                                  torch.from_numpy(coeffs.copy()).to(t.device))
        s, c = uploaded[t.device]
        _launch(t, 1, _blocks(begin, n), (t.data_ptr(), begin, n, s.data_ptr(), c.data_ptr(), int(seeds.size), code),
                (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                 ctypes.c_int))


def perturb(tensors, seed: int, scale: float, dist: str = "normal", offsets=None) -> None:
    """theta += float32(scale) * z(seed) on the GPU, in place; edgefed.kernels.perturb's bits."""
    _check_dist(dist)
    seed = _check_seed(seed)
    scale = _check_finite(scale, "scale")
    _apply(tensors, np.array([seed], np.uint64), np.array([scale], np.float32), dist, offsets)


def zo_update(tensors, seed: int, eps: float, lr: float, g: float, dist: str = "normal", offsets=None) -> None:
    """theta += float32(eps - lr*g) * z(seed): restore and SGD step in one pass after a two-point probe."""
    _check_dist(dist)
    seed = _check_seed(seed)
    c = _check_zo_coefficient(eps, lr, g)
    _apply(tensors, np.array([seed], np.uint64), np.array([c], np.float32), dist, offsets)


def replay(tensors, seeds: Sequence[int] | np.ndarray, coeffs: Iterable[float] | np.ndarray,
           dist: str = "normal", offsets=None) -> None:
    """theta += sum_j coeffs[j] * z(seeds[j]), one pass over GPU memory; the bits of perturbing
    seed by seed in order, on any device."""
    _check_dist(dist)
    s, c = _check_replay(seeds, coeffs)
    _apply(tensors, s, c, dist, offsets)


def fill(out, seed: int, dist: str = "normal", stream: int = 0, offset: int = 0) -> None:
    """out[i] = z(seed)[offset + i] on `stream`, written on the GPU."""
    code = _check_dist(dist)
    seed = _check_seed(seed)
    stream, offset = _check_stream_offset(stream, offset)
    (t,) = _check_tensors([out])
    n = t.numel()
    if n:
        _launch(t, 2, _blocks(offset, n), (t.data_ptr(), offset, n, seed, stream, code),
                (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int))


@functools.lru_cache(maxsize=4)
def ptx(arch: str = "compute_80", options: tuple[str, ...] = NVRTC_OPTIONS) -> str:
    """The PTX NVRTC makes of the kernels (tests read it for fused or approximate arithmetic)."""
    return compile_source(arch, cubin=False, options=options).rstrip(b"\0 ").decode()
