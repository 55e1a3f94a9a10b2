"""Seeded-perturbation kernels: in place, float32, bit-identical everywhere.

``buffers`` is one logical vector split across float32 arrays (a model's trainable
tensors, in order): element indices continue from one buffer to the next, so the
same seed gives the same direction however the parameters are laid out.

All inputs are checked before any buffer is written, so a bad call changes nothing.
Buffers may also be torch tensors (a GPU host's trainables): CUDA tensors go to the CUDA kernels
(edgefed.cuda_kernels, the same bits), CPU tensors are updated through their numpy views. torch
is never imported here: a device passes numpy arrays only.
The C++ extension (``edgefed._kernels``) does the work; without it the numpy
reference in :mod:`edgefed.rng` is used, with a warning (it is ~20x slower).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Iterable, Sequence

import numpy as np

from . import rng

try:
    from . import _kernels as _ext
except ImportError as exc:  # pragma: no cover - exercised by test_kernels via a subprocess
    _ext = None
    warnings.warn(f"edgefed C++ kernels unavailable ({exc}); using the numpy reference, "
                  "which is much slower. Reinstall edgefed with gcc and cmake present "
                  "(`pip install .`) to build them.", RuntimeWarning, stacklevel=2)

__all__ = ["perturb", "zo_update", "replay", "fill", "set_num_threads", "get_num_threads", "simd_path",
           "simd_paths", "set_simd_path",
           "backend", "DISTRIBUTIONS", "KernelInputError"]

DISTRIBUTIONS = rng.DISTRIBUTIONS
_DIST_CODE = {"normal": 0, "rademacher": 1}
_threads = 0


class KernelInputError(ValueError):
    """A kernel was called with inputs it cannot use; nothing was modified."""


def backend() -> str:
    """'cpp' when the compiled kernels are loaded, else 'numpy'."""
    if os.environ.get("EDGEFED_KERNELS") == "numpy":
        return "numpy"
    return "cpp" if _ext is not None else "numpy"


def simd_path() -> str:
    """The SIMD path in use ('avx512f', 'avx2', 'sse2', 'neon', 'scalar'): the widest this CPU
    runs among those compiled into the binary, or EDGEFED_SIMD's choice; '+native' when the
    baseline was built with -march=native (EDGEFED_NATIVE=1: do not copy such a wheel to
    another CPU); 'numpy' for the fallback. Results are bit-identical on every path."""
    if backend() != "cpp":
        return "numpy"
    path = getattr(_ext, "simd_path", lambda: "unknown")()
    return path + ("+native" if getattr(_ext, "native_build", lambda: False)() else "")


def simd_paths() -> list[tuple[str, bool]]:
    """[(path, runnable here)] of every SIMD path compiled in, widest first ([] on numpy)."""
    if backend() != "cpp" or not hasattr(_ext, "simd_paths"):
        return []
    return [(str(p), bool(ok)) for p, ok in _ext.simd_paths()]


def set_simd_path(name: str) -> None:
    """Use this SIMD path from now on (checks and benchmarks; EDGEFED_SIMD does it at import)."""
    paths = simd_paths()
    if not any(p == name and ok for p, ok in paths):
        raise KernelInputError(f"SIMD path {name!r} is not available here: compiled "
                               f"{[p for p, _ in paths] or 'none (numpy fallback)'}, runnable on this CPU "
                               f"{[p for p, ok in paths if ok]}")
    _ext.set_simd_path(name)


def _check_env_simd() -> None:
    want = os.environ.get("EDGEFED_SIMD")
    if not want or backend() != "cpp" or not hasattr(_ext, "simd_paths"):
        return
    try:
        set_simd_path(want)
    except KernelInputError as e:
        warnings.warn(f"EDGEFED_SIMD={want}: {e}; using {_ext.simd_path()}", RuntimeWarning, stacklevel=3)


_check_env_simd()


def set_num_threads(n: int) -> None:
    """Threads the kernels use; 0 or less means all cores. Results never depend on it."""
    global _threads
    _threads = max(int(n), 0)
    if _ext is not None:
        _ext.set_num_threads(_threads)


def get_num_threads() -> int:
    if _ext is not None:
        return int(_ext.get_num_threads())
    return _threads or (os.cpu_count() or 1)


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _route(buffers):
    """(buffers, the CUDA kernels module or None): numpy arrays as they are; torch CPU tensors as
    their numpy views (shared memory); torch CUDA tensors to edgefed.cuda_kernels."""
    if isinstance(buffers, np.ndarray):
        return buffers, None
    if _is_torch(buffers):
        buffers = [buffers]
    elif not isinstance(buffers, (list, tuple)) or not any(_is_torch(b) for b in buffers):
        return buffers, None
    if any(_is_torch(b) and b.is_cuda for b in buffers):
        from . import cuda_kernels
        return list(buffers), cuda_kernels
    return [b.detach().numpy() if _is_torch(b) else b for b in buffers], None


def _check_dist(dist: str) -> int:
    if dist not in _DIST_CODE:
        raise KernelInputError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    return _DIST_CODE[dist]


def _check_buffers(buffers) -> list[np.ndarray]:
    if isinstance(buffers, np.ndarray):
        buffers = [buffers]
    out = []
    for k, b in enumerate(buffers):
        if not isinstance(b, np.ndarray):
            raise KernelInputError(f"buffer {k} is a {type(b).__name__}, expected a numpy float32 array")
        if b.dtype != np.float32:
            raise KernelInputError(f"buffer {k} has dtype {b.dtype}; the kernels work on float32 "
                                   "only (convert once with astype(np.float32) and keep that array)")
        if not b.flags.c_contiguous:
            raise KernelInputError(f"buffer {k} is not C-contiguous; pass np.ascontiguousarray(...) "
                                   "and keep using that copy, or the update is lost")
        if not b.flags.writeable:
            raise KernelInputError(f"buffer {k} is read-only; the kernels update in place")
        out.append(b)
    return out


def _check_seed(seed, what="seed") -> int:
    try:
        s = int(seed)
    except (TypeError, ValueError):
        raise KernelInputError(f"{what} must be an integer, got {seed!r}") from None
    if s != seed or not 0 <= s < 1 << 64:
        raise KernelInputError(f"{what} must be an integer in [0, 2**64), got {seed!r}")
    return s


def _check_finite(x, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise KernelInputError(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise KernelInputError(f"{what} is {v}; refusing to write a non-finite update "
                               "(check the loss and the learning rate)")
    if abs(v) > float(np.finfo(np.float32).max):
        raise KernelInputError(f"{what}={v} overflows float32")
    return v


def _check_offsets(offsets, sizes: Sequence[int]) -> list[int] | None:
    """Each buffer's logical begin (buffers of `sizes` elements): ascending, no overlaps (None: one
    after another from 0)."""
    if offsets is None:
        return None
    out = [int(o) for o in offsets]
    if len(out) != len(sizes):
        raise KernelInputError(f"offsets must hold one logical begin per buffer: {len(out)} offsets, "
                               f"{len(sizes)} buffers")
    end = 0
    for k, (o, n) in enumerate(zip(out, sizes)):
        if o < end or o + n > 1 << 62:
            raise KernelInputError(f"offset {o} of buffer {k} overlaps the buffer before it (which ends at "
                                   f"{end}) or passes 2**62; offsets must be ascending, buffers disjoint")
        end = o + n
    return out


def _check_zo_coefficient(eps, lr, g) -> float:
    """float32(eps - lr*g), computed in float64 (rng.zo_coefficient), every input finite."""
    c = rng.zo_coefficient(_check_finite(eps, "eps"), _check_finite(lr, "lr"),
                           _check_finite(g, "g (projected gradient)"))
    _check_finite(c, "eps - lr*g")
    return c


def _check_stream_offset(stream, offset) -> tuple[int, int]:
    if not 0 <= int(stream) < 1 << 32:
        raise KernelInputError(f"stream must be in [0, 2**32), got {stream}")
    if not 0 <= int(offset) < 1 << 62:
        raise KernelInputError(f"offset must be in [0, 2**62), got {offset}")
    return int(stream), int(offset)


def _check_replay(seeds, coeffs) -> tuple[np.ndarray, np.ndarray]:
    """(seeds as uint64, coefficients rounded to float32) of a replay, checked before anything is written."""
    seeds_list = list(seeds)
    c = np.asarray(list(coeffs) if not isinstance(coeffs, np.ndarray) else coeffs, dtype=np.float64)
    if c.ndim != 1 or len(seeds_list) != c.shape[0]:
        raise KernelInputError(f"replay needs one coefficient per seed: {len(seeds_list)} seeds, "
                               f"{c.size} coefficients")
    bad = np.flatnonzero(~np.isfinite(c.astype(np.float32)))
    if bad.size:
        raise KernelInputError(f"coefficient {int(bad[0])} is {c[bad[0]]} (non-finite in float32); "
                               "nothing was applied")
    s = np.array([_check_seed(x, f"seed {j}") for j, x in enumerate(seeds_list)], dtype=np.uint64)
    return s, c.astype(np.float32)


def _apply(buffers: list[np.ndarray], seeds: np.ndarray, coeffs: np.ndarray, dist: str,
           offsets: list[int] | None = None) -> None:
    if backend() == "cpp":
        _ext.apply(buffers, seeds, coeffs, _DIST_CODE[dist], offsets)
    else:
        rng.replay(buffers, seeds, coeffs, dist, offsets)


def perturb(buffers, seed: int, scale: float, dist: str = "normal", offsets=None) -> None:
    """theta += float32(scale) * z(seed), in place. offsets: each buffer's logical begin in the
    perturbation vector (a subset of a model's tensors gets the z it has in the whole vector)."""
    buffers, gpu = _route(buffers)
    if gpu:
        return gpu.perturb(buffers, seed, scale, dist, offsets)
    _check_dist(dist)
    seed = _check_seed(seed)
    scale = _check_finite(scale, "scale")
    bufs = _check_buffers(buffers)
    _apply(bufs, np.array([seed], np.uint64), np.array([scale], np.float32), dist,
           _check_offsets(offsets, [b.size for b in bufs]))


def zo_update(buffers, seed: int, eps: float, lr: float, g: float, dist: str = "normal",
              offsets=None) -> None:
    """Fused restore + SGD step after a two-point probe that left theta at theta - eps*z:
    theta += (eps - lr*g) * z, one pass over memory."""
    buffers, gpu = _route(buffers)
    if gpu:
        return gpu.zo_update(buffers, seed, eps, lr, g, dist, offsets)
    _check_dist(dist)
    seed = _check_seed(seed)
    c = _check_zo_coefficient(eps, lr, g)
    bufs = _check_buffers(buffers)
    _apply(bufs, np.array([seed], np.uint64), np.array([c], np.float32), dist,
           _check_offsets(offsets, [b.size for b in bufs]))


def replay(buffers, seeds: Sequence[int] | np.ndarray, coeffs: Iterable[float] | np.ndarray,
           dist: str = "normal", offsets=None) -> None:
    """theta += sum_j coeffs[j] * z(seeds[j]), in one tiled pass; bit-identical to calling
    perturb(buffers, seeds[j], coeffs[j]) for j in order."""
    buffers, gpu = _route(buffers)
    if gpu:
        return gpu.replay(buffers, seeds, coeffs, dist, offsets)
    _check_dist(dist)
    s, c = _check_replay(seeds, coeffs)
    bufs = _check_buffers(buffers)
    offs = _check_offsets(offsets, [b.size for b in bufs])
    if s.size:
        _apply(bufs, s, c, dist, offs)


def fill(out: np.ndarray, seed: int, dist: str = "normal", stream: int = 0, offset: int = 0) -> None:
    """out[i] = z(seed)[offset + i] on `stream` (0: parameter perturbations; others for
    e.g. projection matrices)."""
    (out,), gpu = _route([out])
    if gpu:
        return gpu.fill(out, seed, dist, stream, offset)
    code = _check_dist(dist)
    seed = _check_seed(seed)
    stream, offset = _check_stream_offset(stream, offset)
    (buf,) = _check_buffers([out])
    if backend() == "cpp":
        _ext.fill(buf, seed, code, stream, offset)
    else:
        buf.reshape(-1)[:] = rng.generate(seed, buf.size, dist, stream, offset)
