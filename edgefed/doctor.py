"""`edgefed doctor`: is this machine ready to be a device? Each check prints what it found;
each problem comes with its fix. Exit code 1 when a check failed. Device side: no torch.

    edgefed doctor [--config raspberry-pi-5-8gb] [--artifact DIR] [--broker mqtts://...]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["add_doctor_args", "run_doctor", "Check", "run_checks"]


@dataclass
class Check:
    name: str
    ok: bool
    found: str
    fix: str = ""
    warn: bool = False   # worth knowing, not a failure


def _python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", ok, f"{platform.python_implementation()} {platform.python_version()}",
                 "" if ok else "EdgeFed needs Python 3.10 or newer (Raspberry Pi OS 12 and JetPack 6 ship it)")


def _onnxruntime(cfg) -> Check:
    try:
        import onnxruntime as ort
    except ImportError:
        return Check("onnxruntime", False, "not installed", 'pip install "onnxruntime>=1.16" (Jetson: the '
                     "onnxruntime-gpu wheel for your JetPack from the Jetson AI Lab index)")
    have = ort.get_available_providers()
    want = [p for p in (cfg.execution_providers if cfg else ()) if p != "CPUExecutionProvider"]
    missing = [p for p in want if p not in have]
    found = f"{ort.__version__}, providers {', '.join(have)}"
    if missing:
        return Check("onnxruntime", True, found, f"the device config asks for {', '.join(missing)}, which this "
                     "onnxruntime build lacks: CPU will be used; install the onnxruntime-gpu build with them",
                     warn=True)
    return Check("onnxruntime", True, found)


def _kernels() -> Check:
    from . import kernels
    b = kernels.backend()
    runnable = [p for p, ok in kernels.simd_paths() if ok]
    found = (f"{b} backend, SIMD {kernels.simd_path()} (runnable here: {', '.join(runnable) or '-'}), "
             f"{kernels.get_num_threads()} threads, {platform.machine()}")
    if b != "cpp":
        why = ("EDGEFED_KERNELS=numpy is set" if os.environ.get("EDGEFED_KERNELS") == "numpy"
               else "the compiled extension did not load")
        return Check("kernels", False, found + f" ({why})", "reinstall from source on this machine "
                     "(`pip install ./edgefed[device]` with cmake and g++ present) so the C++ kernels build; "
                     "the numpy fallback is exact but far slower (benchmarks/kernel_speed.py measures it)")
    import numpy as np

    from . import rng
    active = kernels.simd_path().split("+")[0]
    try:
        for path in runnable or [active]:  # every path this CPU may use must match the numpy spec bit for bit
            if runnable:
                kernels.set_simd_path(path)
            for dist in ("normal", "rademacher"):
                got = np.empty(65_537, np.float32)
                kernels.fill(got, 12345, dist)
                ref = rng.generate(12345, got.size, dist, 0, 0).astype(np.float32)
                if not np.array_equal(ref.view(np.uint32), got.view(np.uint32)):
                    return Check("kernels", False, found + f" ({dist} output of the {path} path differs from the "
                                 "numpy reference)", "this build is not bit-exact: rebuild with EDGEFED_NATIVE=0 "
                                 "(no -march=native) and without -ffast-math; devices would drift from each other")
    finally:
        if runnable:
            kernels.set_simd_path(active)
    if kernels.simd_path().endswith("+native"):
        return Check("kernels", True, found + ", bit-exact against the numpy reference",
                     "built with -march=native: a wheel of this build runs only on CPUs like this one; "
                     "build with EDGEFED_NATIVE=0 to copy it across a fleet", warn=True)
    return Check("kernels", True, found + ", bit-exact against the numpy reference")


def _memory(cfg, artifact) -> Check:
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        return Check("memory", True, "unknown (no /proc/meminfo)", warn=True)
    found = f"{avail / 2**20:,.0f} MB available"
    need = None
    if artifact:
        from .runtime import estimate_memory
        bs, sl = (cfg.batch_size, cfg.seq_len) if cfg else (8, 64)
        need = estimate_memory(artifact, bs, sl)["total"]
        found += f"; training {Path(artifact).name} at batch {bs} x {sl} needs ~{need / 2**20:,.0f} MB"
    budget = cfg.memory_budget_mb * 2**20 if cfg else None
    if budget is not None:
        found += f"; device budget {cfg.memory_budget_mb:,} MB"
    if need is not None and need > min(avail, budget or avail):
        return Check("memory", False, found, "use a smaller --batch-size / --seq-len, a LoRA or prompt artifact "
                     "instead of full, an int8 artifact (`edgefed export --quantize`), or close other programs")
    if budget is not None and budget > avail:
        return Check("memory", True, found, "less memory is free than the device config's budget: other programs "
                     "are using it", warn=True)
    return Check("memory", True, found)


def _broker(url) -> Check:
    if not url:
        return Check("broker", True, "not checked (give --broker)", warn=True)
    from .transport import make_transport
    from .transport.base import TransportError
    t0 = time.monotonic()
    try:
        t = make_transport(url, client_id=f"edgefed-doctor-{os.getpid()}")
        t.connect(timeout=10)
        t.close()
    except (TransportError, OSError, ValueError) as e:
        return Check("broker", False, str(e), "check the host and port, that the broker runs, and for mqtts:// "
                     "the CA, client certificate and password (`edgefed certs` prints the exact URL)")
    tls = " over TLS" if url.startswith("mqtts://") else " (no TLS: anyone on the path can read the job)"
    return Check("broker", True, f"connected in {1000 * (time.monotonic() - t0):.0f} ms{tls}",
                 warn=not url.startswith("mqtts://"))


def _clock() -> Check:
    """Rounds have deadlines in wall-clock time: an unsynchronised clock misjudges them."""
    try:
        out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out == "yes":
        return Check("clock", True, "synchronised (NTP)")
    if out == "no":
        return Check("clock", False, "not synchronised", "enable time sync: `sudo timedatectl set-ntp true` "
                     "(a Raspberry Pi has no battery-backed clock: without NTP it restarts in the past)")
    return Check("clock", True, "sync state unknown (no timedatectl)", "make sure NTP runs", warn=True)


def _torch_free() -> Check:
    import importlib.util
    has = importlib.util.find_spec("torch") is not None
    return Check("torch", True, "installed (hosts only; devices never import it)" if has else "not installed (as on a device)")


def run_checks(config=None, artifact=None, broker=None) -> list[Check]:
    cfg = None
    checks = [_python()]
    if config:
        from .device_config import load_device_config
        try:
            cfg = load_device_config(config)
            checks.append(Check("device config", True, f"{cfg.name}: {cfg.threads} threads, budget "
                                f"{cfg.memory_budget_mb} MB, batch {cfg.batch_size} x {cfg.seq_len}"))
        except (OSError, ValueError) as e:
            checks.append(Check("device config", False, str(e), "pick a name from device_configs/ or give a YAML path"))
    if artifact and not (Path(artifact) / "manifest.json").is_file():
        checks.append(Check("artifact", False, f"{artifact} has no manifest.json",
                            "copy the whole artifact folder from the host that ran `edgefed export`"))
        artifact = None
    checks += [_onnxruntime(cfg), _kernels(), _memory(cfg, artifact), _broker(broker), _clock(), _torch_free()]
    return checks


def add_doctor_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default=None, help="device class (device_configs/) or YAML")
    p.add_argument("--artifact", default=None, help="the artifact this device will train")
    p.add_argument("--broker", default=None, help="mqtt[s]://... to test reachability (and TLS)")
    return p


def run_doctor(args) -> int:
    checks = run_checks(args.config, args.artifact, args.broker)
    w = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok and not c.warn else "warn" if c.ok else "FAIL"
        print(f"{mark}  {c.name:<{w}}  {c.found}")
        if c.fix and (not c.ok or c.warn):
            print(f"      {'':<{w}}  fix: {c.fix}")
    bad = [c.name for c in checks if not c.ok]
    print("\n" + (f"{len(bad)} problem(s): {', '.join(bad)}" if bad else "ready"))
    return 1 if bad else 0
