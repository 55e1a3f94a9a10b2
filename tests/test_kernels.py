"""The seeded-perturbation contract: C++ == numpy reference, bit for bit, for any
thread count and buffer split, on x86-64 and (cross-built, under qemu) aarch64."""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from edgefed import kernels, rng

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors" / "perturbation.txt"

needs_cpp = pytest.mark.skipif(kernels.backend() != "cpp", reason="C++ extension not built")


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    kernels.set_num_threads(0)


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def split(v, cuts):
    """Views of v cut at the given indices (the kernels see one logical vector)."""
    return [v[a:b] for a, b in zip([0, *cuts], [*cuts, v.size])]


def test_philox_known_answers():
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        assert tuple(int(w) for w in rng.philox4x32_10(*ctr, *key)) == want


def test_committed_vectors_match_reference():
    out = subprocess.run([sys.executable, str(VECTORS.parent / "make_vectors.py")], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    assert out == VECTORS.read_text(), "the RNG stream changed: devices and server would disagree"


def test_word_layout_matches_spec():
    seed, stream, i = 0xABCDEF0123456789, 3, 4 * 2**33 + 2  # block 2**33, word 2
    w = rng.philox4x32_10(2**33 & 0xFFFFFFFF, 2**33 >> 32, stream, 0, seed & 0xFFFFFFFF, seed >> 32)
    assert int(rng.words(seed, 1, stream, i)[0]) == int(w[2])
    z = rng.rademacher(seed, 1, stream, i)[0]
    assert z == (-1.0 if int(w[2]) >> 31 else 1.0)


@needs_cpp
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fill_bit_identical_to_reference(dist, threads):
    kernels.set_num_threads(threads)
    for seed, stream, offset, n in [(0, 0, 0, 300_000), (2**64 - 1, 5, 4093, 10_007),
                                    (0xDEADBEEF, 1, 2**35 + 1, 5000)]:
        out = np.empty(n, np.float32)
        kernels.fill(out, seed, dist, stream, offset)
        np.testing.assert_array_equal(bits(out), bits(rng.generate(seed, n, dist, stream, offset)))


@needs_cpp
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_perturb_any_split_any_threads(dist):
    n = 200_003
    base = np.linspace(-1, 1, n, dtype=np.float32)
    want = base.copy()
    rng.perturb([want], 77, 0.01, dist)
    for threads, cuts in [(1, []), (2, [1, 1023, 1024, 5000]), (3, [7]), (2, [n // 2])]:
        kernels.set_num_threads(threads)
        v = base.copy()
        kernels.perturb(split(v, cuts), 77, 0.01, dist)
        np.testing.assert_array_equal(bits(v), bits(want))


@needs_cpp
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_replay_equals_sequential_perturbs_and_reference(dist):
    n = 150_001
    seeds = [3, 2**40 + 1, 99, 12345678901]
    coeffs = [1e-3, -2.5e-4, 0.75, -1e-6]
    seq = np.linspace(0, 1, n, dtype=np.float32)
    ref = seq.copy()
    one = seq.copy()
    for s, c in zip(seeds, coeffs):
        kernels.perturb([seq], s, c, dist)
    rng.replay([ref], seeds, coeffs, dist)
    kernels.replay(split(one, [10, 60_000]), seeds, coeffs, dist)
    np.testing.assert_array_equal(bits(one), bits(seq))
    np.testing.assert_array_equal(bits(one), bits(ref))


@needs_cpp
def test_zo_update_matches_reference_coefficient():
    v = np.ones(4097, np.float32)
    ref = v.copy()
    kernels.zo_update([v], 5, 1e-3, 1e-2, 3.0)
    rng.perturb([ref], 5, float(rng.zo_coefficient(1e-3, 1e-2, 3.0)))
    np.testing.assert_array_equal(bits(v), bits(ref))


def test_two_point_step_restores_to_float_rounding():
    """+eps z, -2 eps z, then the fused restore+update: theta0 - lr*g*z up to rounding."""
    theta0 = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 0.02
    eps, lr, g = 1e-3, 1e-4, 2.5
    for lr_, g_ in [(0.0, 0.0), (lr, g)]:
        v = theta0.copy()
        kernels.perturb([v], 11, eps)
        kernels.perturb([v], 11, -2 * eps)
        kernels.zo_update([v], 11, eps, lr_, g_)
        z = rng.normal(11, v.size)
        expected = theta0.astype(np.float64) - lr_ * g_ * z.astype(np.float64)
        # three float32 roundings of values ~|theta| + eps|z|
        tol = 4 * np.finfo(np.float32).eps * (np.abs(theta0) + 2 * eps * np.abs(z))
        assert np.all(np.abs(v - expected) <= tol)


def test_normal_distribution_moments_and_ks():
    z = np.empty(4_000_000, np.float32)
    kernels.fill(z, 20261125)
    z64 = z.astype(np.float64)
    assert abs(z64.mean()) < 5 * 1 / np.sqrt(z.size)
    assert abs(z64.var() - 1) < 5 * np.sqrt(2 / z.size)
    assert abs(stats.kurtosis(z64)) < 5 * np.sqrt(24 / z.size)
    assert abs(stats.skew(z64)) < 5 * np.sqrt(6 / z.size)
    assert stats.kstest(z64[:1_000_000], "norm").pvalue > 1e-3
    # Independence across seeds and streams: no correlation between neighbours.
    z2 = np.empty(1_000_000, np.float32)
    kernels.fill(z2, 20261126)
    assert abs(np.corrcoef(z64[:1_000_000], z2)[0, 1]) < 5e-3
    kernels.fill(z2, 20261125, stream=1)
    assert abs(np.corrcoef(z64[:1_000_000], z2)[0, 1]) < 5e-3


def test_rademacher_balance():
    z = np.empty(2_000_000, np.float32)
    kernels.fill(z, 7, "rademacher")
    assert set(np.unique(z)) == {-1.0, 1.0}
    plus = int((z > 0).sum())
    assert stats.binomtest(plus, z.size, 0.5).pvalue > 1e-3


BAD_CALLS = [
    ("float64", lambda g: kernels.perturb([g, np.zeros(3)], 1, 0.1), "float32"),
    ("non-contiguous", lambda g: kernels.perturb([g, np.zeros(10, np.float32)[::2]], 1, 0.1), "contiguous"),
    ("read-only", lambda g: kernels.perturb([g, np.frombuffer(b"\0" * 16, np.float32)], 1, 0.1), "read-only"),
    ("nan scale", lambda g: kernels.perturb([g], 1, float("nan")), "scale is nan"),
    ("inf g", lambda g: kernels.zo_update([g], 1, 1e-3, 1e-3, float("inf")), "g"),
    ("float32 overflow", lambda g: kernels.perturb([g], 1, 1e39), "overflows"),
    ("length mismatch", lambda g: kernels.replay([g], [1, 2, 3], [0.1, 0.2]), "3 seeds, 2 coefficients"),
    ("nan coeff", lambda g: kernels.replay([g], [1, 2], [0.1, np.nan]), "coefficient 1"),
    ("negative seed", lambda g: kernels.perturb([g], -1, 0.1), "seed"),
    ("huge seed", lambda g: kernels.replay([g], [1, 2**64], [0.1, 0.1]), "seed 1"),
    ("unknown dist", lambda g: kernels.perturb([g], 1, 0.1, dist="uniform"), "dist"),
    ("not an array", lambda g: kernels.perturb([g, [1.0, 2.0]], 1, 0.1), "numpy"),
]


@pytest.mark.parametrize("name,call,message", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_and_touches_nothing(name, call, message):
    good = np.arange(5000, dtype=np.float32)
    before = good.copy()
    with pytest.raises(kernels.KernelInputError, match=message):
        call(good)
    np.testing.assert_array_equal(good, before)


@needs_cpp
def test_kernel_releases_the_gil():
    kernels.set_num_threads(1)
    big = np.zeros(30_000_000, np.float32)
    done = threading.Event()

    def work():
        kernels.replay([big], list(range(4)), [1e-3] * 4)
        done.set()

    count = 0
    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.01)
    while not done.is_set():
        count += 1
    t.join()
    assert count > 10_000, "the Python thread made no progress while the kernel ran"


def test_numpy_fallback_warns_and_agrees(tmp_path):
    code = (
        "import sys, warnings, numpy as np\n"
        "sys.modules['edgefed._kernels'] = None\n"  # make the extension import fail
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from edgefed import kernels\n"
        "assert kernels.backend() == 'numpy', kernels.backend()\n"
        "assert any('numpy reference' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "v = np.zeros(3000, np.float32); kernels.replay([v[:1000], v[1000:]], [5, 6], [0.5, -0.25])\n"
        "np.save(sys.argv[1], v)\n")
    out = tmp_path / "v.npy"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=tmp_path)
    v = np.zeros(3000, np.float32)
    kernels.replay([v], [5, 6], [0.5, -0.25])
    np.testing.assert_array_equal(bits(np.load(out)), bits(v))


# -- SIMD dispatch: every path in one binary, each bit-identical to the reference -----------

@pytest.fixture
def _restore_simd():
    before = kernels.simd_path().split("+")[0]
    yield
    if kernels.backend() == "cpp":
        kernels.set_simd_path(before)


@needs_cpp
def test_one_binary_carries_every_simd_path_of_its_architecture():
    paths = kernels.simd_paths()
    names = [p for p, _ in paths]
    if os.uname().machine in ("x86_64", "AMD64"):
        assert names[-1] == "sse2" and "avx2" in names, names  # a portable wheel: baseline + wider paths
    assert paths[-1][1], "the baseline path always runs"
    best = next(p for p, ok in paths if ok)
    if "EDGEFED_SIMD" not in os.environ:
        assert kernels.simd_path().split("+")[0] == best, "the widest runnable path is used by default"


@needs_cpp
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_every_simd_path_computes_the_reference_bits(dist, _restore_simd):
    runnable = [p for p, ok in kernels.simd_paths() if ok]
    n = 3 * 1024 + 77
    seeds = [11, 2**63 + 5, 987654321]
    coeffs = np.array([0.5, -1e-3, 3.0], np.float32)
    want = rng.generate(seeds[0], 5000, dist, 3, 123)
    start = np.linspace(-1, 1, n, dtype=np.float32)
    expect = start.copy()
    rng.replay(split(expect, [100, 2049]), np.array(seeds, np.uint64), coeffs, dist)
    for p in runnable:
        kernels.set_simd_path(p)
        assert kernels.simd_path().split("+")[0] == p
        out = np.empty(5000, np.float32)
        kernels.fill(out, seeds[0], dist, stream=3, offset=123)
        assert np.array_equal(bits(out), bits(want)), f"fill on {p}"
        v = start.copy()
        kernels.replay(split(v, [100, 2049]), seeds, coeffs, dist)
        assert np.array_equal(bits(v), bits(expect)), f"replay on {p}"


@needs_cpp
def test_simd_override_by_environment_and_refusal(tmp_path):
    with pytest.raises(kernels.KernelInputError, match="not available here"):
        kernels.set_simd_path("no-such-isa")
    code = "from edgefed import kernels; print(kernels.simd_path())"
    for p in [p for p, ok in kernels.simd_paths() if ok]:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "EDGEFED_SIMD": p})
        assert r.stdout.strip().split("+")[0] == p, r.stderr
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                       env={**os.environ, "EDGEFED_SIMD": "no-such-isa"})
    assert "EDGEFED_SIMD=no-such-isa" in r.stderr and r.returncode == 0


def _cmake_build(build_dir: Path, *extra: str) -> Path:
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DEDGEFED_PYTHON=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", *extra], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "test_vectors", "-j2"],
                   check=True, capture_output=True)
    return build_dir / "test_vectors"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_standalone_cpp_program_native(tmp_path):
    exe = _cmake_build(tmp_path / "native")
    r = subprocess.run([str(exe), str(VECTORS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failed" in r.stdout
    runnable = [p for p, ok in kernels.simd_paths() if ok] or ["sse2"]
    for p in runnable:  # the program checks every SIMD path compiled in and runnable here
        assert f"simd {p}:\nvectors: 11 cases checked" in r.stdout, r.stdout


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs g++-aarch64-linux-gnu and qemu-user (CI installs both)")
def test_standalone_cpp_program_aarch64_under_qemu(tmp_path):
    exe = _cmake_build(tmp_path / "arm", "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                       "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", "-DEDGEFED_NATIVE=OFF",
                       "-DCMAKE_EXE_LINKER_FLAGS=-static")
    assert int.from_bytes(exe.read_bytes()[18:20], "little") == 183, "not an aarch64 ELF (EM_AARCH64)"
    r = subprocess.run(["qemu-aarch64", str(exe), str(VECTORS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failed" in r.stdout


@needs_cpp
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
@pytest.mark.parametrize("threads", [1, 2])
def test_buffers_at_logical_offsets_get_their_part_of_the_whole_vector(dist, threads, _restore_simd):
    """A masked direction space passes a subset of a model's pieces with their logical begins:
    each element must change exactly as it does when the whole vector is perturbed, on every
    SIMD path, and the reference must agree."""
    kernels.set_num_threads(threads)
    n = 5 * 1024 + 333
    whole = np.linspace(-1, 1, n, dtype=np.float32)
    seeds, coeffs = [7, 2**50 + 3], [0.25, -1e-3]
    want = whole.copy()
    kernels.replay([want], seeds, coeffs, dist)
    pieces = [(10, 500), (1024, 3072), (3500, 3501), (5000, n)]  # gaps, a whole empty tile, the tail
    for path in [p for p, ok in kernels.simd_paths() if ok]:
        kernels.set_simd_path(path)
        v = whole.copy()
        bufs = [v[a:b] for a, b in pieces]
        kernels.replay(bufs, seeds, coeffs, dist, offsets=[a for a, _ in pieces])
        ref = whole.copy()
        rng.replay([ref[a:b] for a, b in pieces], seeds, coeffs, dist, offsets=[a for a, _ in pieces])
        touched = np.zeros(n, bool)
        for a, b in pieces:
            touched[a:b] = True
        assert np.array_equal(bits(v[touched]), bits(want[touched])), path
        assert np.array_equal(bits(v[~touched]), bits(whole[~touched])), f"{path}: a gap was written"
        assert np.array_equal(bits(v), bits(ref)), f"{path} differs from the reference"
    with pytest.raises(kernels.KernelInputError, match="ascending"):
        kernels.perturb([whole[:10], whole[10:20]], 1, 0.1, dist, offsets=[100, 50])
    with pytest.raises(kernels.KernelInputError, match="one logical begin per buffer"):
        kernels.perturb([whole[:10]], 1, 0.1, dist, offsets=[0, 10])
