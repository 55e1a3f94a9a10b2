"""`edgefed doctor`: each check finds what is there and says how to fix what is not."""
import subprocess
import sys

from edgefed.doctor import run_checks
from edgefed.transport import start_broker


def _by_name(checks):
    return {c.name: c for c in checks}


def test_a_ready_device_passes(tiny_artifacts):
    broker = start_broker(prefer="embedded")
    try:
        c = _by_name(run_checks("x86-sim", str(tiny_artifacts["lora"]), broker.url))
    finally:
        broker.stop()
    assert c["python"].ok and c["device config"].ok and c["kernels"].ok and "bit-exact" in c["kernels"].found
    assert c["memory"].ok and "needs ~" in c["memory"].found
    assert c["broker"].ok and "connected" in c["broker"].found and c["broker"].warn  # plain mqtt:// warns


def test_problems_come_with_their_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFED_KERNELS", "numpy")
    c = _by_name(run_checks("no-such-device", str(tmp_path), "mqtt://127.0.0.1:9"))
    assert not c["device config"].ok and "device_configs" in c["device config"].fix
    assert not c["artifact"].ok and "manifest.json" in c["artifact"].found
    assert not c["kernels"].ok and "EDGEFED_KERNELS=numpy" in c["kernels"].found
    assert not c["broker"].ok and "edgefed certs" in c["broker"].fix


def test_cli_exit_code_says_ready_or_not():
    bad = subprocess.run([sys.executable, "-m", "edgefed.cli", "doctor", "--broker", "mqtt://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAIL  broker" in bad.stdout and "fix:" in bad.stdout
    ok = subprocess.run([sys.executable, "-m", "edgefed.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ready")


def test_the_kernels_say_which_simd_path_they_were_built_for():
    from edgefed import kernels
    path = kernels.simd_path()
    assert path.split("+")[0] in ("avx512f", "avx2", "sse2", "neon", "scalar", "numpy")
    c = _by_name(run_checks())
    assert f"SIMD {path}" in c["kernels"].found
    if path.endswith("+native"):  # tuned for this CPU: doctor says not to copy the wheel around
        assert c["kernels"].warn and "EDGEFED_NATIVE=0" in c["kernels"].fix
