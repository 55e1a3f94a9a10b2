"""Resource limits of the aggregation server (issue 9, "bounded everything"): storage quotas for
late/duplicate updates, the bounded inbound queue, the device cap and the round target, log
sanitising and rate limiting, and the HTTP status server's pool, timeouts and Host check.
In-process transport with the real fedkseed strategy; the real HTTP server."""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import time
import urllib.request

import pytest

from edgefed.methods import JobConfig
from edgefed.protocol import AckStatus, Status
from edgefed.transport import InProcBroker
from edgefed_server.engine import ResourceLimits, Server, sanitize
from edgefed_server.http_status import StatusHTTPServer, render_metrics
from edgefed_server.devices import DeviceRegistry
from edgefed_server.inbound import ITEM_OVERHEAD, InboundQueue, Offer, TooLarge
from edgefed_server.store import Store


def _samples(text: str) -> dict:
    """Prometheus exposition -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out

from test_server import FakeClock, Fleet, wait_for


@pytest.fixture
def env(tmp_path):
    made = []

    def make(names=("a", "b"), auto=False, clock=None, rl=None, server_kwargs=None, **cfg):
        broker = InProcBroker()
        cfg = {"rounds": 3, "k": 64, "local_steps": 4, "min_devices": 1, "round_timeout": 30.0, **cfg}
        jc = JobConfig(job="j", method="fedkseed", **cfg)
        st = Store(tmp_path / "j.db")
        fleet = Fleet(broker, "j", names, auto=auto, k=jc.k, steps=jc.local_steps)
        fleet.announce()
        kw = dict(settle=0.02, resource_limits=rl or ResourceLimits())
        if clock is not None:
            kw["clock"] = clock
        kw.update(server_kwargs or {})
        srv = Server(broker.client("server"), st, jc, **kw)
        made.append((srv, st))
        srv.start()
        return srv, fleet, st, broker

    yield make
    for srv, st in made:
        srv.stop()
        st.close()


def fake_status(fleet, name):
    fleet.t.publish(fleet.topics.status(name), Status(job="j", device=name, state="online",
                                                       round=-1, timestamp=time.time()).encode())


# ----------------------------------------------------------------------------- logs

def test_sanitize_escapes_controls_and_truncates():
    s = sanitize("a/b\nINFO forged\r\x1b[31m\u2028\\x" + "z" * 500, 100)
    assert "\n" not in s and "\r" not in s and "\x1b" not in s and "\u2028" not in s
    assert s.startswith("a/b\\nINFO forged\\r\\x1b[31m\\u2028\\\\x")
    assert s.endswith("...(+%d chars)" % (len("a/b\nINFO forged\r\x1b[31m\u2028\\x") + 500 - 100))


def test_forged_topic_logs_one_sanitised_line(env, caplog):
    caplog.set_level(logging.INFO, logger="edgefed.server")
    srv, fleet, store, _ = env()
    forged = "edgefed/v1/j/update/a\n2026-01-01 INFO edgefed.server: round 9 aggregated" + "x" * 5000
    fleet.t.publish(forged, b"junk")
    fleet.t.publish("edgefed/v1/j/status/\x1b[2Jz\nfake", b"junk")
    wait_for(lambda: srv.metrics["rejected"].get("topic") == 2, what="topic rejections")
    lines = [r.getMessage() for r in caplog.records if "rejected edgefed/v1/j/" in r.getMessage()]
    assert len(lines) == 2
    for line in lines:
        assert "\n" not in line and "\x1b" not in line and len(line) < 1000
    assert "update/a\\n2026-01-01 INFO" in lines[0] and "chars)" in lines[0]
    assert not any(r.getMessage().startswith("round 9") for r in caplog.records)


def test_rejection_logs_are_rate_limited(env, caplog):
    caplog.set_level(logging.WARNING, logger="edgefed.server")
    srv, fleet, store, _ = env(rl=ResourceLimits(log_burst=3, log_interval_s=60))
    for _ in range(10):
        fleet.raw("a", b"\x00garbage\xff" * 3)
    wait_for(lambda: srv.metrics["rejected"].get("bad_magic") == 10, what="10 rejections")
    assert sum("not an EdgeFed message" in r.getMessage() for r in caplog.records) == 3
    assert srv.metrics["log_lines_suppressed"] == 7
    wait_for(lambda: len(fleet.acks_of("a")) == 10, what="every rejection still acked")


# ----------------------------------------------------------------------------- devices

def test_device_registry_lists_active_first_and_keeps_first_seen():
    reg = DeviceRegistry(status_devices=2, max_devices=100)
    _, new = reg.record_status("z", "training", 0, "rpi4", now=1.0, text="")
    assert new
    reg.record_status("a", "finished", 0, "", now=2.0, text="")
    reg.record_status("m", "offline", 0, "", now=3.0, text="")
    info, new = reg.record_status("z", "idle", 1, "rpi4", now=9.0, text="ok")
    assert not new and (info["first_seen"], info["last_seen"]) == (1.0, 9.0)
    assert [d["device"] for d in reg.listed()] == ["z", "a"]  # active first, then by id; capped
    assert reg.online() == {"z", "a"} and reg.device_class("z") == "rpi4" and reg.device_class("q") == ""
    reg.prove("ghost", 3, now=10.0)  # an accepted update from a device that never sent a Status
    assert reg.devices["ghost"]["state"] == "unknown" and reg.proven == {"ghost"}
    for i in range(40):  # device-chosen state names: at most 32 buckets, the rest "other"
        reg.record_status(f"s{i}", f"state{i}", 0, "", now=11.0, text="")
    by_state = reg.summary(refused=0)["by_state"]
    assert len(by_state) == 33 and by_state["other"] == 4 + 40 - 32 and sum(by_state.values()) == 44


def test_device_cap_refuses_new_statuses_and_target_counts_proven_only(env, caplog):
    caplog.set_level(logging.WARNING, logger="edgefed.server")
    clock = FakeClock()
    rl = ResourceLimits(max_devices=4, status_devices=3, log_burst=2, log_interval_s=60)
    srv, fleet, store, _ = env(clock=clock, rl=rl, round_timeout=10.0)
    wait_for(lambda: fleet.plans, what="plan")
    for i in range(10):
        fake_status(fleet, f"f{i}")
    wait_for(lambda: srv.metrics["devices_refused"] == 8, what="8 refused")
    assert sorted(srv.devices) == ["a", "b", "f0", "f1"]
    assert srv.metrics["rejected"]["status_device_cap"] == 8
    refusals = [r.getMessage() for r in caplog.records if "refused the Status" in r.getMessage()]
    assert len(refusals) == 2 and "max_devices 4" in refusals[0]
    assert store.devices("j") and len(store.devices("j")) == 4  # nothing stored for the refused
    # an update from a refused device is refused too
    fleet.update("f7", 0)
    wait_for(lambda: fleet.acks_of("f7"), what="f7 ack")
    assert fleet.acks_of("f7")[0].status == AckStatus.REJECTED
    # round 0: nobody proven yet, every registered online device counts (capped at 4)
    assert srv.target() == 4
    fleet.update("a", 0)
    fleet.update("b", 0)
    wait_for(lambda: len(fleet.acks_of("b")) == 1, what="ack b")
    assert srv.round == 0
    clock.t += 11
    srv.poke()
    wait_for(lambda: srv.round == 1, what="round 0 closed at its deadline (quorum)")
    # round 1: only devices with an accepted update count, the never-accepted f0/f1 do not
    assert srv.target() == 2 and sorted(srv.expected) == ["a", "b"]
    fake_status(fleet, "f0")  # a re-announcement does not add it either
    fleet.update("a", 1)
    fleet.update("b", 1)
    wait_for(lambda: srv.round == 2, what="round 1 closes on a and b alone")
    # /status stays small: at most status_devices listed, counts for all
    st = srv.status()
    assert len(st["devices"]) == 3 and st["expected_count"] == 2
    assert st["devices_summary"]["registered"] == 4 and st["devices_summary"]["refused"] == 8
    assert st["devices_summary"]["proven"] == 2
    samples = _samples(render_metrics(srv.metrics_snapshot()))
    assert samples['edgefed_devices_refused_total{job="j"}'] == 8
    assert samples['edgefed_devices_registered{job="j"}'] == 4


def test_status_page_stays_small_with_many_devices(env):
    srv, fleet, store, _ = env(rl=ResourceLimits(max_devices=500, status_devices=20))
    for i in range(600):
        fake_status(fleet, f"d{i:04d}")
    wait_for(lambda: srv.metrics["devices_refused"] == 102, timeout=20, what="102 refused")
    st = srv.status()
    assert len(st["devices"]) == 20 and len(st["expected"]) <= 20
    assert st["devices_summary"]["registered"] == 500
    assert len(json.dumps(st)) < 20_000


def test_allow_unknown_devices_respects_the_cap(env):
    srv, fleet, store, _ = env(names=("a", "b", "c"), rl=ResourceLimits(max_devices=3),
                               server_kwargs={"allow_unknown_devices": True})
    wait_for(lambda: fleet.plans, what="plan")
    fleet.update("zz", 0)  # a, b, c are registered: a 4th device is refused
    wait_for(lambda: fleet.acks_of("zz"), what="ack")
    assert fleet.acks_of("zz")[0].status == AckStatus.REJECTED and "max_devices" in fleet.acks_of("zz")[0].reason
    assert srv.metrics["rejected"]["device_cap"] == 1


# ----------------------------------------------------------------------------- storage quotas

def test_late_and_duplicate_storage_quotas(env):
    rl = ResourceLimits(late_raw_per_device=2, extra_rows_per_device=4)
    srv, fleet, store, _ = env(rl=rl)
    wait_for(lambda: fleet.plans, what="plan")
    fleet.update("a", 0)
    fleet.update("b", 0)
    wait_for(lambda: srv.round == 1, what="round 0 closed")
    ok = fleet.update("a", 1)
    wait_for(lambda: len(fleet.acks_of("a")) == 2, what="a accepted in round 1")
    dup = fleet.update("a", 1)  # second update, same round: digest only
    lates = [fleet.update("a", 0) for _ in range(5)]
    wait_for(lambda: len(fleet.acks_of("a")) == 8, what="all acks")
    acks = {x.msg_id: x for x in fleet.acks_of("a")}
    assert acks[ok.msg_id].status == AckStatus.ACCEPTED
    assert acks[dup.msg_id].status == AckStatus.DUPLICATE
    assert all(acks[u.msg_id].status == AckStatus.LATE for u in lates)  # acked alike, stored or not
    m = srv.metrics
    assert (m["duplicates_digest_stored"], m["late_raw_stored"], m["late_digest_stored"],
            m["late_not_stored"]) == (1, 2, 1, 2)
    rows = {r["msg_id"]: r for r in store.update_log("j")}
    d = rows[dup.msg_id]
    assert d["raw_bytes"] == 0 and d["nbytes"] == len(dup.encode())
    assert d["sha256"] == hashlib.sha256(dup.encode()).hexdigest()
    assert [rows[u.msg_id]["raw_bytes"] > 0 for u in lates[:3]] == [True, True, False]
    assert lates[3].msg_id not in rows and lates[4].msg_id not in rows
    assert rows[ok.msg_id]["raw_bytes"] == rows[ok.msg_id]["nbytes"] > 0  # accepted: raw kept
    # a re-send of a stored one gets its stored answer; the job is unaffected
    fleet.update("a", 0, upd=lates[0])
    wait_for(lambda: len(fleet.acks_of("a")) == 9, what="re-sent late ack")
    assert fleet.acks_of("a")[-1].status == AckStatus.LATE
    fleet.update("b", 1)
    wait_for(lambda: srv.round == 2, what="round 1 closed")
    assert srv.history[1]["devices"] == ["a", "b"]
    # the quota per device and round resets with the round; the raw quota is per job
    more = fleet.update("a", 0)
    wait_for(lambda: len(fleet.acks_of("a")) == 10, what="late in round 2")
    assert store.update_log("j")[-1]["msg_id"] == more.msg_id and store.update_log("j")[-1]["raw_bytes"] == 0
    samples = _samples(render_metrics(srv.metrics_snapshot()))
    assert samples['edgefed_updates_stored_total{how="not_stored",job="j",kind="late"}'] == 2


def test_late_rows_per_round_cap(env):
    srv, fleet, store, _ = env(names=("a", "b", "c"), rl=ResourceLimits(extra_rows_per_round=2,
                                                                          late_raw_per_round=1))
    wait_for(lambda: fleet.plans, what="plan")
    for n in ("a", "b", "c"):
        fleet.update(n, 0)
    wait_for(lambda: srv.round == 1, what="round 0 closed")
    for n in ("a", "b", "c"):
        fleet.update(n, 0)
    wait_for(lambda: all(len(fleet.acks_of(n)) == 2 for n in "abc"), what="late acks")
    assert (srv.metrics["late_raw_stored"], srv.metrics["late_digest_stored"],
            srv.metrics["late_not_stored"]) == (1, 1, 1)
    assert store.update_counts("j")["late"] == 2


# ----------------------------------------------------------------------------- inbound queue

def test_inbound_queue_byte_budget_drops_and_recovers(env):
    budget = 8 << 20
    srv, fleet, store, broker = env(rl=ResourceLimits(inbound_bytes=budget))
    wait_for(lambda: fleet.plans, what="plan")
    n, size = 40, 1 << 20
    with srv._lock:  # the engine is stuck (a slow commit, say): nothing is handled meanwhile
        for i in range(n):
            fleet.raw("a", b"EDGF" + bytes([i]) * size)
        fleet.raw("a", b"EDGF" + bytes(5 << 20))  # over max_message_bytes: a marker is queued
        assert broker.wait_idle(10)
        inb = srv.inbound()
        assert inb["bytes"] <= budget and inb["peak_bytes"] <= budget
        admitted = n - srv.metrics["inbound_dropped"]
        assert 0 < admitted <= budget // size and srv.metrics["inbound_dropped"] >= n - budget // size
        assert srv.metrics["inbound_too_large"] == 1
    assert srv.wait_idle(10)
    assert srv.inbound()["bytes"] == 0 and srv.inbound()["messages"] == 0
    rej = srv.metrics["rejected"]
    assert rej.get("too_large") == 1 and sum(rej.values()) == admitted + 1
    wait_for(lambda: len(fleet.acks_of("a")) == admitted + 1, what="admitted ones acked (rejected)")
    samples = _samples(render_metrics(srv.metrics_snapshot()))
    assert samples['edgefed_inbound_budget_bytes{job="j"}'] == budget
    assert samples['edgefed_inbound_dropped_total{job="j"}'] == n - admitted
    # the queue drained: a normal round goes through
    fleet.update("a", 0)
    fleet.update("b", 0)
    wait_for(lambda: srv.round == 1, what="round 0 closed")


def test_inbound_queue_budget_counts_until_release():
    """The budget holds what is queued AND what the engine is still handling: it comes back
    only on release, and control tokens (stop, wake) neither cost budget nor are messages."""
    q = InboundQueue(max_message_bytes=1000, budget_bytes=2 * (100 + ITEM_OVERHEAD + 1), budget_messages=10)
    assert q.offer("t", bytes(100)) is Offer.QUEUED and q.offer("t", bytes(100)) is Offer.QUEUED
    assert q.offer("t", bytes(100)) is Offer.DROPPED  # over the byte budget: not queued
    q.signal("wake")
    batch = q.take(0.1, 10)
    assert len(batch) == 3 and [m[0] for m in q.messages(batch)] == ["t", "t"]
    assert q.offer("t", bytes(1)) is Offer.DROPPED  # taken but not released still counts
    assert not q.idle()
    q.release(batch)
    assert q.idle() and q.snapshot()["bytes"] == 0 and q.snapshot()["peak_bytes"] == 2 * (100 + ITEM_OVERHEAD + 1)
    assert q.offer("t", bytes(5000)) is Offer.TOO_LARGE  # a marker is queued: it is rejected and acked
    (item,) = q.messages(q.take_now())
    assert isinstance(item[1], TooLarge) and item[1].n == 5000
    assert q.snapshot()["bytes"] == ITEM_OVERHEAD + 1  # the marker costs no payload bytes


def test_normal_job_unaffected_by_tight_limits(env):
    rl = ResourceLimits(max_devices=3, inbound_bytes=64 << 10, status_devices=3,
                        late_raw_per_device=0, extra_rows_per_device=1)
    srv, fleet, store, _ = env(names=("a", "b", "c"), auto=True, rl=rl, rounds=4)
    assert srv.run(timeout=15)["done"]
    assert [h["n_updates"] for h in srv.history] == [3, 3, 3, 3]
    m = srv.metrics
    assert m["inbound_dropped"] == 0 and m["devices_refused"] == 0 and not m["rejected"]
    assert srv.inbound()["peak_bytes"] <= 64 << 10


# ----------------------------------------------------------------------------- HTTP

def _get(port, path="/status", host=None, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.putrequest("GET", path, skip_host=host is not None)
    if host is not None and host != "":
        c.putheader("Host", host)
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def test_http_host_check(env):
    srv, fleet, store, _ = env(server_kwargs={"http_port": 0, "http_allowed_hosts": ["status.lan:9"]})
    port = srv.http_port
    assert _get(port)[0] == 200  # http.client sends Host: 127.0.0.1:port
    for ok in ("localhost", f"localhost:{port}", "127.0.0.1", "LOCALHOST", "status.lan:9"):
        assert _get(port, host=ok)[0] == 200, ok
    for bad in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", "status.lan", "127.0.0.1.evil"):
        status, body = _get(port, host=bad)
        assert status == 421 and b"misdirected" in body, bad
    assert _get(port, "/metrics", host="")[0] == 400  # no Host header at all
    st = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5).read())
    assert st["job"]["job"] == "j"


def test_http_pool_bounded_and_idle_sockets_time_out(env):
    srv, fleet, store, _ = env()
    http_srv = StatusHTTPServer(srv, port=0, max_workers=2, backlog=1, timeout=0.5).start()
    try:
        port = http_srv.port
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        time.sleep(0.1)
        # every worker and backlog slot is held by a silent client: the next one gets 503
        assert _get(port)[0] == 503
        assert http_srv._httpd.refused >= 1
        # the silent clients are cut after the socket timeout, and service resumes
        for s in idle:
            s.settimeout(3)
            try:
                assert s.recv(100) == b""  # closed by the server, not by us
            except ConnectionResetError:
                pass
            s.close()
        wait_for(lambda: _get(port)[0] == 200, timeout=5, what="service resumes")
        assert len([t for t in __import__("threading").enumerate()
                    if t.name.startswith("edgefed-http_")]) <= 2
    finally:
        http_srv.stop()
