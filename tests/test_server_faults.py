"""Fault tests of the aggregation server over a real Mosquitto broker, with the server as a
subprocess (`python -m edgefed_server.cli`) and scripted devices on their own MQTT clients:
bad input, SIGKILL + --resume, and a device that goes silent mid-job."""
from __future__ import annotations

import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgefed.methods.fedkseed import SCALARS, seed_tensors
from edgefed.protocol import (AckStatus, MessageIds, RoundPlan, Status, Topics, Update, decode)
from edgefed.transport.broker import find_mosquitto, start_broker
from edgefed.transport.mqtt import MqttTransport
from helpers import wait_until as wait_for

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(find_mosquitto() is None,
                                 reason="mosquitto binary not found (apt-get install mosquitto); CI installs it")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broker():
    h = start_broker(prefer="mosquitto")
    yield h
    h.stop()


class ServerProc:
    """The server CLI in a subprocess; stdout/stderr go to files the test reads."""

    def __init__(self, tmp: Path, url: str, job: str, *extra: str, tag: str = "run"):
        self.out = tmp / f"server-{tag}.out"
        self.err = tmp / f"server-{tag}.err"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        argv = [sys.executable, "-m", "edgefed_server.cli", "--job", job, "--broker", url,
                "--db", str(tmp / "server.db"), "--method", "fedkseed", "--k", "256",
                "--local-steps", "8", "--lr", "0.01", "--linger", "0", *extra]
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env)

    def log(self) -> str:
        return self.err.read_text(errors="replace") + self.out.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"server did not finish within {timeout} s:\n{self.log()[-4000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


class Device:
    """A scripted device on its own MQTT client: Status (retained, will offline), waits for the
    plan, answers each new round with a real fedkseed Update, re-sends the same update (same
    msg_id) until acked. `silent_from` = first round it never answers (stays online)."""

    def __init__(self, url: str, job: str, name: str, *, jitter: float = 0.0,
                 silent_from: int | None = None, ack_timeout: float = 1.0):
        self.job, self.name, self.jitter, self.silent_from = job, name, jitter, silent_from
        self.ack_timeout = ack_timeout
        self.topics = Topics(job)
        self.t = MqttTransport(url, f"dev-{name}-{uuid.uuid4().hex[:6]}")
        self.t.set_will(self.topics.status(name), self._status("offline"), retain=True)
        self.ids = MessageIds()
        self.plans: "queue.Queue" = queue.Queue()
        self.rounds_seen: list[int] = []
        self.latest_round = -1
        self.acks: list = []
        self.sent: dict = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done = threading.Event()
        self._ack_event = threading.Event()
        self.rng = np.random.default_rng(abs(hash(name)) % (2 ** 32))
        self.thread = threading.Thread(target=self._work, daemon=True)

    def _status(self, state: str) -> bytes:
        return Status(job=self.job, device=self.name, state=state, device_class="x86-sim",
                      timestamp=time.time()).encode()

    def start(self) -> "Device":
        self.t.connect()
        self.t.subscribe(self.topics.ack(self.name), self._on_ack)
        self.t.subscribe(self.topics.state(), self._on_state)
        self.t.publish(self.topics.status(self.name), self._status("online"), retain=True)
        self.t.subscribe(self.topics.plan(), self._on_plan)
        self.thread.start()
        return self

    def _on_plan(self, topic, payload):
        if payload:
            self.latest_round = max(self.latest_round, decode(payload).round)
            self.plans.put(payload)

    def _on_state(self, topic, payload):
        if payload and decode(payload).params.get("done") == 1:
            self.done.set()

    def _on_ack(self, topic, payload):
        a = decode(payload)
        with self.lock:
            self.acks.append(a)
        self._ack_event.set()

    def acked(self, msg_id):
        with self.lock:
            return [a for a in self.acks if a.msg_id == msg_id]

    def _work(self):
        answered = set()
        while not self.stop.is_set():
            try:
                plan = decode(self.plans.get(timeout=0.1))
            except queue.Empty:
                continue
            assert isinstance(plan, RoundPlan)
            with self.lock:
                self.rounds_seen.append(plan.round)
            if plan.round in answered:
                continue  # a re-published plan of a round we already answered
            if self.silent_from is not None and plan.round >= self.silent_from:
                continue
            answered.add(plan.round)
            time.sleep(self.rng.uniform(0, self.jitter))
            u = Update(job=self.job, round=plan.round, device=self.name, method=plan.method,
                       msg_id=self.ids.next(), num_samples=int(self.rng.integers(4, 16)),
                       tensors=seed_tensors(self.rng.integers(0, int(plan.params["k"]), plan.local_steps),
                                            self.rng.normal(size=plan.local_steps), SCALARS),
                       train_loss=float(self.rng.uniform(0.3, 0.9)))
            payload = u.encode()
            with self.lock:
                self.sent[u.msg_id] = u
            while not self.stop.is_set():  # at-least-once: same bytes until acked
                self._ack_event.clear()
                self.t.publish(self.topics.update(self.name), payload, wait=False)
                end = time.monotonic() + self.ack_timeout
                while time.monotonic() < end and not self.acked(u.msg_id):
                    self._ack_event.wait(0.05)
                if self.acked(u.msg_id) or self.latest_round > u.round:
                    break  # (a re-published plan of the SAME round must not stop the re-sends)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        try:
            self.t.publish(self.topics.status(self.name), self._status("offline"), retain=True, timeout=5)
        except Exception:
            pass
        self.t.close()


def clear_retained(url: str, job: str, names=()):
    t = MqttTransport(url)
    t.connect()
    top = Topics(job)
    for topic in [top.plan(), top.state()] + [top.status(n) for n in names]:
        t.publish(topic, b"", retain=True)
    t.close()


def nan_update(u: Update) -> bytes:
    b = bytearray(u.encode())
    start = len(b) - 4 - 4 - u.tensor(SCALARS).data.size * 4  # the scalars' values | train_loss | crc
    struct.pack_into("<f", b, start + 4, float("nan"))
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])))
    return bytes(b)


# ----------------------------------------------------------------------------- (1) bad input

def test_bad_input_rejected_and_rounds_complete(broker, tmp_path):
    job = f"bad-{uuid.uuid4().hex[:6]}"
    top = Topics(job)
    devs = [Device(broker.url, job, n) for n in ("a", "b")]
    raw = MqttTransport(broker.url)
    raw.connect()
    acks: list = []
    raw.subscribe(top.base + "/ack/+", lambda t, p: acks.append(decode(p)))
    plans: list = []
    raw.subscribe(top.plan(), lambda t, p: plans.append(p))
    srv = ServerProc(tmp_path, broker.url, job, "--rounds", "3", "--min-devices", "2",
                     "--round-timeout", "20")
    try:
        devs[0].silent_from = 0  # a answers only after the bad input went through
        for d in devs:
            d.start()
        wait_for(lambda: plans, 20, "the server's plan")
        good = Update(job=job, round=0, device="a", method="fedkseed", msg_id=1, num_samples=4,
                      tensors=seed_tensors(np.arange(8), np.ones(8), SCALARS))
        v1 = bytearray(good.encode())
        v1[4] = 1  # a device of the protocol v1 edgefed
        ghost = Update(job=job, round=0, device="ghost", method="fedkseed", msg_id=1, num_samples=4,
                       tensors=seed_tensors(np.arange(8), np.ones(8), SCALARS))
        for payload in (b"\x00\x01malformed bytes\xff" * 4, b"EDGF" + bytes(4 * 1024 * 1024 + 1),
                        nan_update(good), bytes(v1)):
            raw.publish(top.update("a"), payload)
        raw.publish(top.update("ghost"), ghost.encode())
        wait_for(lambda: len([a for a in acks if a.status == AckStatus.REJECTED]) >= 5, 20, "5 rejected acks")
        by_dev = {(a.device, a.status) for a in acks}
        assert ("a", AckStatus.REJECTED) in by_dev and ("ghost", AckStatus.REJECTED) in by_dev
        # now a behaves: valid rounds still complete
        devs[0].silent_from = None
        devs[0].plans.put(plans[-1])
        assert srv.wait(40) == 0, srv.log()[-3000:]
        log = srv.log()
        pre = f"rejected {top.update('a')}: "
        for reason in ("not an EdgeFed message", "message is 4194309 bytes; the limit is 4194304",
                       "tensors[1] (scalars) flat index [1] is nan", "protocol version 1 not supported"):
            assert pre + reason in log, reason
        assert f"rejected {top.update('ghost')}: unknown device 'ghost'" in log
        assert "WARNING" in log and "round 2 done (3/3)" in log and "job " + job + " finished" in log
        assert all(d.done.wait(5) for d in devs)
    finally:
        srv.kill()
        for d in devs:
            d.close()
        raw.close()
        clear_retained(broker.url, job, ("a", "b"))


# ----------------------------------------------------------------------------- (2) SIGKILL + resume

def test_sigkill_and_resume_loses_nothing(broker, tmp_path):
    from edgefed_server.replay import compare_states, replay_log
    from edgefed_server.store import Store

    job = f"kill-{uuid.uuid4().hex[:6]}"
    names = ("a", "b", "c")
    devs = [Device(broker.url, job, n, jitter=0.15, ack_timeout=0.7).start() for n in names]
    args = ("--rounds", "6", "--min-devices", "2", "--round-timeout", "30", "--http-port", "0")
    srv = ServerProc(tmp_path, broker.url, job, *args, tag="first")
    srv2 = None
    try:
        # kill mid-round: a plan for round 2 is out and updates are in flight
        wait_for(lambda: any(2 in d.rounds_seen for d in devs), 30, "round 2's plan")
        time.sleep(0.08)
        srv.kill(signal.SIGKILL)
        assert srv.proc.returncode == -signal.SIGKILL
        time.sleep(0.5)  # devices keep re-sending into the broker's queue for the server
        srv2 = ServerProc(tmp_path, broker.url, job, *args, "--resume", tag="second")
        assert srv2.wait(60) == 0, srv2.log()[-3000:]
        assert "resuming job" in srv2.log()
        assert all(d.done.wait(10) for d in devs)
    finally:
        srv.kill()
        if srv2 is not None:
            srv2.kill()
        for d in devs:
            d.close()
        clear_retained(broker.url, job, names)

    store = Store(tmp_path / "server.db")
    try:
        assert store.closed_rounds(job) == list(range(6))
        log = store.update_log(job)
        accepted = [r for r in log if r["accepted"]]
        # every update a device saw ACCEPTED is in the store, accepted, exactly once
        for d in devs:
            for a in d.acks:
                if a.status == AckStatus.ACCEPTED:
                    rows = [r for r in accepted if r["device"] == d.name and r["msg_id"] == a.msg_id]
                    assert len(rows) == 1, (d.name, a.msg_id)
        # one accepted update per device and round, and the rounds' counts agree
        for rnd, m in enumerate(store.round_metrics(job)):
            devs_r = [r["device"] for r in accepted if r["round"] == rnd]
            assert len(devs_r) == len(set(devs_r)) == m["n_updates"] >= 2
        # the stored final state equals a replay of the accepted-update log
        rep = replay_log(store, job)
        rnd, state = store.load_state(job)
        assert rep.rounds == rnd == 6
        assert compare_states(rep.state, state) == []
    finally:
        store.close()


# ----------------------------------------------------------------------------- (3) a silent device

def test_device_stops_mid_round_quorum_closes_at_deadline(broker, tmp_path):
    job = f"quiet-{uuid.uuid4().hex[:6]}"
    names = ("a", "b", "c")
    devs = [Device(broker.url, job, n, silent_from=1 if n == "c" else None).start() for n in names]
    time.sleep(0.3)  # statuses retained before the server starts: target 3
    srv = ServerProc(tmp_path, broker.url, job, "--rounds", "3", "--min-devices", "2",
                     "--round-timeout", "1.5")
    try:
        t0 = time.monotonic()
        assert srv.wait(30) == 0, srv.log()[-3000:]
        took = time.monotonic() - t0
        log = srv.log()
        assert "round 1: deadline reached with 2/3 updates; closing" in log
        assert "round 2: deadline reached with 2/3 updates; closing" in log
        assert 2.5 < took < 20
    finally:
        srv.kill()
        for d in devs:
            d.close()
        clear_retained(broker.url, job, names)
    from edgefed_server.store import Store
    store = Store(tmp_path / "server.db")
    try:
        assert [m["n_updates"] for m in store.round_metrics(job)] == [3, 2, 2]
        assert [m["devices"] for m in store.round_metrics(job)][1:] == [["a", "b"], ["a", "b"]]
    finally:
        store.close()
