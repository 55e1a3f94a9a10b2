"""Emulated devices for hardware-in-the-loop runs on one machine: the real `edgefed device`
process, pinned to a few cores, capped in memory, and reaching the broker through a link
that adds latency, jitter and a bandwidth cap and can be cut (a network partition).

What it emulates and how:
- CPU: `taskset` pins the process to N cores (a Pi 4 has 4 slow ones; use 1 to stretch a round).
- memory: a cgroup v1 memory limit when /sys/fs/cgroup/memory is writable (the kernel's OOM
  killer then ends the process as on a real board), else RLIMIT_AS (address space: stricter);
  `DeviceProcess.memory_mode` says which.
- network: `LinkProxy`, a TCP relay in front of the broker. TCP carries MQTT, so packet loss
  shows up to the application as delay and stalls, which a relay reproduces: every chunk waits
  `delay_ms` +- `jitter_ms` (order kept) and a token bucket caps the rate; `cut(s)` drops every
  connection and refuses new ones for s seconds. (Kernel netem is the usual tool; this machine's
  kernel lacks it, and a relay needs no root.)

Host side (tests, benchmarks); devices under test run the unmodified CLI.
"""
from __future__ import annotations

import os
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["LinkProfile", "LinkProxy", "DeviceProfile", "DeviceProcess", "PROFILES"]


@dataclass(frozen=True)
class LinkProfile:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_kbps: float = 0.0  # 0: unlimited (kilobits per second, each direction)


@dataclass(frozen=True)
class DeviceProfile:
    """A device class to emulate: its config (device_configs/), cores, memory cap and link."""
    config: str
    cores: int = 1
    memory_mb: int = 0  # 0: no cap
    link: LinkProfile = field(default_factory=LinkProfile)


# Rough shapes of real links (home Wi-Fi to a Pi, LTE to a Jetson in the field, a LAN host).
PROFILES = {
    "pi-wifi": DeviceProfile("raspberry-pi-4-4gb", cores=1, memory_mb=1024,
                             link=LinkProfile(delay_ms=20, jitter_ms=10, rate_kbps=8000)),
    "jetson-lte": DeviceProfile("jetson-orin-nano-8gb", cores=1, memory_mb=2048,
                                link=LinkProfile(delay_ms=60, jitter_ms=30, rate_kbps=4000)),
    "lan-host": DeviceProfile("x86-sim", cores=1, memory_mb=0, link=LinkProfile()),
}


class _Pipe(threading.Thread):
    """One direction of one connection: read, hold each chunk until its due time, write."""

    def __init__(self, src: socket.socket, dst: socket.socket, link: LinkProfile, rng: random.Random,
                 closed: threading.Event):
        super().__init__(daemon=True)
        self.src, self.dst, self.link, self.rng, self.closed = src, dst, link, rng, closed
        self.queue: deque = deque()
        self.cv = threading.Condition()
        self.next_free = 0.0  # when the rate-limited link is free again

    def _due(self, n: int) -> float:
        now = time.monotonic()
        lat = max(0.0, self.link.delay_ms + self.rng.uniform(-1, 1) * self.link.jitter_ms) / 1e3
        t = now + lat
        if self.link.rate_kbps > 0:
            start = max(now, self.next_free)
            self.next_free = start + n * 8 / (self.link.rate_kbps * 1e3)
            t = max(t, self.next_free + lat)
        if self.queue:
            t = max(t, self.queue[-1][0])  # a stream keeps its order
        return t

    def run(self) -> None:
        writer = threading.Thread(target=self._write, daemon=True)
        writer.start()
        try:
            while not self.closed.is_set():
                r, _, _ = select.select([self.src], [], [], 0.2)
                if not r:
                    continue
                data = self.src.recv(65536)
                if not data:
                    break
                with self.cv:
                    self.queue.append((self._due(len(data)), data))
                    self.cv.notify()
        except OSError:
            pass
        finally:
            self.closed.set()
            with self.cv:
                self.cv.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.queue and not self.closed.is_set():
                        self.cv.wait(0.2)
                    if not self.queue:
                        return
                    due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                    if self.closed.is_set():
                        return
                with self.cv:
                    self.queue.popleft()
                self.dst.sendall(data)
        except OSError:
            self.closed.set()


class LinkProxy:
    """A TCP relay 127.0.0.1:port -> target with the link's latency, jitter and rate."""

    def __init__(self, target_host: str, target_port: int, link: LinkProfile = LinkProfile(), seed: int = 0):
        self.target = (target_host, int(target_port))
        self.link = link
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._conns: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.settimeout(0.2)
                client, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            if time.monotonic() < self._down_until:  # partitioned: the device sees a reset
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            closed = threading.Event()
            with self._lock:
                self._conns.append((client, upstream, closed))
            _Pipe(client, upstream, self.link, self.rng, closed).start()
            _Pipe(upstream, client, self.link, self.rng, closed).start()
            threading.Thread(target=self._reap, args=(client, upstream, closed), daemon=True).start()

    def _reap(self, a: socket.socket, b: socket.socket, closed: threading.Event) -> None:
        closed.wait()
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self, seconds: float) -> None:
        """A partition: every open connection dropped, new ones refused for `seconds`."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            conns, self._conns = self._conns, []
        for _, _, closed in conns:
            closed.set()
        self.cuts += 1

    def close(self) -> None:
        self._stop.set()
        self.cut(0)
        self.sock.close()


def _cgroup_dir(name: str) -> Optional[Path]:
    root = Path("/sys/fs/cgroup/memory")
    if not (root.is_dir() and os.access(root, os.W_OK)):
        return None
    d = root / f"edgefed-hil-{name}-{os.getpid()}"
    try:
        d.mkdir(exist_ok=True)
        return d
    except OSError:
        return None


class DeviceProcess:
    """`edgefed device` as an emulated device (see the module docstring)."""

    def __init__(self, name: str, profile: DeviceProfile, broker_host: str, broker_port: int, *,
                 artifact: str | Path, data: str | Path, job: str, workdir: str | Path,
                 extra: Sequence[str] = (), cpus: Optional[Sequence[int]] = None, seed: int = 0):
        self.name, self.profile = name, profile
        self.proxy = LinkProxy(broker_host, broker_port, profile.link, seed=seed)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self.checkpoint = self.workdir / f"{name}.bin"
        argv = [sys.executable, "-m", "edgefed.cli", "device", "--config", profile.config,
                "--broker", self.proxy.url, "--data", str(data), "--artifact", str(artifact), "--job", job,
                "--device-id", name, "--threads", str(profile.cores), "--checkpoint", str(self.checkpoint),
                *extra]
        n = os.cpu_count() or 1
        cpus = list(cpus) if cpus is not None else [(seed + i) % n for i in range(profile.cores)]
        if shutil.which("taskset"):
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        self.cpus = cpus
        self.cgroup = _cgroup_dir(name) if profile.memory_mb else None
        self.memory_mode = ("cgroup" if self.cgroup else "rlimit_as") if profile.memory_mb else "none"
        if self.cgroup is not None:
            (self.cgroup / "memory.limit_in_bytes").write_text(str(profile.memory_mb << 20))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=self._limit)

    def _limit(self) -> None:  # in the child, before exec
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        elif self.profile.memory_mb:
            cap = (self.profile.memory_mb + 1024) << 20  # address space runs ahead of RSS (thread arenas)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"device {self.name} did not finish in {timeout} s:\n{self.log()[-3000:]}") from None

    def oom_killed(self) -> bool:
        return self.proc.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        self.proxy.close()
        if self.cgroup is not None:
            try:
                self.cgroup.rmdir()
            except OSError:
                pass
