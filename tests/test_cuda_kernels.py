"""The seeded kernels on CUDA (edgefed/cuda_kernels.py, csrc/cuda/) against the CPU kernels.

Three layers, so a machine without a GPU still checks most of what a GPU runs:
- the kernels' per-block code (csrc/cuda/seeded_blocks.hpp), compiled for the CPU and run block
  after block, equals the tiled CPU kernels bit for bit, ragged ends and large offsets included;
- NVRTC compiles the kernel source (no GPU needed) into PTX whose float arithmetic is all IEEE
  round-to-nearest: no fused multiply-add, no approximate division or square root (a control
  build with --fmad=true shows the check can fail);
- on a GPU (skipped elsewhere): perturb, zo_update, replay and fill on CUDA tensors equal the CPU
  kernels bit for bit.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from edgefed import _kernels, kernels
from edgefed.kernels import KernelInputError

CASES = [(0, 1), (3, 10), (0, 4096), (1023, 5000), (5, 2), (2**33 + 1, 77), (2**40 - 3, 1030), (7, 100_003)]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_the_cuda_block_code_equals_the_cpu_kernels(dist):
    code = {"normal": 0, "rademacher": 1}[dist]
    rng = np.random.default_rng(7)
    for begin, n in CASES:
        base = rng.standard_normal(n).astype(np.float32)
        seeds = rng.integers(0, 2**64, 9, dtype=np.uint64, endpoint=False)
        coeffs = (rng.standard_normal(9) * 1e-3).astype(np.float32)
        got = base.copy()
        _kernels.emulate_cuda_apply(got, begin, seeds, coeffs, code)
        want = base.copy()
        kernels.replay([want], seeds, coeffs, dist, offsets=[begin])
        assert np.array_equal(_bits(got), _bits(want)), (begin, n)
        assert not np.array_equal(_bits(got), _bits(base))
        for stream in (0, 3):
            got_z = np.empty(n, np.float32)
            _kernels.emulate_cuda_fill(got_z, int(seeds[0]), code, stream, begin)
            want_z = np.empty(n, np.float32)
            kernels.fill(want_z, int(seeds[0]), dist, stream, begin)
            assert np.array_equal(_bits(got_z), _bits(want_z)), (begin, n, stream)


def _ptx_or_skip(**kw) -> str:
    ck = pytest.importorskip("edgefed.cuda_kernels")
    try:
        return ck.ptx(**kw)
    except ck.CudaUnavailable as e:
        pytest.skip(f"NVRTC unavailable here ({e}); the dev extra installs cuda-bindings and nvidia-cuda-nvrtc-cu12")


def _float_ops(ptx: str) -> set[str]:
    return {op for op in re.findall(r"^\s*(?:@%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*)", ptx, re.M)
            if ".f32" in op or op.startswith("fma")}


@pytest.mark.parametrize("arch", ["compute_75", "compute_90"])
def test_nvrtc_builds_the_kernels_with_ieee_rounded_arithmetic_only(arch):
    ptx = _ptx_or_skip(arch=arch)
    assert ".entry edgefed_apply_seeds" in ptx and ".entry edgefed_fill" in ptx
    ops = _float_ops(ptx)
    # the contract's operations, each correctly rounded
    for need in ("add.rn.f32", "sub.rn.f32", "mul.rn.f32", "div.rn.f32", "sqrt.rn.f32"):
        assert need in ops, (need, sorted(ops))
    bad = sorted(op for op in ops if op.startswith("fma") or ".approx" in op or ".ftz" in op or
                 (op.split(".")[0] in ("add", "sub", "mul", "div", "sqrt") and ".rn" not in op))
    assert not bad, f"fused, approximate or flushing float ops in the PTX: {bad}"


def test_the_arithmetic_check_catches_a_contracting_build():
    from edgefed.cuda_kernels import NVRTC_OPTIONS
    loose = tuple(o for o in NVRTC_OPTIONS if not o.startswith("--fmad")) + ("--fmad=true",)
    ops = _float_ops(_ptx_or_skip(arch="compute_90", options=loose))
    assert any(op.startswith("fma") for op in ops), sorted(ops)


def test_nvrtc_makes_a_cubin_for_a_real_gpu():
    ck = pytest.importorskip("edgefed.cuda_kernels")
    try:
        image = ck.compile_source("sm_90")
    except ck.CudaUnavailable as e:
        pytest.skip(f"NVRTC unavailable here ({e})")
    assert image[:4] == b"\x7fELF"


def test_the_cuda_kernels_refuse_what_they_cannot_use():
    torch = pytest.importorskip("torch")
    from edgefed import cuda_kernels as ck
    with pytest.raises(KernelInputError, match="on cpu"):
        ck.perturb(torch.zeros(8), 1, 1e-3)
    with pytest.raises(KernelInputError, match="numpy"):
        ck.perturb(np.zeros(8, np.float32), 1, 1e-3)
    with pytest.raises(KernelInputError, match="non-finite"):
        ck.replay(torch.zeros(8), [1, 2], [1.0, float("inf")])
    with pytest.raises(KernelInputError, match="seed"):
        ck.perturb(torch.zeros(8), -1, 1e-3)


def _gpu_or_skip():
    torch = pytest.importorskip("torch")
    from edgefed import cuda_kernels as ck
    ok, why = ck.available()
    if not ok:
        pytest.skip(f"no GPU for the CUDA kernels: {why}")
    return torch, ck


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_the_gpu_kernels_equal_the_cpu_kernels(dist):
    torch, ck = _gpu_or_skip()
    rng = np.random.default_rng(11)
    for begin, n in CASES:
        base = rng.standard_normal(n).astype(np.float32)
        seeds = [int(s) for s in rng.integers(0, 2**63, 64)]
        coeffs = (rng.standard_normal(64) * 1e-3).astype(np.float32)
        gpu = torch.from_numpy(base.copy()).cuda()
        cpu = base.copy()
        ck.perturb(gpu, seeds[0], 1e-3, dist, offsets=[begin])
        kernels.perturb([cpu], seeds[0], 1e-3, dist, offsets=[begin])
        ck.zo_update(gpu, seeds[0], 1e-3, 2e-3, 0.37, dist, offsets=[begin])
        kernels.zo_update([cpu], seeds[0], 1e-3, 2e-3, 0.37, dist, offsets=[begin])
        ck.replay(gpu, seeds, coeffs, dist, offsets=[begin])
        kernels.replay([cpu], seeds, coeffs, dist, offsets=[begin])
        assert np.array_equal(_bits(gpu.cpu().numpy()), _bits(cpu)), (begin, n)
        z_gpu = torch.empty(n, device="cuda")
        ck.fill(z_gpu, seeds[1], dist, stream=2, offset=begin)
        z_cpu = np.empty(n, np.float32)
        kernels.fill(z_cpu, seeds[1], dist, stream=2, offset=begin)
        assert np.array_equal(_bits(z_gpu.cpu().numpy()), _bits(z_cpu)), (begin, n)


def test_the_gpu_kernels_follow_the_cpu_split_across_tensors():
    torch, ck = _gpu_or_skip()
    rng = np.random.default_rng(3)
    sizes, begins = [1000, 3, 4097], [0, 1000, 5003]  # a gap: a masked direction space
    parts = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    gpu = [torch.from_numpy(p.copy()).cuda() for p in parts]
    cpu = [p.copy() for p in parts]
    ck.replay(gpu, [5, 6, 7], [0.1, -0.2, 0.3], offsets=begins)
    kernels.replay(cpu, [5, 6, 7], [0.1, -0.2, 0.3], offsets=begins)
    for g, c in zip(gpu, cpu):
        assert np.array_equal(_bits(g.cpu().numpy()), _bits(c))
