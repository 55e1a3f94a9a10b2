"""Hardware in the loop, emulated (`pytest -m hil`; edgefed/hil.py): the real server CLI and
real `edgefed device` processes, each pinned to one core, capped in memory (cgroup or
RLIMIT_AS) and reaching the broker through a link with a Wi-Fi / LTE shape (latency, jitter,
rate cap). One device is cut off mid-job (a partition) and must rejoin, resync and end on the
global model; a device whose memory cap is far below the model is killed by it, and the job
goes on without it. Every surviving replica ends bit-identical to the server's global model."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes, write_jsonl
from edgefed.hil import PROFILES, DeviceProcess, DeviceProfile, LinkProfile

pytestmark = pytest.mark.hil
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch")
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    root = tmp_path_factory.mktemp("hil")
    model, tok = load_model(tiny_random_model(root / "model", seed=0))
    return export_artifact(model, root / "lora", "lora:r=2,targets=q_proj,v_proj",
                           "classify:labels=positive,negative", tokenizer=tok, progress=False)


def _server(tmp: Path, url: str, art: Path, job: str, rounds: int, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "edgefed.cli", "server", "--job", job, "--method", "fedkseed",
            "--artifact", str(art), "--broker", url, "--db", str(tmp / "server.db"), "--rounds", str(rounds),
            "--k", "256", "--local-steps", "3", "--batch-size", "4", "--lr", "0.01",
            "--min-devices", "1", "--devices-per-round", str(n), "--round-timeout", "20", "--linger", "15", "--quiet"]
    return subprocess.Popen(argv, stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT, env=env)


def test_emulated_fleet_survives_a_partition_and_an_oom_kill(artifact, tmp_path):
    from edgefed.transport.broker import start_broker

    broker = start_broker()
    shards = iid_split(list(load_rotten_tomatoes()[:180]), 3)
    files = [write_jsonl(tmp_path / f"d{i}.jsonl", s) for i, s in enumerate(shards)]
    job, rounds = "hil", 6
    server = _server(tmp_path, broker.url, artifact, job, rounds, 2)
    tiny = DeviceProfile("raspberry-pi-4-4gb", cores=1, memory_mb=40)  # far below Python + ORT: killed
    devs = []
    try:
        devs = [DeviceProcess("pi", PROFILES["pi-wifi"], broker.host, broker.port, artifact=artifact, data=files[0],
                              job=job, workdir=tmp_path, seed=0),
                DeviceProcess("jetson", PROFILES["jetson-lte"], broker.host, broker.port, artifact=artifact,
                              data=files[1], job=job, workdir=tmp_path, seed=1),
                DeviceProcess("starved", tiny, broker.host, broker.port, artifact=artifact, data=files[2],
                              job=job, workdir=tmp_path, seed=2)]
        # partition the Pi for a few seconds once the job is under way
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and b"round 1" not in (tmp_path / "pi.log").read_bytes():
            time.sleep(0.2)
        devs[0].proxy.cut(4.0)
        for d in devs[:2]:
            assert d.wait(240) == 0, d.log()[-3000:]
        assert server.wait(60) == 0, (tmp_path / "server.log").read_text()[-3000:]
        starved = devs[2]
        starved.wait(30)
        assert starved.proc.returncode != 0, "a device far over its memory cap did not stop"
        if starved.memory_mode == "cgroup":
            assert starved.oom_killed(), f"exit {starved.proc.returncode}: {starved.log()[-1000:]}"
        assert devs[0].proxy.cuts >= 1
        assert "reconnect" in devs[0].log().lower() or "connection" in devs[0].log().lower(), devs[0].log()[-2000:]
    finally:
        for d in devs:
            d.close()
        if server.poll() is None:
            server.kill()
        broker.stop()
    from edgefed.export.results import trainables_from_store, trainables_from_checkpoint

    glob, info = trainables_from_store(tmp_path / "server.db", job)
    assert info["rounds"] == rounds
    for d in devs[:2]:
        mine, _ = trainables_from_checkpoint(d.checkpoint, artifact)
        np.testing.assert_array_equal(mine, glob)
    assert not np.array_equal(glob, trainables_from_checkpoint(devs[0].checkpoint, artifact)[0] * 0)


def test_link_proxy_adds_the_profiles_latency_and_rate():
    """The relay itself: round trips take the configured delay each way, and a 64 KiB burst
    takes the time the rate cap says."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def echo():
        c, _ = srv.accept()
        while True:
            data = c.recv(65536)
            if not data:
                return
            c.sendall(data)
    threading.Thread(target=echo, daemon=True).start()
    from edgefed.hil import LinkProxy
    proxy = LinkProxy("127.0.0.1", srv.getsockname()[1], LinkProfile(delay_ms=50, rate_kbps=2000))
    s = socket.create_connection(("127.0.0.1", proxy.port))
    t = time.monotonic()
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    rtt = time.monotonic() - t
    assert 0.09 < rtt < 0.5, rtt  # 50 ms each way
    blob = os.urandom(64 << 10)
    t = time.monotonic()
    s.sendall(blob)
    got = b""
    while len(got) < len(blob):
        got += s.recv(65536)
    took = time.monotonic() - t
    assert got == blob
    assert took > 2 * (64 << 10) * 8 / 2e6 * 0.8, took  # rate-capped both ways: >= ~0.5 s
    proxy.cut(1.0)
    with pytest.raises(OSError):
        s.sendall(b"y" * 10)
        s.recv(1) or (_ for _ in ()).throw(ConnectionResetError())
    proxy.close()


# ------------------------------------------------------------------ boards from an inventory, over ssh

@pytest.fixture
def inventory(tmp_path):
    """EDGEFED_HIL_INVENTORY (real boards) if set; else two 'boards' on this machine behind a
    real sshd on a free port (root and openssh-server needed), so the ssh path itself runs."""
    import shutil
    import socket

    pytest.importorskip("paramiko")
    from edgefed.hil_remote import load_inventory

    if os.environ.get("EDGEFED_HIL_INVENTORY"):
        yield load_inventory(os.environ["EDGEFED_HIL_INVENTORY"]), None
        return
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None or os.geteuid() != 0 or not shutil.which("ssh-keygen"):
        pytest.skip("no EDGEFED_HIL_INVENTORY, and no sshd to stand in for boards here (needs root + openssh-server)")
    d = tmp_path / "ssh"
    d.mkdir()
    for k in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / k)], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'client.pub'}\n"
        f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\nSetEnv PYTHONPATH={ROOT}\nSubsystem sftp internal-sftp\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "wb"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    inv = tmp_path / "inventory.yaml"
    inv.write_text("devices:\n" + "".join(
        f"  - {{name: {n}, host: 127.0.0.1, port: {port}, user: root, key: {d / 'client'}, config: {c}, "
        f"python: {sys.executable}, workdir: {tmp_path / ('board-' + n)}}}\n"
        for n, c in (("board-a", "raspberry-pi-4-4gb"), ("board-b", "x86-sim"))))
    try:
        yield load_inventory(inv), proc
    finally:
        proc.terminate()
        proc.wait(5)


def test_inventory_boards_train_a_job_over_ssh(artifact, inventory, tmp_path):
    """The inventory's devices get the artifact and their data over SFTP, run `edgefed device`
    over ssh, and come back with checkpoints equal to the server's global model, peak memory
    within their class's budget, and their throughput."""
    from edgefed.device_config import load_device_config
    from edgefed.export.results import trainables_from_checkpoint, trainables_from_store
    from edgefed.hil_remote import RemoteDevice
    from edgefed.transport.broker import start_broker

    inv, _ = inventory
    broker = start_broker(inv.broker) if inv.broker else start_broker()
    n = len(inv.devices)
    shards = iid_split(list(load_rotten_tomatoes()[:60 * n]), n)
    files = [write_jsonl(tmp_path / f"shard{i}.jsonl", s) for i, s in enumerate(shards)]
    job, rounds = "hil-ssh", 3
    server = _server(tmp_path, broker.url, artifact, job, rounds, n)
    remotes = []
    try:
        remotes = [RemoteDevice(d) for d in inv.devices]
        for r, f in zip(remotes, files):
            r.start(broker.url, job, artifact, f)
        results = [r.wait(300) for r in remotes]
        assert server.wait(60) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for r in remotes:
            r.close()
        if server.poll() is None:
            server.kill()
        if not inv.broker:
            broker.stop()
    glob, info = trainables_from_store(tmp_path / "server.db", job)
    assert info["rounds"] == rounds
    for dev, res in zip(inv.devices, results):
        assert res.exit_code == 0, res.log[-3000:]
        np.testing.assert_array_equal(trainables_from_checkpoint(res.checkpoint, artifact)[0], glob)
        budget = load_device_config(dev.config).memory_budget_mb
        assert res.peak_rss_mb is not None and res.peak_rss_mb <= budget, (res.peak_rss_mb, budget)
        assert res.rounds == rounds and res.rounds_per_minute > 0
        print(f"{dev.name} ({dev.config}): {res.rounds_per_minute:.1f} rounds/min, peak RSS {res.peak_rss_mb:.0f} MB "
              f"of {budget} MB")
