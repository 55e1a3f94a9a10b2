"""The device extra installs on the fleet's devices: for aarch64 (Raspberry Pi OS 64-bit,
JetPack 6) on CPython 3.10-3.12 it resolves to wheels only (manylinux2014 / manylinux_2_28), and
nothing of it pulls in torch, transformers or peft. Resolved against PyPI with pip's dry run."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

HOST_ONLY = {"torch", "transformers", "peft", "accelerate", "onnx", "gguf"}
NETWORK = ("NewConnectionError", "Temporary failure in name resolution", "Failed to establish a new connection",
           "Max retries exceeded", "Network is unreachable")


def _device_requirements() -> list[str]:
    reqs = importlib.metadata.requires("edgefed") or []
    out = [r.split(";")[0].strip() for r in reqs if 'extra == "device"' in r.replace("'", '"')]
    assert out, "the installed edgefed metadata lists no device extra"
    return out


@pytest.mark.parametrize("py", ["3.10", "3.11", "3.12"])
def test_device_extra_resolves_for_aarch64_without_torch(tmp_path, py):
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--target", str(tmp_path / "t"), "--only-binary=:all:", "--implementation", "cp",
           "--python-version", py, "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64",
           "--report", str(report), *_device_requirements()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode and any(s in res.stderr for s in NETWORK):
        pytest.skip(f"PyPI unreachable from here: {res.stderr.strip().splitlines()[-1][:200]}")
    assert res.returncode == 0, res.stderr[-2000:]
    installs = json.loads(report.read_text())["install"]
    names = {i["metadata"]["name"].lower().replace("_", "-") for i in installs}
    assert {"numpy", "onnxruntime", "paho-mqtt", "tokenizers", "cryptography", "pycryptodome"} <= names
    assert not names & HOST_ONLY, names & HOST_ONLY
    for i in installs:  # wheels only: pure Python, or built for aarch64
        wheel = i["download_info"]["url"].rsplit("/", 1)[-1]
        assert wheel.endswith(".whl") and ("aarch64" in wheel or "-none-any" in wheel), wheel


ROOT = Path(__file__).resolve().parents[1]


def _sdist(tmp_path):
    out = tmp_path / "dist"
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (tar,) = out.glob("edgefed-*.tar.gz")
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "src", filter="data")
    (src,) = (tmp_path / "src").iterdir()
    return src


@pytest.mark.skipif(not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64", "cmake")),
                    reason="needs cmake, g++-aarch64-linux-gnu and qemu-user (CI installs them)")
def test_the_sdist_builds_the_kernels_for_aarch64_and_they_pass_the_vectors(tmp_path):
    """What a Pi without a matching wheel gets: the sdist carries the kernels' sources, CMake
    and the test vectors; its C++ cross-built for aarch64 passes the vectors under qemu."""
    src = _sdist(tmp_path)
    for need in ("CMakeLists.txt", "csrc/dispatch.cpp", "csrc/kernels.cpp", "csrc/hd.hpp", "csrc/cuda/seeded.cu",
                 "csrc/cuda/seeded_blocks.hpp", "tests/vectors/perturbation.txt",
                 "device_configs/raspberry-pi-4-4gb.yaml"):
        assert (src / need).is_file(), f"the sdist lacks {need}"
    build = tmp_path / "arm"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DEDGEFED_PYTHON=OFF", "-DCMAKE_BUILD_TYPE=Release",
                    "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                    "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", "-DCMAKE_EXE_LINKER_FLAGS=-static"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "test_vectors", "-j2"], check=True, capture_output=True)
    r = subprocess.run(["qemu-aarch64", str(build / "test_vectors"), str(src / "tests/vectors/perturbation.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "0 failed" in r.stdout, r.stdout + r.stderr
    assert "simd neon:" in r.stdout, r.stdout  # the aarch64 binary's one path, checked
