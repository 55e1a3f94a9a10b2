"""The device extra installs on the fleet's devices: for aarch64 (Raspberry Pi OS 64-bit,
JetPack 6) on CPython 3.10-3.12 it resolves to wheels only (manylinux2014 / manylinux_2_28), and
nothing of it pulls in torch, transformers or peft. Resolved against PyPI with pip's dry run."""
import importlib.metadata
import json
import subprocess
import sys

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
