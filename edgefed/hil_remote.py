"""Hardware in the loop on real boards: devices named in an inventory file, reached over ssh
(paramiko), each running the unmodified `edgefed device` against a broker they can reach.

Inventory (YAML):

    broker: mqtt://192.168.1.10:1883        # as the devices reach it (the server side runs here)
    devices:
      - name: pi4-kitchen                   # the device id in the job
        host: 192.168.1.21
        user: pi
        key: ~/.ssh/id_ed25519              # optional; else the ssh agent / default keys
        port: 22                            # optional
        config: raspberry-pi-4-4gb          # its device class (device_configs/)
        python: /home/pi/edgefed/bin/python # an environment with edgefed[device] installed
        workdir: /home/pi/edgefed-hil       # optional

For each device the runner uploads the artifact (skipped when the device already holds one
with the same manifest) and its data shard over SFTP, starts the device, waits for it, and
brings back its log, its final checkpoint (raw float32 + sidecar) and its throughput and
peak memory, which `pytest -m hil` compares with the server's global model and the device
class's budget. Host side only; paramiko is the `hil` extra.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["InventoryDevice", "Inventory", "RemoteDevice", "RemoteResult", "load_inventory"]


@dataclass(frozen=True)
class InventoryDevice:
    name: str
    host: str
    user: str
    config: str
    python: str
    port: int = 22
    key: Optional[str] = None
    workdir: str = "edgefed-hil"


@dataclass(frozen=True)
class Inventory:
    broker: Optional[str]
    devices: tuple[InventoryDevice, ...]


def load_inventory(path: str | os.PathLike) -> Inventory:
    """Read and check an inventory file; ValueError names the entry and field that is wrong."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    devs = raw.get("devices")
    if not isinstance(devs, list) or not devs:
        raise ValueError(f"{path}: 'devices' must be a non-empty list of entries (name, host, user, config, python)")
    out = []
    for i, d in enumerate(devs):
        if not isinstance(d, dict):
            raise ValueError(f"{path}: devices[{i}] must be a mapping")
        missing = [k for k in ("name", "host", "user", "config", "python") if not d.get(k)]
        if missing:
            raise ValueError(f"{path}: devices[{i}] ({d.get('name', '?')}) lacks {', '.join(missing)}")
        unknown = set(d) - set(InventoryDevice.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: devices[{i}] has unknown fields {sorted(unknown)}")
        out.append(InventoryDevice(**{**d, "port": int(d.get("port", 22))}))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: device names repeat: {names}")
    return Inventory(raw.get("broker"), tuple(out))


@dataclass
class RemoteResult:
    name: str
    exit_code: int
    seconds: float
    log: str
    checkpoint: Optional[Path]
    peak_rss_mb: Optional[float] = None
    rounds: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def rounds_per_minute(self) -> Optional[float]:
        return None if not self.rounds or self.seconds <= 0 else self.rounds / self.seconds * 60


def _manifest_digest(artifact: Path) -> str:
    return hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()


class RemoteDevice:
    """One inventory device running `edgefed device` over ssh (see the module docstring)."""

    def __init__(self, dev: InventoryDevice, *, connect_timeout: float = 15.0):
        import paramiko

        self.dev = dev
        self.client = paramiko.SSHClient()
        self.client.load_system_host_keys()
        # A lab's boards are re-imaged often: their host keys are accepted on first use and
        # reported, not silently trusted forever (load_system_host_keys still pins known ones).
        self.client.set_missing_host_key_policy(paramiko.WarningPolicy())
        self.client.connect(dev.host, port=dev.port, username=dev.user,
                            key_filename=os.path.expanduser(dev.key) if dev.key else None, timeout=connect_timeout)
        self.sftp = self.client.open_sftp()
        self.home = self._run("pwd")[1].strip()
        self.workdir = dev.workdir if dev.workdir.startswith("/") else f"{self.home}/{dev.workdir}"
        self._run(f"mkdir -p {shlex.quote(self.workdir)}")
        self._thread: Optional[threading.Thread] = None
        self.result: Optional[RemoteResult] = None

    def _run(self, cmd: str, timeout: Optional[float] = 120.0) -> tuple[int, str, str]:
        _, out, err = self.client.exec_command(cmd, timeout=timeout)
        o, e = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        return out.channel.recv_exit_status(), o, e

    def _put_tree(self, local: Path, remote: str) -> None:
        self._run(f"mkdir -p {shlex.quote(remote)}")
        for p in sorted(local.iterdir()):
            if p.is_file():
                self.sftp.put(str(p), f"{remote}/{p.name}")

    def upload(self, artifact: str | os.PathLike, data: str | os.PathLike) -> tuple[str, str]:
        """(remote artifact dir, remote data file); the artifact is sent once per manifest."""
        art = Path(artifact)
        digest = _manifest_digest(art)
        remote_art = f"{self.workdir}/artifact-{digest[:12]}"
        code, _, _ = self._run(f"test -f {shlex.quote(remote_art)}/manifest.json")
        if code != 0:
            self._put_tree(art, remote_art + ".partial")
            self._run(f"rm -rf {shlex.quote(remote_art)} && mv {shlex.quote(remote_art + '.partial')} "
                      f"{shlex.quote(remote_art)}")
        remote_data = f"{self.workdir}/{self.dev.name}-{Path(data).name}"
        self.sftp.put(str(data), remote_data)
        return remote_art, remote_data

    def start(self, broker_url: str, job: str, artifact: str | os.PathLike, data: str | os.PathLike,
              extra: tuple[str, ...] = ()) -> None:
        remote_art, remote_data = self.upload(artifact, data)
        ckpt = f"{self.workdir}/{self.dev.name}.bin"
        argv = [self.dev.python, "-m", "edgefed.cli", "device", "--config", self.dev.config, "--broker", broker_url,
                "--data", remote_data, "--artifact", remote_art, "--job", job, "--device-id", self.dev.name,
                "--checkpoint", ckpt, *extra]
        cmd = " ".join(shlex.quote(a) for a in argv) + " 2>&1"
        self._thread = threading.Thread(target=self._wait, args=(cmd, ckpt), daemon=True)
        self._thread.start()

    def _wait(self, cmd: str, ckpt: str) -> None:
        t0 = time.monotonic()
        _, out, _ = self.client.exec_command(cmd, get_pty=False)
        log = out.read().decode(errors="replace")
        code = out.channel.recv_exit_status()
        seconds = time.monotonic() - t0
        local = None
        try:
            local = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgefed-hil-{self.dev.name}-{os.getpid()}.bin"
            self.sftp.get(ckpt, str(local))
            self.sftp.get(ckpt + ".json", str(local) + ".json")
        except OSError:
            local = None
        rss = re.search(r"peak RSS (\d+) MB", log)
        rounds = re.search(r": (\d+) rounds, \d+ accepted", log)
        self.result = RemoteResult(self.dev.name, code, seconds, log, local,
                                   float(rss.group(1)) if rss else None, int(rounds.group(1)) if rounds else None)

    def wait(self, timeout: float) -> RemoteResult:
        assert self._thread is not None, "start() first"
        self._thread.join(timeout)
        if self.result is None:
            raise TimeoutError(f"{self.dev.name} ({self.dev.host}) did not finish in {timeout:.0f} s")
        return self.result

    def close(self) -> None:
        try:
            self.sftp.close()
        finally:
            self.client.close()
